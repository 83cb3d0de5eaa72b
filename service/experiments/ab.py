"""A/B at request time: which variant serves a request, its prediction log, and its shadows.

The data plane (``service.serving``) calls ``route`` when a request names an
experiment, and ``record_and_shadow`` once the serving variant has answered.
Everything an experiment records about a request is built here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NotFoundError, ServiceError, ShedError
from ..metrics import ExperimentMetrics
from ..models.served import ModelTable, ServedModel, top_k
from ..store.records import PredictionRecord, Role
from ..store.writer import StoreWriter
from .config import Experiment, Variant
from .routing import choose_variant

if TYPE_CHECKING:
    from ..state import AppState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """The variant serving one request of an experiment, and the shadows that run beside it."""

    experiment: Experiment
    variant: Variant
    served: ServedModel
    shadows: tuple[tuple[Variant, ServedModel], ...] = ()
    identical: tuple[Variant, ...] = ()  # shadows skipped: the very model version that serves the request


def route(models: ModelTable, experiment: Experiment, key: str | None) -> Route:
    """The variant (sticky by ``key``, else weighted random) and the shadows still served, less those that
    would run the serving model version again (their "comparison" would be the model with itself)."""
    variant = choose_variant(experiment, key)
    served = models.get(variant.model, variant.version)
    shadows, identical = [], []
    for shadow in experiment.shadows:
        try:
            model = models.get(shadow.model, shadow.version)
        except NotFoundError:
            continue  # unloaded since the experiments were validated: the primary still serves
        # Compared as resolved: "googlenet" (latest) and "googlenet@1" are the same run when 1 is the latest.
        if (model.name, model.version) == (served.name, served.version):
            identical.append(shadow)
        else:
            shadows.append((shadow, model))
    return Route(experiment, variant, served, tuple(shadows), tuple(identical))


def observe_request(metrics: ExperimentMetrics, route: Route, code: int, elapsed_s: float) -> None:
    labels = (route.experiment.name, route.variant.name)
    metrics.child(metrics.requests, *labels, str(code)).inc()
    metrics.child(metrics.latency, *labels).observe(elapsed_s)
    counts = metrics.answers.setdefault(labels, [0, 0])
    counts[0] += 1
    counts[1] += code >= 500  # 5xx, the deadline's 504 included: what the error_rate guardrail counts
    metrics.child(metrics.variant_model, *labels, route.served.name, str(route.served.version)).set(1)


async def record_and_shadow(
    state: AppState, route: Route, request_id: str, logits: list[np.ndarray], latency_s: float,
    shadow_arrays: list[list[np.ndarray]],
) -> None:
    """Log the primary predictions (before answering, so feedback can find them), then start the shadows,
    each on its own decoded copy of the images, in the background at low priority."""
    metrics: ExperimentMetrics = state.experiment_metrics
    confidence = metrics.child(metrics.confidence, route.experiment.name, route.variant.name)
    primaries = _records(route.experiment, route.variant, route.served, "primary", request_id, logits, latency_s)
    for primary in primaries:
        confidence.observe(primary.top5_scores[0])
    await _write(state.store_writer, metrics, primaries)
    for shadow in route.identical:  # counted, so a dashboard shows why such a shadow runs less often
        metrics.shadow_images.labels(route.experiment.name, shadow.name, "skipped_identical").inc(len(logits))
    for (shadow, model), arrays in zip(route.shadows, shadow_arrays):
        state.spawn(_run_shadow(state, route.experiment, shadow, model, request_id, arrays, primaries))


def _records(
    experiment: Experiment, variant: Variant, served: ServedModel, role: Role, request_id: str,
    logits: list[np.ndarray], latency_s: float,
) -> list[PredictionRecord]:
    now = time.time()
    records = []
    for index, row in enumerate(logits):
        best = top_k(row, served.labels, 5)
        records.append(PredictionRecord(
            request_id=request_id, image_index=index, experiment=experiment.name, variant=variant.name, role=role,
            model=served.name, version=served.version, top5=tuple(p["index"] for p in best),
            top5_scores=tuple(p["score"] for p in best), latency_s=latency_s, created_at=now,
        ))
    return records


async def _write(writer: StoreWriter | None, metrics: ExperimentMetrics, records: list[PredictionRecord]) -> None:
    """Write to the prediction log; a failing store never fails the request (records are buffered)."""
    if writer is None or not records:
        return
    started = time.monotonic()
    stored = await writer.write(records)
    metrics.store_write_wait.observe(time.monotonic() - started)
    if not stored:
        metrics.store_errors.inc()


async def _run_shadow(
    state: AppState, experiment: Experiment, shadow: Variant, served: ServedModel, request_id: str,
    arrays: list[np.ndarray], primaries: list[PredictionRecord],
) -> None:
    """Run one shadow variant on the request's images at low priority and record the comparison."""
    metrics: ExperimentMetrics = state.experiment_metrics
    labels = (experiment.name, shadow.name)
    started = time.monotonic()
    try:
        logits = await served.batcher.submit_many(
            arrays, deadline=started + state.settings.shadow_timeout_s, priority="low"
        )
    except ShedError:
        metrics.shadow_images.labels(*labels, "shed").inc(len(arrays))
        shed = state.experiments.shed
        shed[labels] = shed.get(labels, 0) + len(arrays)
        return
    except (ServiceError, asyncio.CancelledError) as exc:
        metrics.shadow_images.labels(*labels, "failed").inc(len(arrays))
        if isinstance(exc, asyncio.CancelledError):
            raise
        log.info("shadow %s of %s failed: %s", shadow.name, experiment.name, exc)
        return
    latency = time.monotonic() - started
    metrics.shadow_images.labels(*labels, "done").inc(len(arrays))
    records = _records(experiment, shadow, served, "shadow", request_id, logits, latency)
    for record, primary in zip(records, primaries):
        metrics.shadow_agreement.labels(*labels, str(record.top5[0] == primary.top5[0]).lower()).inc()
        metrics.shadow_overlap.labels(*labels).observe(
            len(set(record.top5) & set(primary.top5)) / max(len(primary.top5), 1)
        )
        metrics.shadow_latency_difference.labels(*labels).observe(latency - primary.latency_s)
    await _write(state.store_writer, metrics, records)
