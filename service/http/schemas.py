"""The JSON the HTTP routes answer, as pydantic models for the OpenAPI description, and their error responses.

Routes that return a dict are also filtered through their model (FastAPI's ``response_model``); routes that
build their own ``JSONResponse`` (classify, readiness) are only described by it. The protocol's own documents
(v2) are in :mod:`service.v2.schemas`. Nothing here runs for a request: models only, read at import.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every error: the Open Inference Protocol's ``{"error"}`` plus a stable machine-readable ``code``."""

    error: str = Field(description="What went wrong and what to do about it")
    code: str = Field(description="bad_request, invalid_image, not_found, payload_too_large, image_too_large, "
                                  "unsupported_media_type, unavailable, queue_full, overloaded, shed, "
                                  "shutting_down, deadline_exceeded, inference_failed, internal_error, ...")


_DESCRIPTIONS = {
    400: "Invalid request: the message says what is wrong (bad_request, invalid_image)",
    401: "The admin token is missing or wrong (unauthorized)",
    403: "Admin endpoints are disabled: ARCHSERVE_ADMIN_TOKEN is not set (admin_disabled)",
    404: "No such model, version or experiment: the message lists what is served (not_found)",
    409: "Conflict (several_workers: the action would reach one worker process only; conflict)",
    413: "The body, or an image once decoded, is over its limit (payload_too_large, image_too_large)",
    415: "Unsupported Content-Type or Content-Encoding (unsupported_media_type)",
    500: "The model's run or the server failed (inference_failed, internal_error)",
    503: "Not ready yet, shutting down, or overloaded (unavailable, queue_full, overloaded, shed, shutting_down): "
         "retry after Retry-After seconds",
    504: "The request's deadline passed before its answer was ready (deadline_exceeded)",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
}
ERROR_STATUSES = frozenset(_DESCRIPTIONS)


def errors(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the error body, its usual description (or
    ``s404="..."``-style overrides) and its headers (503's Retry-After, 401's WWW-Authenticate)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse,
                             "description": descriptions.get(f"s{status}", _DESCRIPTIONS[status])}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses


INFERENCE_ERRORS = (400, 404, 413, 415, 500, 503, 504)  # what serve() and the body readers raise
ADMIN_ERRORS = (401, 403, 409, 500, 503)  # the token, one worker, the engine process not answering


# ----------------------------------------------------------------------------- classify


class Prediction(BaseModel):
    label: str
    index: int = Field(description="The class index (the logit's position)")
    score: float = Field(description="Softmax probability")


class ImageResult(BaseModel):
    predictions: list[Prediction] = Field(description="The top_k classes, best first")
    filename: str | None = Field(None, description="The multipart file's name, when it had one")


class ClassifyResponse(BaseModel):
    experiment: str | None = Field(None, description="When the name was an experiment")
    variant: str | None = Field(None, description="The experiment's variant that answered (also in X-Variant)")
    model: str
    version: int
    weights: str = Field(description="Where the weights came from: checkpoint or random-init")
    results: list[ImageResult] = Field(description="One per image, in the order sent")
    request_id: str = Field(description="The server's id of the request (for POST /feedback)")
    client_request_id: str | None = Field(None, description="The caller's X-Request-ID, when it sent one")


# ----------------------------------------------------------------------------- models


class InputDescription(BaseModel):
    name: str
    layout: str
    dtype: str
    shape: list[int | None] = Field(description="null: the batch dimension")


class BatchingDescription(BaseModel):
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int = Field(description="Batches that may run at once")
    padded_sizes: list[int] | None = Field(description="Batches are padded up to one of these sizes; null: not")
    sessions: int = Field(description="onnxruntime sessions held, each a copy of the weights")
    cpu_lanes: int
    lane_threads: int | None


class ModelDescription(BaseModel):
    name: str
    version: int
    architecture: str
    family: str
    input: InputDescription
    preprocessing: dict[str, Any] = Field(description="The manifest's preprocessing")
    num_classes: int
    precision: str = Field(description="fp32 or fp16: the file its sessions run")
    provider: str = Field(description="The onnxruntime execution provider")
    precisions_available: list[str]
    batching: BatchingDescription
    params: int
    gflops: float
    weights: dict[str, Any] = Field(description="The manifest's weight provenance")
    random_init: bool
    parity: dict[str, Any] = Field(description="The manifest's parity checks")
    created_at: str


class ModelList(BaseModel):
    ready: bool
    models: list[ModelDescription]


class ModelVersions(BaseModel):
    name: str
    latest_version: int
    versions: list[ModelDescription]


# ----------------------------------------------------------------------------- experiments


class VariantDescription(BaseModel):
    name: str
    model: str
    version: int | None = Field(description="null: the model's latest served version")
    weight: int
    share: float = Field(description="Its share of the traffic (the bandit's current share under thompson)")
    served_version: int | None = Field(description="The version serving it now")


class ShadowDescription(BaseModel):
    name: str
    model: str
    version: int | None
    served_version: int | None


class ExperimentDescription(BaseModel):
    name: str
    description: str
    sticky_key: str | None = Field(description="The request header that keeps a client on one variant")
    allocation: str = Field("fixed", description="fixed: the weights; thompson: bandit shares (see the report)")
    variants: list[VariantDescription]
    shadows: list[ShadowDescription]


class ExperimentList(BaseModel):
    experiments_file: str | None
    loaded_at: float | None = Field(description="When the file was last read, seconds since the epoch")
    experiments: list[ExperimentDescription]


class ExperimentsReloaded(BaseModel):
    reloaded: bool
    experiments: list[str]


class FeedbackRecorded(BaseModel):
    status: str = Field(description="created, or duplicate when the same label was already recorded")
    request_id: str
    image_index: int
    label: int = Field(description="The true class's index")
    experiment: str
    variant: str
    top1_correct: bool
    top5_correct: bool


class ExperimentReport(BaseModel):
    """The comparison (service.experiments.report documents each block)."""

    experiment: str
    generated_at: float
    control: str | None
    settings: dict[str, int | float]  # int first: min_n stays 30, not 30.0
    verdict: str
    verdict_kind: str
    variants: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    shadow_comparisons: list[dict[str, Any]]
    shadow_shed: dict[str, int]
    timeseries: dict[str, Any]
    unlisted: dict[str, int]
    guardrails: dict[str, Any] | None = None  # service.experiments.guardrails.GuardrailKeeper.report_block
    bandit: dict[str, Any] | None = Field(None, description="allocation: thompson only (service.experiments.bandit)")


# ----------------------------------------------------------------------------- health and the repository


class Liveness(BaseModel):
    status: str = Field(description="alive")
    pid: int = Field(description="The worker process that answered")


class Readiness(BaseModel):
    status: str = Field(description="loading, ready, failed or shutting_down")
    ready: bool
    store: dict[str, Any] | None = Field(None, description="The experiment store's state, when there is one")
    models: list[str] | None = Field(None, description="model/version served, when ready")
    loaded_in_s: float | None = Field(None, description="When ready")
    reason: str | None = Field(None, description="Why not ready")


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY or UNAVAILABLE")
    path: str | None = Field(None, description="With the admin token")
    reason: str | None = Field(None, description="With the admin token: why it is not loaded")


class ModelLoaded(BaseModel):
    name: str
    versions: list[str]
    state: str = Field(description="READY")


class ModelUnloaded(BaseModel):
    name: str
    unloaded_versions: list[str]
    state: str = Field(description="UNAVAILABLE")
