"""Server and model metadata documents of the Open Inference Protocol, from what is served."""

from __future__ import annotations

from collections.abc import Iterable

from ..models.served import ServedModel
from ..settings import Settings
from .codec import ModelIO

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "archserve"
# What this data plane implements; others (the model repository extension) are added where served.
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")
_DATATYPES = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16"}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


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


def version_policy(settings: Settings, name: str) -> dict:
    """Triton's version policy of ``name``, by the rule the lifecycle loads versions by."""
    for entry in settings.models:
        model, _, version = entry.partition("@")
        if model == name and version.isdigit():  # pinned in ARCHSERVE_MODELS
            return {"specific": {"versions": [int(version)]}}
    return {"all": {}} if settings.version_policy == "all" else {"latest": {"num_versions": 1}}


def model_config(served: ServedModel, settings: Settings) -> dict:
    """Triton's model configuration of one version: the manifest, and the batcher as it runs (``describe``, which
    a front-end has from the engine process)."""
    m = served.manifest
    described = served.describe(settings)
    batching = described["batching"]
    gpu = described["provider"] in _GPU_PROVIDERS
    parameters = {"precision": described["precision"], "execution_provider": described["provider"],
                  "cpu_lanes": batching["cpu_lanes"]}
    if batching["padded_sizes"]:  # batches run padded up to these sizes, the ones warmed up
        parameters["padded_batch_sizes"] = ",".join(map(str, batching["padded_sizes"]))
    return {
        "name": served.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": version_policy(settings, served.name),
        "max_batch_size": batching["max_batch_size"],
        "input": [{
            "name": m.input.name, "data_type": f"TYPE_{_DATATYPES[m.input.dtype]}",
            "format": f"FORMAT_{m.input.layout}",
            "dims": list(m.input.shape[1:]),  # the batch dimension is implied by max_batch_size
        }],
        "output": [{"name": m.output.name, "data_type": f"TYPE_{_DATATYPES[m.output.dtype]}",
                    "dims": [m.output.num_classes], "label_filename": ""}],
        "dynamic_batching": {
            "preferred_batch_size": [],  # the batcher takes what waits; it does not aim at sizes
            "max_queue_delay_microseconds": round(batching["max_queue_delay_ms"] * 1000),
            "preserve_ordering": False,  # a request's answer does not wait for earlier requests'
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(settings.request_timeout_s * 1_000_000),
                "allow_timeout_override": False,
                "max_queue_size": batching["max_queue_size"],
            },
        },
        "instance_group": [{"name": f"{served.name}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU",
                            "count": batching["instances"], "gpus": [settings.device_id] if gpu else []}],
        "default_model_filename": m.files[described["precision"]].path,  # the file its sessions run
        "parameters": {key: {"string_value": str(value)} for key, value in parameters.items()},
    }
