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


class ErrorResponse(BaseModel):
    error: str
    code: str | None = None


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
