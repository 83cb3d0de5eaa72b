"""Parse and validate a v2 inference request body (JSON, then any binary tensor data) into an InferRequest.

Everything is validated before anything large is allocated, and every problem is
a ``BadRequestError`` that says what was expected.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from itertools import chain

import numpy as np

from ..errors import BadRequestError
from .protocol import BYTES_PREFIX, DATATYPES, HEADER_LENGTH, ImageInput, InferRequest, ModelIO, RequestedOutput

_DIGITS = re.compile(r"^[0-9]{1,18}$")


def parse_infer_request(
    body: bytes, header_length: str | None, model: ModelIO, max_images: int, max_body_bytes: int | None = None,
    *, share_gil: bool = False,
) -> InferRequest:
    """Validate and decode one inference request body (the whole body, already size-limited).

    ``header_length`` is the Inference-Header-Content-Length header's value, if any;
    ``max_images`` bounds the batch dimension and ``max_body_bytes`` the pixels' size.
    ``share_gil``: parsed in a thread beside the event loop, so let it have the GIL between numbers
    (``_int_sharing_the_gil``); slower, so only for large bodies.
    """
    if not body:
        raise BadRequestError("the request has no body; send the inference request JSON")
    json_part, binary = _split_body(body, header_length)
    document = _load_json(json_part, header_length is not None, share_gil)
    if not isinstance(document, dict):
        raise BadRequestError(f"the inference request must be a JSON object, got {_json_type(document)}")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(document, "the request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequestError(f"parameter 'binary_data_output' must be true or false, got {binary_output!r}")

    inputs = document.get("inputs")
    check_inputs(inputs, model)
    outputs = parse_outputs(document.get("outputs"), binary_output, model)  # before any tensor is built
    image = _parse_input(inputs[0], binary, header_length is not None, model, max_images, max_body_bytes)
    return InferRequest(id=request_id, input=image, outputs=outputs)


def check_inputs(inputs, model: ModelIO) -> None:
    """The request's inputs (a list, also the gRPC request's) hold exactly the one this model family takes."""
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError(
            f"'inputs' must be a non-empty array; this model takes one input, {model.input_name!r}"
        )
    if len(inputs) != 1:
        raise BadRequestError(
            f"{len(inputs)} inputs given; this model takes exactly one input, {model.input_name!r} "
            f"(UINT8 pixels {model.pixel_shape} or BYTES encoded images [N])"
        )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    value = header_length.strip()
    if not _DIGITS.match(value):
        raise BadRequestError(f"{HEADER_LENGTH} {header_length!r} is not a number of bytes")
    length = int(value)
    if length == 0:
        raise BadRequestError(f"{HEADER_LENGTH} is 0; it gives the length of the JSON that starts the body")
    if length > len(body):
        raise BadRequestError(
            f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes; it must give the length "
            "of the JSON that starts the body"
        )
    view = memoryview(body)
    return view[:length], view[length:]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number; tensor data must be finite numbers")


_SMALL_INTS = {str(i): i for i in range(256)}
_CHUNK = 1 << 16  # elements handled per C call below: each holds the GIL for a few ms at most


def _int_sharing_the_gil(text: str, _small=_SMALL_INTS) -> int:
    """json's ``parse_int`` for bodies parsed off the event loop. ``json.loads`` is one C call that holds the
    GIL to the end (about 0.3 s for 20 MB of pixels): in another thread it would still stall the loop. A hook
    in Python gives the interpreter a point to hand the GIL over at every number."""
    value = _small.get(text)
    return int(text) if value is None else value


def _load_json(data: bytes | memoryview, has_header: bool, share_gil: bool = False):
    try:
        if share_gil:
            return json.loads(bytes(data), parse_constant=_reject_constant, parse_int=_int_sharing_the_gil)
        return json.loads(bytes(data), parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequestError("the inference request JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and not has_header:
            hint = f"; binary tensor data after the JSON need the {HEADER_LENGTH} header (the JSON's length)"
        raise BadRequestError(f"the inference request is not valid JSON: {exc}{hint}") from None
    except ValueError as exc:  # UnicodeDecodeError, NaN/Infinity, integers of over 4300 digits
        raise BadRequestError(f"the inference request is not valid JSON: {exc}") from None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequestError(f"'parameters' of {where} must be a JSON object, got {_json_type(parameters)}")
    return parameters


def _is_int(value) -> bool:
    return type(value) is int  # not bool, not float


def _parse_input(
    obj, binary: memoryview, has_header: bool, model: ModelIO, max_images: int, max_body_bytes: int | None
) -> ImageInput:
    name, datatype, shape, where, parameters = check_input(obj, model, max_images, max_body_bytes)
    count = shape[0]
    size = parameters.get("binary_data_size")
    if size is not None:
        if not _is_int(size) or size < 0:
            raise BadRequestError(f"{where}: 'binary_data_size' must be a non-negative integer, got {size!r}")
        if not has_header:
            raise BadRequestError(
                f"{where} has binary_data_size but the request has no {HEADER_LENGTH} header giving the "
                "length of the JSON before the binary data"
            )
        if "data" in obj:
            raise BadRequestError(f"{where} has both 'data' and binary_data_size; send one of them")
        if size != len(binary):
            raise BadRequestError(
                f"{where}: binary_data_size is {size} but {len(binary)} bytes follow the JSON header; they must "
                "add up to the rest of the body"
            )
        if datatype == "UINT8":
            return ImageInput(name, datatype, shape, pixels=_pixels_from_binary(binary, shape, where))
        return ImageInput(name, datatype, shape, encoded=split_bytes(binary, count, where))

    if len(binary):
        raise BadRequestError(
            f"{len(binary)} bytes follow the JSON header but no input has binary_data_size; give it in the "
            "input's parameters"
        )
    if "data" not in obj:
        raise BadRequestError(f"{where} has neither 'data' nor a binary_data_size parameter")
    flat = _flatten(obj["data"], where)
    if datatype == "UINT8":
        return ImageInput(name, datatype, shape, pixels=_pixels_from_json(flat, shape, where))
    return ImageInput(name, datatype, shape, encoded=_bytes_from_json(flat, count, where))


def check_input(
    obj, model: ModelIO, max_images: int, max_body_bytes: int | None
) -> tuple[str, str, tuple[int, ...], str, dict]:
    """An input's header (``obj``: name, datatype, shape, parameters; a gRPC input's too), checked against the
    model and the limits before any of its data is read: ``(name, datatype, shape, where, parameters)``."""
    if not isinstance(obj, dict):
        raise BadRequestError(f"each input must be a JSON object, got {_json_type(obj)}")
    name = obj.get("name")
    if not isinstance(name, str):
        raise BadRequestError(f"the input's 'name' must be a string, got {_json_type(name)}")
    if name != model.input_name:
        raise BadRequestError(
            f"unknown input {name!r}; the model's input is {model.input_name!r} "
            f"(UINT8 pixels {model.pixel_shape} or BYTES encoded images [N])"
        )
    where = f"input {name!r}"
    datatype = obj.get("datatype")
    if not isinstance(datatype, str):
        raise BadRequestError(f"{where}: 'datatype' must be a string, got {_json_type(datatype)}")
    if datatype not in DATATYPES:
        raise BadRequestError(
            f"{where}: unknown datatype {datatype!r}; the protocol's are {', '.join(sorted(DATATYPES))}"
        )
    if datatype not in ("UINT8", "BYTES"):
        raise BadRequestError(
            f"{where} has datatype {datatype}; send UINT8 pixels of shape {model.pixel_shape} "
            "or BYTES encoded images of shape [N]"
        )
    shape = _parse_shape(obj.get("shape"), where)
    if datatype == "UINT8":
        expected = [model.height, model.width, model.channels]
        if len(shape) != 4 or list(shape[1:]) != expected:
            raise BadRequestError(
                f"{where}: UINT8 shape must be {model.pixel_shape} (pixels at the model's crop size), got "
                f"{list(shape)}; resize and crop first, or send the encoded images as BYTES [N]"
            )
    elif not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise BadRequestError(
            f"{where}: BYTES shape must be [N] or [N, 1] (one encoded image per element), got {list(shape)}"
        )
    count = shape[0]
    if count == 0:
        raise BadRequestError(f"{where}: shape {list(shape)} holds no image; send at least one")
    if count > max_images:
        raise BadRequestError(f"{where}: {count} images in one request, over the limit of {max_images}; split it")
    # Only now is the element count computed (Python integers: no overflow), from bounded dimensions.
    if datatype == "UINT8" and max_body_bytes is not None and _product(shape) > max_body_bytes:
        raise BadRequestError(
            f"{where}: shape {list(shape)} is {_product(shape)} bytes of pixels, over the request body limit "
            f"of {max_body_bytes} bytes; send fewer images per request, or encoded images as BYTES"
        )

    parameters = _parameters(obj, where)
    if "shared_memory_region" in parameters:
        raise BadRequestError(f"{where}: shared memory is not supported; send the tensor data in the request body")
    return name, datatype, shape, where, parameters


def _parse_shape(shape, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape or not all(_is_int(d) for d in shape):
        raise BadRequestError(f"{where}: 'shape' must be a non-empty array of integers, got {json.dumps(shape)[:200]}")
    for dim in shape:
        if dim < 0:
            raise BadRequestError(f"{where}: shape {shape} has a negative dimension ({dim})")
    return tuple(shape)


def _product(shape: tuple[int, ...]) -> int:
    """Element count in Python integers (never overflows); callers have bounded the rank and dimensions."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def _pixels_from_binary(binary: memoryview, shape: tuple[int, ...], where: str) -> np.ndarray:
    needed = _product(shape)
    if len(binary) != needed:
        raise BadRequestError(
            f"{where}: UINT8 shape {list(shape)} needs {needed} bytes but binary_data_size is {len(binary)}"
        )
    return np.frombuffer(binary, dtype=np.uint8).reshape(shape)  # a view of the body: no copy


