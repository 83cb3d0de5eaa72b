"""Experiments: listing, reload (admin), feedback, and the comparison report."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from ..errors import BadRequestError, NotFoundError, ServiceError, ServiceUnavailableError
from ..experiments.config import Experiment, ExperimentConfigError
from ..experiments.cost import add_cost, measured_compute, variant_models
from ..experiments.report import build_report
from ..experiments.guardrails_html import with_guardrails
from ..experiments.report_html import render_report_html
from ..experiments.runtime import served_check_from_table
from ..state import AppState
from .admin import require_admin, require_single_worker
from .schemas import (
    ADMIN_ERRORS, ExperimentDescription, ExperimentList, ExperimentReport, ExperimentsReloaded, FeedbackRecorded,
    errors,
)
from ..store.base import ConflictingFeedbackError, StoreError, UnknownRequestError

router = APIRouter(tags=["experiments"])
log = logging.getLogger(__name__)


class ConflictError(ServiceError):
    status_code = 409
    code = "conflict"


def _state(request: Request) -> AppState:
    return request.app.state.archserve


def _experiment(state: AppState, name: str) -> Experiment:
    experiment = state.experiments.get(name)
    if experiment is None:
        known = ", ".join(sorted(state.experiments.current)) or "none"
        raise NotFoundError(f"no experiment {name!r}; experiments: {known}. See GET /experiments")
    return experiment


def _describe(state: AppState, experiment: Experiment) -> dict:
    body = experiment.describe()
    for entry in body["variants"] + body["shadows"]:
        versions = state.models.versions(entry["model"])
        entry["served_version"] = entry["version"] or (max(versions) if versions else None)
    return body


@router.get("/experiments", response_model=ExperimentList, responses=errors(500), summary="Every experiment",
            operation_id="list_experiments")
async def list_experiments(request: Request) -> dict:
    state = _state(request)
    return {
        "experiments_file": str(state.settings.experiments_file) if state.settings.experiments_file else None,
        "loaded_at": state.experiments.loaded_at,
        "experiments": [_describe(state, e) for _, e in sorted(state.experiments.current.items())],
    }


@router.get("/experiments/{name}", response_model=ExperimentDescription, responses=errors(404, 500),
            summary="One experiment's definition", operation_id="get_experiment")
async def get_experiment(request: Request, name: str) -> dict:
    state = _state(request)
    return _describe(state, _experiment(state, name))


@router.post(
    "/experiments/reload", response_model=ExperimentsReloaded, operation_id="reload_experiments",
    summary="Re-read the experiments file (admin token required)",
    responses=errors(400, *ADMIN_ERRORS, s400="No experiments file, or it is invalid: the previous experiments "
                     "stay (bad_request)"),
)
async def reload_experiments(request: Request) -> dict:
    require_admin(request)
    state = _state(request)
    require_single_worker(request, "reloading the experiments file")
    if state.settings.experiments_file is None:
        raise BadRequestError("no experiments file is configured; set ARCHSERVE_EXPERIMENTS_FILE and restart")
    try:
        loaded = state.experiments.load(served_check_from_table(state.models))
    except ExperimentConfigError as exc:
        raise BadRequestError(f"the experiments file was not applied, the previous experiments stay: {exc}") from exc
    client = request.app.state.engine_client
    if client is not None:  # every other front-end re-reads the file too, through the engine
        await client.admin("reload_experiments", timeout=30.0)
    return {"reloaded": True, "experiments": sorted(loaded)}


def install_reload_signal(app: FastAPI) -> None:
    """SIGHUP re-reads the experiments file, like POST /experiments/reload."""
    state: AppState = app.state.archserve
    if state.settings.experiments_file is None:
        return

    client = app.state.engine_client
    if client is not None:
        client.on_reload_experiments = lambda: reload("relayed by the engine")

    def reload(why: str = "on SIGHUP") -> None:
        try:
            state.experiments.load(served_check_from_table(state.models))
            log.info("experiments reloaded %s: %s", why, ", ".join(sorted(state.experiments.current)))
        except ExperimentConfigError as exc:
            log.error("experiments reload %s refused, previous experiments kept: %s", why, exc)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests) or no SIGHUP
        pass


class Feedback(BaseModel):
    request_id: str = Field(min_length=1, max_length=128)
    label: int | str = Field(description="The true class: its index or its name.")
    image_index: int = Field(0, ge=0, description="Which image of a multi-image request (default the first).")


@router.post(
    "/feedback", response_model=FeedbackRecorded, operation_id="send_feedback",
    summary="The true label of a classified image (for experiment accuracy)",
    responses=errors(400, 404, 409, 500, 503, s404="No logged prediction for that request id and image, or no "
                     "experiments (not_found)", s409="A different label was already recorded (conflict)",
                     s503="The experiment store is unavailable: retry after Retry-After seconds (unavailable)"),
)
async def feedback(request: Request, body: Feedback) -> dict:
    state = _state(request)
    if state.store is None:
        raise NotFoundError("no experiments are configured, so no predictions are logged for feedback")
    try:
        primary = await asyncio.to_thread(state.store.find_primary, body.request_id, body.image_index)
    except StoreError as exc:
        raise ServiceUnavailableError(
            f"the experiment store is unavailable, so feedback cannot be recorded now; retry later ({exc})",
            retry_after_s=10,
        ) from exc
    if primary is None and state.store_writer is not None:
        primary = state.store_writer.find_pending(body.request_id, body.image_index)
    if primary is None:
        raise NotFoundError(
            f"no logged prediction for request id {body.request_id!r} (image {body.image_index}); only requests "
            f"to experiments are logged, and only for {state.settings.store_retention_days:g} days"
        )
    label = _label_index(state, primary.model, primary.version, body.label)
    try:
        outcome = await asyncio.to_thread(state.store.add_feedback, body.request_id, body.image_index, label, time.time())
    except UnknownRequestError as exc:
        raise NotFoundError(str(exc)) from exc
    except ConflictingFeedbackError as exc:
        raise ConflictError(str(exc)) from exc
    except StoreError as exc:
        raise ServiceUnavailableError(
            f"the experiment store is unavailable, so feedback cannot be recorded now; retry later ({exc})",
            retry_after_s=10,
        ) from exc
    if outcome == "created":
        labels = (primary.experiment, primary.variant)
        state.experiment_metrics.feedback.labels(*labels).inc()
        if primary.top5 and primary.top5[0] == label:
            state.experiment_metrics.feedback_correct.labels(*labels, "1").inc()
        if label in primary.top5:
            state.experiment_metrics.feedback_correct.labels(*labels, "5").inc()
    return {
        "status": outcome,
        "request_id": body.request_id,
        "image_index": body.image_index,
        "label": label,
        "experiment": primary.experiment,
        "variant": primary.variant,
        "top1_correct": bool(primary.top5) and primary.top5[0] == label,
        "top5_correct": label in primary.top5,
    }


def _label_index(state: AppState, model: str, version: int, label: int | str) -> int:
    versions = state.models.versions(model)
    served = versions.get(version) or (versions[max(versions)] if versions else None)
    names = list(served.manifest.labels) if served is not None else None
    if isinstance(label, int):
        if label < 0 or (names is not None and label >= len(names)):
            raise BadRequestError(f"label index {label} is out of range for {model} ({len(names or [])} classes)")
        return label
    if names is None:
        raise BadRequestError(f"{model} is no longer served, so its label names are unknown; send the class index")
    try:
        return names.index(label)
    except ValueError:
        raise BadRequestError(
            f"{label!r} is not a class of {model}; send the class index or one of its label names "
            "(see the labels in the model's manifest)"
        ) from None


async def _report(state: AppState, name: str, keeper=None) -> dict:
    experiment = _experiment(state, name)
    if state.store is None:
        raise NotFoundError("no experiment store is configured")
    try:
        data = await asyncio.to_thread(state.store.experiment_data, name)
    except StoreError as exc:
        raise ServiceUnavailableError(f"the experiment store is unavailable; retry later ({exc})", 10) from exc
    data.shadow_shed = {s: n for (e, s), n in state.experiments.shed.items() if e == name}
    labels = {}
    for variant in (*experiment.variants, *experiment.shadows):
        versions = state.models.versions(variant.model)
        if versions:
            served = versions.get(variant.version) if variant.version else versions[max(versions)]
            if served is not None:
                labels[variant.name] = list(served.manifest.labels)
    report = build_report(
        data,
        variants=[v.name for v in experiment.variants],
        shadows=[s.name for s in experiment.shadows],
        labels=labels,
    )
    if keeper is not None:
        report["guardrails"] = await asyncio.to_thread(keeper.report_block, name)
    measured = measured_compute(state.metrics.registry)
    add_cost(report, variant_models(state.models, list(experiment.variants)), measured)
    if experiment.bandit is not None:  # the posteriors of the data just read: the report and the shares agree
        experiment.bandit.update(data, time.time())
    report["bandit"] = experiment.bandit.describe() if experiment.bandit is not None else None
    return report


_REPORT_ERRORS = errors(404, 500, 503, s404="No such experiment, or no experiment store (not_found)",
                        s503="The experiment store is unavailable: retry after Retry-After seconds (unavailable)")


@router.get("/experiments/{name}/report", response_model=ExperimentReport, responses=_REPORT_ERRORS,
            summary="The comparison, with confidence intervals and a verdict", operation_id="experiment_report")
async def report(request: Request, name: str) -> dict:
    return await _report(_state(request), name, request.app.state.guardrails)


@router.get("/experiments/{name}/report.html", response_class=HTMLResponse, responses=_REPORT_ERRORS,
            summary="The report as a page", operation_id="experiment_report_html")
async def report_html(request: Request, name: str) -> HTMLResponse:
    report = await _report(_state(request), name, request.app.state.guardrails)
    return HTMLResponse(with_guardrails(render_report_html(report), report.get("guardrails")))
