"""``POST /classify/{model}``: images in, top-k classes out."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ..body import ImagePart, read_images
from ..inference import ClientGone, infer, until_disconnected
from ..errors import (
    BadRequestError,
    DeadlineExceededError,
    NotFoundError,
    ServiceError,
)
from ..metrics import UNKNOWN_MODEL
from ..postprocess import top_k
from ..experiments.config import Experiment, Variant
from ..experiments.routing import choose_variant
from ..experiments.runtime import predictions_of, record, run_shadow
from ..preprocess import ALLOWED_MEDIA_TYPES, decode_for
from ..repository import ServedModel
from ..state import AppState
from ..store.records import PredictionRecord

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


def client_request_id(request: Request) -> str | None:
    """The caller's own X-Request-ID, echoed for tracing (ours stays unique: feedback keys on it)."""
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID.match(given) else None


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
    request_id = uuid.uuid4().hex
    client_id = client_request_id(request)
    metrics = state.metrics
    model_label, version_label = UNKNOWN_MODEL, ""
    code = 500
    in_flight = None
    route: Route | None = None
    try:
        state.require_ready()
        route = _route(request, state, name, version)
        served = route.served
        model_label, version_label = served.name, str(served.version)
        in_flight = metrics.child(metrics.in_flight, model_label, version_label)
        in_flight.inc()
        deadline = arrived + state.settings.request_timeout_s
        settings = state.settings
        parts = await read_images(request, settings.max_body_bytes, settings.max_images_per_request)
        body = await until_disconnected(request, _serve(state, route, parts, k, deadline, request_id))
        body["request_id"] = request_id
        if client_id is not None:
            body["client_request_id"] = client_id
        code = 200
        metrics.child(metrics.images, model_label, version_label).inc(len(body["results"]))
        headers = {"X-Request-ID": client_id or request_id}
        if route.experiment is not None:
            headers["X-Variant"] = route.variant.name
        return JSONResponse(body, headers=headers)
    except ServiceError as exc:
        code = exc.status_code
        exc.headers.setdefault("X-Request-ID", client_id or request_id)
        raise
    except ClientGone:
        code = 499  # nginx's code for it; nothing of the request is left in the queue
        return Response(status_code=499)
    finally:
        if in_flight is not None:
            in_flight.dec()
        elapsed = time.monotonic() - arrived
        metrics.child(metrics.requests, model_label, version_label, str(code)).inc()
        metrics.child(metrics.request_latency, model_label, version_label).observe(elapsed)
        if route is not None and route.experiment is not None:
            labels = (route.experiment.name, route.variant.name)
            experiment_metrics = state.experiment_metrics
            experiment_metrics.child(experiment_metrics.requests, *labels, str(code)).inc()
            experiment_metrics.child(experiment_metrics.latency, *labels).observe(elapsed)


@dataclass(frozen=True)
class Route:
    served: ServedModel
    experiment: Experiment | None = None
    variant: Variant | None = None
    shadows: tuple[tuple[Variant, ServedModel], ...] = ()


def _route(request: Request, state: AppState, name: str, version: int | None) -> Route:
    """A model, or an experiment's variant (sticky by header, else weighted random) and its shadows."""
    experiment = state.experiments.get(name)
    if experiment is None:
        return Route(state.models.get(name, version))
    if version is not None:
        raise NotFoundError(f"{name!r} is an experiment, which has no versions; POST /classify/{name}")
    key = request.headers.get(experiment.sticky_key) if experiment.sticky_key else None
    variant = choose_variant(experiment, key)
    shadows = []
    for shadow in experiment.shadows:
        try:
            shadows.append((shadow, state.models.get(shadow.model, shadow.version)))
        except NotFoundError:
            continue  # unloaded since the experiments were validated: the primary still serves
    return Route(state.models.get(variant.model, variant.version), experiment, variant, tuple(shadows))


async def _serve(
    state: AppState, route: Route, parts: list[ImagePart], k: int, deadline: float, request_id: str
) -> dict:
    settings = state.settings
    served = route.served
    if len(parts) > settings.max_images_per_request:
        raise BadRequestError(
            f"{len(parts)} images in one request, over the limit of {settings.max_images_per_request}; split it"
        )
    if k > served.manifest.output.num_classes:
        raise BadRequestError(f"top_k={k} but {served.name} has {served.manifest.output.num_classes} classes")
    loop = asyncio.get_running_loop()
    metrics = state.metrics
    preprocess_hist = metrics.child(metrics.preprocess_latency, served.name, str(served.version))

    shadow_specs = [model.preprocess for _, model in route.shadows]

    def decode(data: bytes):
        started = time.monotonic()
        try:
            return decode_for(data, served.preprocess, *shadow_specs)  # decoded once for all consumers
        finally:
            preprocess_hist.observe(time.monotonic() - started)

    if len(parts) == 1:  # the usual request: no gather future around the one decode
        decoded = [await loop.run_in_executor(state.decode_pool, decode, parts[0].data)]
    else:
        decoded = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, decode, p.data) for p in parts))
    arrays = [d[0] for d in decoded]
    if time.monotonic() > deadline:
        raise DeadlineExceededError(
            f"the request's deadline of {settings.request_timeout_s:g}s passed while decoding; "
            "retry, or send smaller images"
        )
    submitted = time.monotonic()
    logits = await infer(served, arrays, deadline, settings.request_timeout_s)
    model_latency = time.monotonic() - submitted
    results = []
    for part, row in zip(parts, logits):
        result = {"predictions": top_k(row, served.labels, k)}
        if part.filename is not None:
            result["filename"] = part.filename
        results.append(result)
    body = {
        "model": served.name,
        "version": served.version,
        "weights": served.manifest.weights.source,
        "results": results,
    }
    if route.experiment is not None:
        body = {"experiment": route.experiment.name, "variant": route.variant.name, **body}
        await _log_experiment(state, route, request_id, logits, model_latency, decoded)
    return body


async def _log_experiment(state: AppState, route: Route, request_id: str, logits, latency: float, decoded) -> None:
    """Log the primary predictions (before answering, so feedback can find them), then start the shadows."""
    now = time.time()
    primaries = []
    experiment_metrics = state.experiment_metrics
    confidence = experiment_metrics.child(experiment_metrics.confidence, route.experiment.name, route.variant.name)
    for index, row in enumerate(logits):
        top5, scores = predictions_of(row, route.served.labels)
        confidence.observe(scores[0])
        primaries.append(PredictionRecord(
            request_id=request_id, image_index=index, experiment=route.experiment.name, variant=route.variant.name,
            role="primary", model=route.served.name, version=route.served.version, top5=top5, top5_scores=scores,
            latency_s=latency, created_at=now,
        ))
    await record(state.store_writer, state.experiment_metrics, primaries)
    for position, (shadow, model) in enumerate(route.shadows, start=1):
        state.spawn(run_shadow(
            store=state.store_writer, metrics=state.experiment_metrics, experiments=state.experiments,
            experiment=route.experiment, shadow=shadow, served=model, request_id=request_id,
            arrays=[d[position] for d in decoded], primaries=primaries, timeout_s=state.settings.shadow_timeout_s,
        ))
