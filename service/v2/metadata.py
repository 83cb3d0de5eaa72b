"""Server and model metadata documents of the Open Inference Protocol, from what is served."""

from __future__ import annotations

from collections.abc import Iterable

from ..models.served import ServedModel
from .codec import ModelIO

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "archserve"
# What this data plane implements; others (the model repository extension) are added where served.
EXTENSIONS = ("binary_tensor_data", "classification")
_DATATYPES = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16"}


def model_io(served: ServedModel) -> ModelIO:
    m = served.manifest
    _, height, width, channels = m.input.shape
    return ModelIO(
        input_name=m.input.name, height=height, width=width, channels=channels,
        output_name=m.output.name, num_classes=m.output.num_classes, labels=tuple(map(str, m.labels)),
    )


def server_metadata(version: str, extensions: Iterable[str]) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": list(extensions)}


def model_metadata(served: ServedModel, versions: Iterable[int]) -> dict:
    """``versions``: every served version of the model, as the protocol's strings."""
    m = served.manifest
    return {
        "name": served.name,
        "versions": [str(v) for v in sorted(versions)],
        "platform": PLATFORM,
        "inputs": [{
            "name": m.input.name,
            "datatype": _DATATYPES[m.input.dtype],
            "shape": [-1 if d is None else d for d in m.input.shape],
        }],
        "outputs": [{
            "name": m.output.name,
            "datatype": _DATATYPES[m.output.dtype],
            "shape": [-1, m.output.num_classes],
        }],
    }