def split_bytes(binary: memoryview, count: int, where: str) -> tuple[bytes, ...]:
    items: list[bytes] = []
    offset, end = 0, len(binary)
    while offset < end:
        if len(items) == count:
            raise BadRequestError(
                f"{where}: the binary data hold more than the {count} BYTES element(s) of the shape "
                f"({end - offset} bytes left over)"
            )
        if end - offset < BYTES_PREFIX:
            raise BadRequestError(
                f"{where}: BYTES element {len(items)} is truncated: its 4-byte length prefix is cut off"
            )
        length = int.from_bytes(binary[offset:offset + BYTES_PREFIX], "little")
        offset += BYTES_PREFIX
        if length > end - offset:
            raise BadRequestError(
                f"{where}: BYTES element {len(items)} declares {length} bytes but only {end - offset} remain"
            )
        items.append(bytes(binary[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise BadRequestError(
            f"{where}: the shape has {count} BYTES element(s) but the binary data hold {len(items)}"
        )
    return tuple(items)


def _flatten(data, where: str) -> list:
    """Row-major elements of ``data``, given flat or nested (both are allowed by the protocol)."""
    if not isinstance(data, list):
        raise BadRequestError(f"{where}: 'data' must be a JSON array, got {_json_type(data)}")
    flat = data
    while flat and type(flat[0]) is list:
        if any(type(item) is not list for item in flat):
            raise BadRequestError(f"{where}: 'data' mixes arrays and scalars at the same level")
        level: list = []
        for start in range(0, len(flat), _CHUNK // 4):  # in pieces: see _CHUNK
            level.extend(chain.from_iterable(flat[start:start + _CHUNK // 4]))
        flat = level
    return flat


def _element_count_check(flat: list, shape: tuple[int, ...], where: str) -> None:
    needed = _product(shape)
    if len(flat) != needed:
        raise BadRequestError(f"{where}: shape {list(shape)} has {needed} elements but 'data' holds {len(flat)}")


def _pixels_from_json(flat: list, shape: tuple[int, ...], where: str) -> np.ndarray:
    _element_count_check(flat, shape, where)
    pixels = np.empty(len(flat), dtype=np.uint8)
    for start in range(0, len(flat), _CHUNK):  # in pieces: see _CHUNK
        part = flat[start:start + _CHUNK]
        if set(map(type, part)) != {int}:
            bad = next(v for v in part if type(v) is not int)
            raise BadRequestError(f"{where}: UINT8 data must be integers from 0 to 255, got {_json_type(bad)}")
        low, high = min(part), max(part)
        if low < 0 or high > 255:
            raise BadRequestError(
                f"{where}: UINT8 data must be integers from 0 to 255, got {low if low < 0 else high}"
            )
        pixels[start:start + len(part)] = part
    return pixels.reshape(shape)


def _bytes_from_json(flat: list, count: int, where: str) -> tuple[bytes, ...]:
    if len(flat) != count:
        raise BadRequestError(f"{where}: the shape has {count} BYTES element(s) but 'data' holds {len(flat)}")
    items = []
    for index, value in enumerate(flat):
        if not isinstance(value, str):
            raise BadRequestError(
                f"{where}: BYTES element {index} must be a base64 string, got {_json_type(value)}"
            )
        try:
            items.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(
                f"{where}: BYTES element {index} is not valid base64 ({exc}); in JSON each encoded image is "
                "base64, or send the raw bytes with the binary tensor data extension"
            ) from None
    return tuple(items)


def parse_outputs(raw, binary_default: bool, model: ModelIO) -> tuple[RequestedOutput, ...]:
    if raw is None or raw == []:  # none requested: every output, in the request-wide binary mode
        return (RequestedOutput(model.output_name, binary=binary_default),)
    if not isinstance(raw, list):
        raise BadRequestError(f"'outputs' must be an array, got {_json_type(raw)}")
    names = []
    for obj in raw:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise BadRequestError("each requested output must be a JSON object with a string 'name'")
        if obj["name"] != model.output_name:
            raise BadRequestError(f"unknown output {obj['name']!r}; the model's only output is {model.output_name!r}")
        names.append(obj["name"])
    if len(names) > 1:
        raise BadRequestError(
            f"{len(names)} outputs requested ({', '.join(map(repr, names))}) but the model has one, "
            f"{model.output_name!r}; request each output once"
        )
    obj = raw[0]
    where = f"output {obj['name']!r}"
    parameters = _parameters(obj, where)
    if "shared_memory_region" in parameters:
        raise BadRequestError(f"{where}: shared memory is not supported; outputs come back in the response body")
    binary = parameters.get("binary_data", binary_default)
    if not isinstance(binary, bool):
        raise BadRequestError(f"{where}: 'binary_data' must be true or false, got {binary!r}")
    classification = parameters.get("classification", 0)
    if "classification" in parameters and (
        not _is_int(classification) or not 1 <= classification <= model.num_classes
    ):
        raise BadRequestError(
            f"{where}: 'classification' must be an integer from 1 to {model.num_classes} (the number of "
            f"classes), got {classification!r}"
        )
    return (RequestedOutput(obj["name"], binary=binary, classification=classification),)
