"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from ..metrics import exposition
from ..state import AppState
from .schemas import Liveness, Readiness, errors

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Liveness, responses=errors(500), summary="The process is up",
            operation_id="health_live")
async def live() -> dict:
    return {"status": "alive", "pid": os.getpid()}  # which worker answered: for operators and the fault tests


@router.get(
    "/health/ready", response_model=Readiness, summary="Every model is loaded and warmed up",
    responses={**errors(500), 503: {"model": Readiness, "description": "Not ready: loading, failed or shutting down",
                                    "headers": errors(503)[503]["headers"]}},
    operation_id="health_ready",
)
async def ready(request: Request) -> JSONResponse:
    state: AppState = request.app.state.archserve
    body = {"status": state.status if not state.shutting_down else "shutting_down", "ready": state.ready}
    if state.store_writer is not None:
        body["store"] = state.store_writer.status()  # degraded still serves: classification goes on
    if state.ready:
        body["models"] = [f"{m.name}/{m.version}" for m in state.models]
        body["loaded_in_s"] = round(state.loaded_in_s or 0.0, 3)
        return JSONResponse(body)
    body["reason"] = state.reason if not state.shutting_down else "the server is shutting down"
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=PlainTextResponse, responses=errors(500),
            summary="Prometheus metrics (text exposition)", operation_id="metrics")
async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.archserve
    data, content_type = exposition(state.metrics.registry)
    return Response(data, media_type=content_type)
