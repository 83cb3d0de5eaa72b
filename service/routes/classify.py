"""``POST /classify/{model}``: images in, top-k classes out."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from .. import batching
from ..body import ImagePart, read_images
from ..errors import (
    BadRequestError,
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
    ServiceError,
    ServiceUnavailableError,
)
from ..metrics import UNKNOWN_MODEL
from ..postprocess import top_k
from ..preprocess import ALLOWED_MEDIA_TYPES, decode_image
from ..repository import ServedModel
from ..state import AppState

router = APIRouter(tags=["classify"])
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or multipart/form-data with one or more image files.",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(set(ALLOWED_MEDIA_TYPES))},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {
                    "type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
        },
    }
}


def request_id_of(request: Request) -> str:
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


@router.post("/classify/{model}", openapi_extra=_BODY_DOC, summary="Classify images with the latest served version")
async def classify(request: Request, model: str, top_k_: int = Query(5, alias="top_k", ge=1, le=1000)):
    return await _classify(request, model, None, top_k_)


@router.post(
    "/classify/{model}/versions/{version}", openapi_extra=_BODY_DOC, summary="Classify images with one version"
)
async def classify_version(
    request: Request, model: str, version: int, top_k_: int = Query(5, alias="top_k", ge=1, le=1000)
):
    return await _classify(request, model, version, top_k_)


async def _classify(request: Request, name: str, version: int | None, k: int) -> JSONResponse:
    state: AppState = request.app.state.archserve
    arrived = time.monotonic()
    request_id = request_id_of(request)
    model_label, version_label = UNKNOWN_MODEL, ""
    code = 500
    in_flight = None
    try:
        state.require_ready()
        served = state.models.get(name, version)
        model_label, version_label = served.name, str(served.version)
        in_flight = state.metrics.in_flight.labels(model_label, version_label)
        in_flight.inc()
        deadline = arrived + state.settings.request_timeout_s
        settings = state.settings
        parts = await read_images(request, settings.max_body_bytes, settings.max_images_per_request)
        body = await _until_disconnected(request, _serve(state, served, parts, k, deadline))
        body["request_id"] = request_id
        code = 200
        state.metrics.images.labels(model_label, version_label).inc(len(body["results"]))
        return JSONResponse(body, headers={"X-Request-ID": request_id})
    except ServiceError as exc:
        code = exc.status_code
        exc.headers.setdefault("X-Request-ID", request_id)
        raise
    except ClientGone:
        code = 499  # nginx's code for it; nothing of the request is left in the queue
        return Response(status_code=499)
    finally:
        if in_flight is not None:
            in_flight.dec()
        state.metrics.requests.labels(model_label, version_label, str(code)).inc()
        state.metrics.request_latency.labels(model_label, version_label).observe(time.monotonic() - arrived)


async def _serve(state: AppState, served: ServedModel, parts: list[ImagePart], k: int, deadline: float) -> dict:
    settings = state.settings
    if len(parts) > settings.max_images_per_request:
        raise BadRequestError(
            f"{len(parts)} images in one request, over the limit of {settings.max_images_per_request}; split it"
        )
    if k > served.manifest.output.num_classes:
        raise BadRequestError(f"top_k={k} but {served.name} has {served.manifest.output.num_classes} classes")
    loop = asyncio.get_running_loop()
    preprocess_hist = state.metrics.preprocess_latency.labels(served.name, str(served.version))

    def decode(data: bytes):
        started = time.monotonic()
        try:
            return decode_image(data, served.preprocess)
        finally:
            preprocess_hist.observe(time.monotonic() - started)

    arrays = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, decode, p.data) for p in parts))
    if time.monotonic() > deadline:
        raise DeadlineExceededError(
            f"the request's deadline of {settings.request_timeout_s:g}s passed while decoding; "
            "retry, or send smaller images"
        )
    try:
        logits = await served.batcher.submit_many(list(arrays), deadline=deadline)
    except batching.QueueFullError as exc:
        raise QueueFullError(
            f"{served.name} v{served.version} has {served.batcher.queue_depth} images queued, at its limit; "
            "retry after a moment"
        ) from exc
    except batching.DeadlineExceededError as exc:
        raise DeadlineExceededError(
            f"no result within the request deadline of {settings.request_timeout_s:g}s; the server is overloaded, "
            "retry later"
        ) from exc
    except batching.BatcherClosedError as exc:
        raise ServiceUnavailableError("the model is shutting down; retry on another replica") from exc
    except batching.BatchFailedError as exc:
        raise InferenceError(f"inference failed for {served.name} v{served.version}: {exc.__cause__ or exc}") from exc
    results = []
    for part, row in zip(parts, logits):
        result = {"predictions": top_k(row, served.labels, k)}
        if part.filename is not None:
            result["filename"] = part.filename
        results.append(result)
    return {
        "model": served.name,
        "version": served.version,
        "weights": served.manifest.weights.source,
        "results": results,
    }


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _until_disconnected(request: Request, work):
    """Run ``work``; if the client disconnects first, cancel it (its images leave the queue)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # Called once the body has been read, so the next message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
