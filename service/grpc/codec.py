"""``ModelInferRequest`` in, ``ModelInferResponse`` out: the v2 codec's checks and encodings on gRPC messages.

The request's header (inputs, outputs, shapes, limits, parameters) goes through
the same checks as a REST body (``service.v2.request``), with the same messages;
only the tensor data differ. An input's data come either as raw bytes
(``raw_input_contents``, what tritonclient sends: UINT8 pixels as they lie, BYTES
elements each a 4-byte little-endian length and its bytes, as in REST's binary
form) or typed (``contents.uint_contents`` for UINT8, ``contents.bytes_contents``
for BYTES: one encoded image per element). Outputs always come back raw, as
Triton sends them: FP32 logits, or the classification extension's BYTES strings.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import BadRequestError
from ..v2.codec import ImageInput, InferRequest, ModelIO
from ..v2.request import check_input, check_inputs, parse_outputs, split_bytes
from ..v2.response import classification_strings, serialize_bytes
from . import messages


def parameter_values(parameters) -> dict:
    """An ``InferParameter`` map as the plain values a JSON body would hold (what the v2 checks read)."""
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = None if kind is None else getattr(parameter, kind)  # unset: JSON's null
    return values


def parse_infer_request(request, model: ModelIO, max_images: int, max_body_bytes: int) -> InferRequest:
    """Validate and decode one ``ModelInferRequest`` (already within the size limit: grpc's receive limit)."""
    inputs = list(request.inputs)
    check_inputs(inputs, model)
    requested = [{"name": o.name, "parameters": parameter_values(o.parameters)} for o in request.outputs]
    outputs = parse_outputs(requested, False, model)  # before any tensor is built, as for REST
    tensor = inputs[0]
    header = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
              "parameters": parameter_values(tensor.parameters)}
    image = _parse_data(request, tensor, check_input(header, model, max_images, max_body_bytes))
    return InferRequest(id=request.id or None, input=image, outputs=outputs)


def _parse_data(request, tensor, checked: tuple) -> ImageInput:
    """The input's data, raw or typed, for its checked header (``check_input``'s answer)."""
    name, datatype, shape, where, _ = checked
    raw = request.raw_input_contents
    if raw and tensor.HasField("contents"):
        raise BadRequestError(f"{where} has both contents and raw_input_contents; send one of them")
    if len(raw) > 1:
        raise BadRequestError(f"{len(raw)} raw_input_contents for one input; send one, in the order of 'inputs'")
    if raw:
        data = raw[0]  # one copy out of the message: the batch views it
        if datatype == "UINT8":
            return ImageInput(name, datatype, shape, pixels=_raw_pixels(data, shape, where))
        return ImageInput(name, datatype, shape, encoded=split_bytes(memoryview(data), shape[0], where))
    if not tensor.HasField("contents"):
        raise BadRequestError(f"{where} has neither raw_input_contents nor contents; send the tensor in one")
    if datatype == "UINT8":
        return ImageInput(name, datatype, shape, pixels=_typed_pixels(tensor.contents.uint_contents, shape, where))
    encoded = tuple(tensor.contents.bytes_contents)
    if len(encoded) != shape[0]:
        raise BadRequestError(
            f"{where}: the shape has {shape[0]} BYTES element(s) but contents.bytes_contents holds {len(encoded)}"
        )
    return ImageInput(name, datatype, shape, encoded=encoded)


def _raw_pixels(data: bytes, shape: tuple[int, ...], where: str) -> np.ndarray:
    needed = math.prod(shape)  # check_input bounded the shape by the body limit
    if len(data) != needed:
        raise BadRequestError(
            f"{where}: UINT8 shape {list(shape)} needs {needed} bytes but raw_input_contents holds {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _typed_pixels(values, shape: tuple[int, ...], where: str) -> np.ndarray:
    needed = math.prod(shape)
    if len(values) != needed:
        raise BadRequestError(
            f"{where}: shape {list(shape)} has {needed} elements but contents.uint_contents holds {len(values)}"
        )
    try:
        pixels = bytearray(values)  # one C loop over the uint32s, and it refuses any over 255
    except ValueError:
        raise BadRequestError(f"{where}: UINT8 data must be integers from 0 to 255, got {max(values)}") from None
    return np.frombuffer(pixels, dtype=np.uint8).reshape(shape)


def encode_infer_response(
    request: InferRequest, model: ModelIO, model_name: str, model_version: str, request_id: str,
    logits: np.ndarray, parameters: dict[str, str] | None = None,
):
    """The ``ModelInferResponse`` to ``request``, given the model's output ``logits`` ``[N, classes]``;
    ``parameters``: string parameters of the response (an experiment's name and variant)."""
    response = messages.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    for wanted in request.outputs:
        if wanted.classification:
            strings = classification_strings(logits, model.labels, wanted.classification)
            response.outputs.add(name=wanted.name, datatype="BYTES", shape=[len(strings), wanted.classification])
            response.raw_output_contents.append(serialize_bytes([s.encode() for row in strings for s in row]))
        else:
            values = np.ascontiguousarray(logits, dtype="<f4")  # the protocol's FP32 is little-endian
            response.outputs.add(name=wanted.name, datatype="FP32", shape=list(values.shape))
            response.raw_output_contents.append(values.tobytes())
    return response
