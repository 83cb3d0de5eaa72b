"""Experiments at run time: the current set, reloads, the prediction log and shadow runs."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batching import BatchingError, ShedError
from ..metrics import ExperimentMetrics
from ..postprocess import top_k
from ..repository import ModelTable, ServedModel
from ..store.records import PredictionRecord
from ..store.writer import StoreWriter
from .config import Experiment, ServedCheck, Variant, load_experiments

log = logging.getLogger(__name__)


def served_check_from_table(table: ModelTable) -> ServedCheck:
    def check(model: str, version: int | None) -> str | None:
        versions = table.versions(model)
        if not versions:
            return f"model {model!r} is not served; served models: {', '.join(table.names()) or 'none'}"
        if version is not None and version not in versions:
            return f"model {model!r} has no served version {version}; served: {', '.join(map(str, sorted(versions)))}"
        return None

    return check


def served_check_from_plan(plan: list[tuple[str, int]]) -> ServedCheck:
    served: dict[str, set[int]] = {}
    for name, version in plan:
        served.setdefault(name, set()).add(version)

    def check(model: str, version: int | None) -> str | None:
        if model not in served:
            return f"model {model!r} is not served; served models: {', '.join(sorted(served)) or 'none'}"
        if version is not None and version not in served[model]:
            return f"model {model!r} has no served version {version}; served: {', '.join(map(str, sorted(served[model])))}"
        return None

    return check


@dataclass
class Experiments:
    path: Path | None
    current: dict[str, Experiment] = field(default_factory=dict)
    loaded_at: float | None = None
    shed: dict[tuple[str, str], int] = field(default_factory=dict)  # (experiment, shadow) -> images shed

    def load(self, check: ServedCheck) -> dict[str, Experiment]:
        """Read and validate the file; replace the current set only if it is entirely valid."""
        if self.path is None:
            return self.current
        experiments = load_experiments(self.path, check)
        self.current = experiments
        self.loaded_at = time.time()
        return experiments

    def get(self, name: str) -> Experiment | None:
        return self.current.get(name)


def predictions_of(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> tuple[tuple[int, ...], tuple[float, ...]]:
    best = top_k(logits, labels, k)
    return tuple(p["index"] for p in best), tuple(p["score"] for p in best)


async def record(writer: StoreWriter | None, metrics: ExperimentMetrics, records: list[PredictionRecord]) -> None:
    """Write to the prediction log; a failing store never fails the request (records are buffered)."""
    if writer is None or not records:
        return
    if not await writer.write(records):
        metrics.store_errors.inc()


async def run_shadow(
    *,
    store: StoreWriter | None,
    metrics: ExperimentMetrics,
    experiments: Experiments,
    experiment: Experiment,
    shadow: Variant,
    served: ServedModel,
    request_id: str,
    arrays: list[np.ndarray],
    primaries: list[PredictionRecord],
    timeout_s: float,
) -> None:
    """Run one shadow variant on the request's images at low priority and record the comparison."""
    labels = (experiment.name, shadow.name)
    started = time.monotonic()
    try:
        logits = await served.batcher.submit_many(arrays, deadline=started + timeout_s, priority="low")
    except ShedError:
        metrics.shadow_images.labels(*labels, "shed").inc(len(arrays))
        key = (experiment.name, shadow.name)
        experiments.shed[key] = experiments.shed.get(key, 0) + len(arrays)
        return
    except (BatchingError, asyncio.CancelledError) as exc:
        metrics.shadow_images.labels(*labels, "failed").inc(len(arrays))
        if isinstance(exc, asyncio.CancelledError):
            raise
        log.info("shadow %s of %s failed: %s", shadow.name, experiment.name, exc)
        return
    latency = time.monotonic() - started
    metrics.shadow_images.labels(*labels, "done").inc(len(arrays))
    now = time.time()
    records = []
    for index, (row, primary) in enumerate(zip(logits, primaries)):
        top5, scores = predictions_of(row, served.labels)
        records.append(PredictionRecord(
            request_id=request_id, image_index=index, experiment=experiment.name, variant=shadow.name,
            role="shadow", model=served.name, version=served.version, top5=top5, top5_scores=scores,
            latency_s=latency, created_at=now,
        ))
        metrics.shadow_agreement.labels(*labels, str(top5[0] == primary.top5[0]).lower()).inc()
        metrics.shadow_overlap.labels(*labels).observe(len(set(top5) & set(primary.top5)) / max(len(primary.top5), 1))
        metrics.shadow_latency_difference.labels(*labels).observe(latency - primary.latency_s)
    await record(store, metrics, records)
