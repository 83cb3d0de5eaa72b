"""The gRPC service's messages, compiled from ``protos/grpc_service.proto`` when this module is first imported.

grpcio-tools' protoc compiles the .proto into a descriptor set in a temporary
folder (milliseconds, once per process); the message classes are built from it
in a descriptor pool of this module's own. Nothing generated is committed or
installed, so ``pip install .``, ``pip install -e .``, the Docker image and CI
all work from the shipped .proto with no build step, and a read-only install
(the image's non-root user) is no obstacle. The own pool is why these are not
``protoc --python_out`` modules: those register in protobuf's default pool,
where ``tritonclient.grpc`` registers the same ``inference.*`` names, and a
process holding both (the tests, an app embedding a client) would fail with
"duplicate symbol".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

SERVICE = "inference.GRPCInferenceService"
_PROTO = "grpc_service.proto"


def _compile() -> descriptor_pb2.FileDescriptorSet:
    source = Path(__file__).with_name("protos")  # package data: in the wheel, the image and the checkout alike
    with tempfile.TemporaryDirectory(prefix="archserve-proto-") as out:
        target = Path(out) / "descriptors.pb"
        status = protoc.main(["protoc", f"-I{source}", f"--descriptor_set_out={target}", _PROTO])
        if status != 0:
            raise RuntimeError(f"protoc could not compile {source / _PROTO} (exit {status}); see its output above")
        return descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())


_files = _compile().file
_pool = descriptor_pool.DescriptorPool()
for _file in _files:
    _pool.Add(_file)
_classes = message_factory.GetMessages(list(_files), pool=_pool)

# The service's methods, name -> (request class, response class): what a generated *_pb2_grpc module would hold.
METHODS = {
    method.name: (_classes[method.input_type.full_name], _classes[method.output_type.full_name])
    for method in _pool.FindServiceByName(SERVICE).methods
}

ServerLiveResponse = _classes["inference.ServerLiveResponse"]
ServerReadyResponse = _classes["inference.ServerReadyResponse"]
ModelReadyResponse = _classes["inference.ModelReadyResponse"]
ServerMetadataResponse = _classes["inference.ServerMetadataResponse"]
ModelMetadataResponse = _classes["inference.ModelMetadataResponse"]
ModelInferRequest = _classes["inference.ModelInferRequest"]
ModelInferResponse = _classes["inference.ModelInferResponse"]
RepositoryIndexResponse = _classes["inference.RepositoryIndexResponse"]
