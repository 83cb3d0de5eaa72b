"""The Open Inference Protocol (KServe v2) REST data plane: health, metadata, inference, and Triton's model
configuration and statistics extensions.

Inference goes through the same batcher, limits and metrics as ``/classify``;
parsing and encoding are in :mod:`service.v2.codec`.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import UnsupportedMediaTypeError
from ..serving import Call, lookup, require_ready, serve
from ..state import AppState
from ..v2 import codec, schemas
from ..v2.metadata import EXTENSIONS, model_config, model_io, model_metadata, server_metadata
from .body import read_limited
from .schemas import INFERENCE_ERRORS, errors

router = APIRouter(tags=["open inference protocol (v2)"])

_LOOKUP_ERRORS = errors(404, 500, 503)  # an unknown model or version; 503 while loading or shutting down
_READY_503 = {503: {"model": schemas.ReadyResponse, "description": "Not ready (loading or shutting down)",
                    "headers": errors(503)[503]["headers"]}}
_INFER_DOC = {
    "requestBody": {
        "required": True,
        "description": (
            "The inference request JSON; with the binary tensor data extension, the JSON (its length in the "
            "Inference-Header-Content-Length header) followed by the raw tensor bytes."
        ),
        "content": {
            "application/json": {"schema": schemas.inline_schema(schemas.InferenceRequest)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_INFER_ANSWERS = {
    **errors(*INFERENCE_ERRORS),
    200: {"description": "The inference response JSON; with binary outputs, that JSON (its length in the "
                         "Inference-Header-Content-Length header) followed by the raw tensor bytes",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
}
_PARSE_INLINE_BYTES = 256 * 1024  # larger JSON parts are parsed off the event loop
_ENCODE_INLINE_VALUES = 16 * 1024  # and larger JSON tensors encoded off it


def _json_bytes(body: bytes, header_length: str | None) -> int:
    """Bytes of JSON to parse: binary tensor data after the header is only viewed, never parsed."""
    try:
        return min(len(body), max(0, int(header_length))) if header_length is not None else len(body)
    except ValueError:
        return len(body)  # the codec will refuse the header; size the work as all JSON meanwhile


def _state(request: Request) -> AppState:
    return request.app.state.archserve


# ----------------------------------------------------------------------------- health and metadata


@router.get("/v2", response_model=schemas.ServerMetadata, responses=errors(500), summary="Server metadata",
            operation_id="v2_server_metadata")
async def get_server_metadata(request: Request) -> dict:
    paths = {getattr(route, "path", None) for route in request.app.routes}
    extensions = list(EXTENSIONS) + (["model_repository"] if "/v2/repository/index" in paths else [])
    return server_metadata(request.app.version, extensions)


@router.get("/v2/health/live", response_model=schemas.LiveResponse, responses=errors(500), summary="Server live",
            operation_id="v2_server_live")
async def server_live() -> dict:
    return {"live": True}


@router.get(
    "/v2/health/ready", response_model=schemas.ReadyResponse, responses={**_READY_503, **errors(500)},
    summary="Server ready (503 until every model is)", operation_id="v2_server_ready",
)
async def server_ready(request: Request) -> JSONResponse:
    state = _state(request)
    if state.ready and not state.shutting_down:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "5"})


@router.get(
    "/v2/models/stats", response_model=schemas.StatisticsResponse, responses=errors(500, 503),
    summary="Statistics of every served model version (Triton's statistics extension)",
    operation_id="v2_all_model_statistics",
)
async def all_model_statistics(request: Request) -> dict:
    # Declared before /v2/models/{model}, which would take "stats" for a model's name.
    return {"model_stats": await request.app.state.lifecycle.statistics()}


@router.get("/v2/models/{model}", response_model=schemas.ModelMetadata, responses=_LOOKUP_ERRORS,
            summary="Model metadata", operation_id="v2_model_metadata")
async def get_model_metadata(request: Request, model: str) -> dict:
    state = _state(request)
    served = lookup(state, model, None)
    return model_metadata(served, state.models.versions(model))


@router.get(
    "/v2/models/{model}/versions/{version}", response_model=schemas.ModelMetadata, responses=_LOOKUP_ERRORS,
    summary="Model version metadata", operation_id="v2_model_version_metadata",
)
async def get_model_version_metadata(request: Request, model: str, version: str) -> dict:
    state = _state(request)
    served = lookup(state, model, version)
    return model_metadata(served, state.models.versions(model))


@router.get("/v2/models/{model}/ready", response_model=schemas.ReadyResponse, responses=_LOOKUP_ERRORS,
            summary="Model ready", operation_id="v2_model_ready")
async def model_ready(request: Request, model: str) -> dict:
    return _model_ready(request, model, None)


@router.get(
    "/v2/models/{model}/versions/{version}/ready", response_model=schemas.ReadyResponse, responses=_LOOKUP_ERRORS,
    summary="Model version ready", operation_id="v2_model_version_ready",
)
async def model_version_ready(request: Request, model: str, version: str) -> dict:
    return _model_ready(request, model, version)


def _model_ready(request: Request, model: str, version: str | None) -> dict:
    state = _state(request)
    require_ready(state)  # 503 while loading or shutting down
    lookup(state, model, version)  # 404 with what is served
    return {"ready": True}


# ----------------------------------------------------------------------------- Triton's extensions


@router.get("/v2/models/{model}/config", response_model=schemas.ModelConfig, responses=_LOOKUP_ERRORS,
            summary="Model configuration of the latest served version", operation_id="v2_model_config")
async def get_model_config(request: Request, model: str) -> dict:
    state = _state(request)
    return model_config(lookup(state, model, None), state.settings)


@router.get(
    "/v2/models/{model}/versions/{version}/config", response_model=schemas.ModelConfig, responses=_LOOKUP_ERRORS,
    summary="Model configuration of one version", operation_id="v2_model_version_config",
)
async def get_model_version_config(request: Request, model: str, version: str) -> dict:
    state = _state(request)
    return model_config(lookup(state, model, version), state.settings)


@router.get("/v2/models/{model}/stats", response_model=schemas.StatisticsResponse, responses=_LOOKUP_ERRORS,
            summary="Statistics of every served version of a model", operation_id="v2_model_statistics")
async def model_statistics(request: Request, model: str) -> dict:
    return await _statistics(request, model, None)


@router.get(
    "/v2/models/{model}/versions/{version}/stats", response_model=schemas.StatisticsResponse,
    responses=_LOOKUP_ERRORS, summary="Statistics of one model version", operation_id="v2_model_version_statistics",
)
async def model_version_statistics(request: Request, model: str, version: str) -> dict:
    return await _statistics(request, model, version)


async def _statistics(request: Request, name: str, version: str | None) -> dict:
    served = lookup(_state(request), name, version)  # 404 (503 while loading) as for metadata
    # Counted where the batchers run: here, or in the engine process (one control message, not per request).
    stats = await request.app.state.lifecycle.statistics()
    wanted = {str(served.version)} if version is not None else None
    return {"model_stats": [s for s in stats if s["name"] == name and (wanted is None or s["version"] in wanted)]}


# ----------------------------------------------------------------------------- inference


@router.post(
    "/v2/models/{model}/infer", openapi_extra=_INFER_DOC, response_model=schemas.InferenceResponse,
    responses=_INFER_ANSWERS, summary="Inference with the latest served version",
    operation_id="v2_model_infer",
)
async def infer(request: Request, model: str) -> Response:
    return await _infer(request, model, None)


@router.post(
    "/v2/models/{model}/versions/{version}/infer", openapi_extra=_INFER_DOC,
    response_model=schemas.InferenceResponse, responses=_INFER_ANSWERS,
    summary="Inference with one version", operation_id="v2_model_version_infer",
)
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await _infer(request, model, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    async def read(call: Call) -> codec.InferRequest:
        settings = call.state.settings
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedMediaTypeError(
                f"Content-Encoding {encoding!r} is not supported; send the request body uncompressed"
            )
        body = await read_limited(request, settings.max_body_bytes)
        header_length = request.headers.get(codec.HEADER_LENGTH)
        args = (body, header_length, model_io(call.served), settings.max_images_per_request, settings.max_body_bytes)
        # Off the loop only when there is much JSON to parse: the decode pool may be busy with JPEGs,
        # and raw pixels sent as binary data cost nothing to parse. A thread alone would not do: json.loads
        # holds the GIL to its end, hence share_gil.
        if _json_bytes(body, header_length) > _PARSE_INLINE_BYTES:
            return await asyncio.get_running_loop().run_in_executor(
                call.state.decode_pool, lambda: codec.parse_infer_request(*args, share_gil=True)
            )
        return codec.parse_infer_request(*args)

    async def run(call: Call, parsed: codec.InferRequest) -> Response:
        served, image = call.served, parsed.input
        if image.pixels is not None:  # N views of the request's array: the batch is the only copy
            logits = np.stack(await call.infer(list(image.pixels)))
        else:
            name = image.name
            logits = np.stack(await call.decode_and_infer(image.encoded, lambda i: f"input {name!r} element {i}"))
        encode_args = (parsed, model_io(served), served.name, str(served.version), parsed.id or call.request_id,
                       logits)
        json_tensors = any(not o.binary and not o.classification for o in parsed.outputs)
        if logits.size > _ENCODE_INLINE_VALUES and json_tensors:
            encoded = await asyncio.get_running_loop().run_in_executor(
                call.state.decode_pool, lambda: codec.encode_infer_response(*encode_args)
            )
        else:
            encoded = codec.encode_infer_response(*encode_args)
        return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers())

    return await serve(request, name, version, read, run)
