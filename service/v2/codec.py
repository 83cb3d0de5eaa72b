"""Open Inference Protocol (KServe v2) REST bodies: parse and validate requests, encode responses.

A request body is a JSON document, optionally followed by raw tensor bytes
(Triton's binary tensor data extension): the ``Inference-Header-Content-Length``
header gives the JSON's length, and each input that carries binary data says
how many bytes are its own with the ``binary_data_size`` parameter, in input
order. BYTES elements in binary form are each a 4-byte little-endian length
and then that many bytes.

This model family takes exactly one input, in one of two forms:

* ``UINT8`` ``[N, H, W, 3]``: preprocessed pixels at the model's crop size,
  handed to the batcher as they are (a view of the request body when binary);
* ``BYTES`` ``[N]`` (or ``[N, 1]``): encoded images (JPEG, PNG, ...), decoded
  like ``/classify``. In JSON each element is a base64 string (a JSON string
  cannot carry arbitrary bytes); in binary form, the raw file bytes.

Both forms use the model's input name. Everything is validated before
anything large is allocated, and every problem is a ``BadRequestError`` that
says what was expected. Nothing here knows of HTTP frameworks.

The codec is three modules: ``request`` parses, ``response`` encodes, and
``protocol`` holds what both share (constants and the typed messages); this
one names them together.
"""

from .protocol import (
    BINARY_MEDIA_TYPE,
    DATATYPES,
    HEADER_LENGTH,
    JSON_MEDIA_TYPE,
    EncodedResponse,
    ImageInput,
    InferRequest,
    ModelIO,
    RequestedOutput,
)
from .request import parse_infer_request
from .response import classification_strings, encode_infer_response, serialize_bytes

__all__ = [
    "BINARY_MEDIA_TYPE",
    "DATATYPES",
    "HEADER_LENGTH",
    "JSON_MEDIA_TYPE",
    "EncodedResponse",
    "ImageInput",
    "InferRequest",
    "ModelIO",
    "RequestedOutput",
    "classification_strings",
    "encode_infer_response",
    "parse_infer_request",
    "serialize_bytes",
]
