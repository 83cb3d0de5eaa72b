"""The Open Inference Protocol's model repository extension: index, load, unload (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..models.lifecycle import Lifecycle
from ..split.client import RemoteLifecycle
from .admin import RESTART_HINT, is_admin, require_admin, require_single_worker
from .schemas import ADMIN_ERRORS, ModelLoaded, ModelUnloaded, RepositoryEntry, errors

router = APIRouter(tags=["model repository"])
# What anyone may see of the index; paths and load errors (which quote paths and library internals) need the token.
_PUBLIC_FIELDS = ("name", "version", "state")


def _lifecycle(request: Request) -> Lifecycle | RemoteLifecycle:
    return request.app.state.lifecycle


@router.post(
    "/v2/repository/index",
    summary="Every model version in the repository and its state (with the admin token: its path and why it "
    "is not loaded)",
    response_model=list[RepositoryEntry], response_model_exclude_unset=True,  # no null path for the public
    responses=errors(401, 403, 500, 503), operation_id="v2_repository_index",
)
async def index(request: Request) -> list[dict]:
    admin = is_admin(request)  # a bad token is refused before any work
    entries = await _lifecycle(request).repository_index()
    if admin:
        return entries
    return [{key: entry[key] for key in _PUBLIC_FIELDS if key in entry} for entry in entries]


@router.post(
    "/v2/repository/models/{model}/load", response_model=ModelLoaded,
    summary="Load (or reload) a model (admin token required)", operation_id="v2_repository_model_load",
    responses=errors(400, 404, *ADMIN_ERRORS, s400="Not a model name, a folder the repository refuses, or a "
                     "version that does not load: the message says why (bad_request, model_load_failed)",
                     s404="No such model in the repository (not_found)"),
)
async def load(request: Request, model: str) -> dict:
    require_admin(request)
    require_single_worker(
        request, f"loading {model!r}",
        RESTART_HINT + " (new versions also reach every worker on its own, every ARCHSERVE_POLL_INTERVAL_S)",
    )
    lifecycle = _lifecycle(request)
    await lifecycle.load(model)
    versions = sorted(lifecycle.state.models.versions(model))
    return {"name": model, "versions": [str(v) for v in versions], "state": "READY"}


@router.post(
    "/v2/repository/models/{model}/unload", response_model=ModelUnloaded,
    summary="Stop serving a model (admin token required)", operation_id="v2_repository_model_unload",
    responses=errors(400, 404, *ADMIN_ERRORS, s400="Not a model name, or a folder the repository refuses "
                     "(bad_request)", s404="No such model, or it is not served (not_found)"),
)
async def unload(request: Request, model: str) -> dict:
    require_admin(request)
    require_single_worker(
        request, f"unloading {model!r}",
        "to stop serving it on every worker, restart the server without it in ARCHSERVE_MODELS",
    )
    versions = await _lifecycle(request).unload(model)
    return {"name": model, "unloaded_versions": [str(v) for v in versions], "state": "UNAVAILABLE"}
