"""The shipped .proto (service/grpc/protos/grpc_service.proto) against the one tritonclient.grpc is generated from:
every RPC we serve is Triton's, with the same messages on the wire (names, numbers, types of every field)."""

from __future__ import annotations

from tritonclient.grpc import service_pb2

from service.grpc import messages


def _repeated(field) -> bool:
    # protobuf 6 deprecates ``label`` for ``is_repeated``, which older versions lack.
    return field.is_repeated if hasattr(type(field), "is_repeated") else field.label == field.LABEL_REPEATED


def _shape(descriptor, seen: set) -> dict:
    """What decides a message's wire format and its JSON form, with the messages it holds, recursively."""
    if descriptor.full_name in seen:
        return {"ref": descriptor.full_name}
    seen = seen | {descriptor.full_name}
    return {
        "name": descriptor.full_name,
        "fields": {
            f.number: (f.name, f.type, _repeated(f), f.containing_oneof and f.containing_oneof.name,
                       _shape(f.message_type, seen) if f.message_type else None)
            for f in descriptor.fields
        },
    }


def test_every_rpc_we_serve_is_tritons_with_the_same_messages():
    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert messages.SERVICE == triton.full_name
    assert set(messages.METHODS) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                     "ModelInfer", "RepositoryIndex"}
    for name, (request, response) in messages.METHODS.items():
        theirs = triton.methods_by_name[name]
        assert not theirs.client_streaming and not theirs.server_streaming, name  # unary, as served
        assert _shape(request.DESCRIPTOR, set()) == _shape(theirs.input_type, set()), name
        assert _shape(response.DESCRIPTOR, set()) == _shape(theirs.output_type, set()), name


def test_a_message_made_by_tritonclient_reads_the_same_here():
    theirs = service_pb2.ModelInferRequest(model_name="resnet18", model_version="1", id="x")
    tensor = theirs.inputs.add(name="image", datatype="BYTES", shape=[2])
    tensor.parameters["p"].double_param = 0.5
    tensor.contents.bytes_contents.extend([b"a", b"b"])
    theirs.outputs.add(name="logits").parameters["classification"].int64_param = 3
    ours = messages.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert list(ours.inputs[0].contents.bytes_contents) == [b"a", b"b"]
