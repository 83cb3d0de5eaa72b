"""Encode a v2 inference response: JSON, or JSON followed by Triton's binary tensor data."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from .protocol import BINARY_MEDIA_TYPE, BYTES_PREFIX, JSON_MEDIA_TYPE, EncodedResponse, InferRequest, ModelIO


def classification_strings(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[str]]:
    """Triton's classification extension: per row, the top ``k`` as ``"<value>:<index>[:<label>]"``.

    ``value`` is the output tensor's own value (here a logit), formatted like C++'s
    ``std::to_string(float)``; classes are ordered by value, highest first (ties: lower index first).
    """
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(logits, order):
        rows.append([
            f"{float(row[i]):f}:{int(i)}" + (f":{labels[i]}" if i < len(labels) and labels[i] else "")
            for i in indices
        ])
    return rows


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in binary form: each a 4-byte little-endian length and its bytes."""
    return b"".join(len(e).to_bytes(BYTES_PREFIX, "little") + e for e in elements)


def encode_infer_response(
    request: InferRequest, model: ModelIO, model_name: str, model_version: str, request_id: str,
    logits: np.ndarray,
) -> EncodedResponse:
    """The response to ``request``, given the model's output ``logits`` ``[N, classes]``."""
    outputs, blobs = [], []
    for wanted in request.outputs:
        if wanted.classification:
            strings = classification_strings(logits, model.labels, wanted.classification)
            entry = {"name": wanted.name, "datatype": "BYTES", "shape": [len(strings), wanted.classification]}
            flat = [s for row in strings for s in row]
            if wanted.binary:
                blob = serialize_bytes([s.encode() for s in flat])
            else:
                entry["data"] = flat
        else:
            values = np.ascontiguousarray(logits, dtype="<f4")
            entry = {"name": wanted.name, "datatype": "FP32", "shape": list(values.shape)}
            if wanted.binary:
                blob = values.tobytes()
            else:
                entry["data"] = values.ravel().tolist()
        if wanted.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        outputs.append(entry)
    document = {"model_name": model_name, "model_version": model_version, "id": request_id, "outputs": outputs}
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return EncodedResponse(header, JSON_MEDIA_TYPE)
    return EncodedResponse(b"".join([header, *blobs]), BINARY_MEDIA_TYPE, header_length=len(header))
