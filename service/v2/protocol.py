"""What the v2 codec's request and response halves share: the protocol's constants and typed messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"

# Every datatype of the protocol (and Triton's BF16), so that a valid but unsupported one says so.
DATATYPES = frozenset({
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
})
BYTES_PREFIX = 4  # a BYTES element in binary form: its length, 4 bytes little-endian, then its bytes


@dataclass(frozen=True)
class ModelIO:
    """What the codec needs to know of a model: its one input and its one output."""

    input_name: str
    height: int
    width: int
    channels: int
    output_name: str
    num_classes: int
    labels: Sequence[str] = field(repr=False, default=())

    @property
    def pixel_shape(self) -> str:
        return f"[N, {self.height}, {self.width}, {self.channels}]"


@dataclass(frozen=True)
class ImageInput:
    """The request's input: either pixels (UINT8) or encoded images (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    pixels: np.ndarray | None = field(default=None, repr=False)  # [N, H, W, C] uint8
    encoded: tuple[bytes, ...] = field(default=(), repr=False)  # one encoded image per element

    @property
    def count(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool = False
    classification: int = 0  # top-k as "value:index:label" strings; 0: the raw tensor


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    input: ImageInput
    outputs: tuple[RequestedOutput, ...]


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    media_type: str
    header_length: int | None = None  # Inference-Header-Content-Length when binary data follow the JSON

    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}
