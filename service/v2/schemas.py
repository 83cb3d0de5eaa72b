"""The protocol's JSON documents as pydantic models, for the OpenAPI description.

Requests are parsed by :mod:`service.v2.codec` (precise messages, binary data,
no copies), not by these; responses are built as dicts in the same shapes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="UINT8, FP32, BYTES, ...")
    shape: list[int] = Field(description="-1 for a variable dimension (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ReadyResponse(BaseModel):
    ready: bool


class LiveResponse(BaseModel):
    live: bool


class RequestInput(BaseModel):
    name: str = Field(description="The model's input name ('image')")
    shape: list[int] = Field(description="[N, H, W, 3] for UINT8 pixels; [N] or [N, 1] for BYTES encoded images")
    datatype: str = Field(description="UINT8 or BYTES")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": n} for binary data')
    data: list[Any] | None = Field(
        None, description="Row-major elements, flat or nested; BYTES elements are base64 strings in JSON"
    )


class RequestOutput(BaseModel):
    name: str = Field(description="'logits'")
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data": true} and/or {"classification": k}'
    )


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_output": true}')
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


class ConfigInput(BaseModel):
    name: str
    data_type: str = Field(description="TYPE_UINT8, ...")
    format: str = Field(description="FORMAT_NHWC: the image's pixels, row by row")
    dims: list[int] = Field(description="Without the batch dimension (max_batch_size > 0)")


class ConfigOutput(BaseModel):
    name: str
    data_type: str = Field(description="TYPE_FP32")
    dims: list[int] = Field(description="Without the batch dimension: [number of classes]")
    label_filename: str = Field(description="Empty: the labels are in the version's model.json")


class QueuePolicy(BaseModel):
    timeout_action: str = Field(description="REJECT: a request whose deadline passes is answered 504")
    default_timeout_microseconds: int = Field(description="The request deadline, from arrival")
    allow_timeout_override: bool
    max_queue_size: int = Field(description="Images (not requests) the queue holds; more are refused with 503")


class DynamicBatching(BaseModel):
    preferred_batch_size: list[int] = Field(description="Empty: a batch takes whatever waits, up to max_batch_size")
    max_queue_delay_microseconds: int
    preserve_ordering: bool
    default_queue_policy: QueuePolicy


class InstanceGroup(BaseModel):
    name: str
    kind: str = Field(description="KIND_GPU or KIND_CPU")
    count: int = Field(description="Batches that may run at once")
    gpus: list[int]


class ModelConfig(BaseModel):
    """Triton's model configuration (model_config.proto as JSON), from the manifest and the batcher's settings."""

    name: str
    platform: str
    backend: str
    version_policy: dict[str, Any] = Field(description='{"latest": {"num_versions": 1}}, {"all": {}} or '
                                                       '{"specific": {"versions": [...]}}')
    max_batch_size: int
    input: list[ConfigInput]
    output: list[ConfigOutput]
    dynamic_batching: DynamicBatching
    instance_group: list[InstanceGroup]
    default_model_filename: str
    parameters: dict[str, dict[str, str]] = Field(description='Each {"string_value": ...}: precision, provider, '
                                                             "padded batch sizes, CPU lanes")


class Duration(BaseModel):
    count: int = Field(description="Times collected (0: not collected)")
    ns: int = Field(description="Their total duration, in nanoseconds")


class InferStatistics(BaseModel):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class BatchStatistics(BaseModel):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="When the last request ended, ms since the epoch (0: none yet)")
    inference_count: int = Field(description="Images inferred in successful batches")
    execution_count: int = Field(description="Successful batches")
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]


class StatisticsResponse(BaseModel):
    """Triton's statistics extension, since each version loaded."""

    model_stats: list[ModelStatistics]


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON Schema with its ``$defs`` inlined, to embed in an OpenAPI operation."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
