"""``GET /models``: what is served and how it runs."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..serving import lookup
from ..state import AppState
from .schemas import ModelList, ModelVersions, errors

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, responses=errors(500), summary="Every served model version",
            operation_id="list_models")
async def list_models(request: Request) -> dict:
    state: AppState = request.app.state.archserve
    return {
        "ready": state.ready,
        "models": [m.describe(state.settings) for m in sorted(state.models, key=lambda m: (m.name, m.version))],
    }


@router.get("/models/{model}", response_model=ModelVersions, responses=errors(404, 500, 503),
            summary="One model's served versions", operation_id="get_model")
async def get_model(request: Request, model: str) -> dict:
    state: AppState = request.app.state.archserve
    lookup(state, model)  # 404 with the list of served models (503 while loading)
    versions = state.models.versions(model)
    return {
        "name": model,
        "latest_version": max(versions),
        "versions": [versions[v].describe(state.settings) for v in sorted(versions)],
    }
