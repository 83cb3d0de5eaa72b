"""The models being served: loaded from the model repository, each with its engine and batcher."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelrepo.manifest import Manifest, load_manifest

from ..errors import NotFoundError, ServiceError
from ..images.preprocess import PreprocessSpec
from ..metrics import Metrics, ModelMetrics, multiprocess_dir
from ..settings import Settings
from .batching import BatchStats, Batcher
from .engine import CUDA, EngineConfig, ModelLoadError, OnnxEngine, batch_runner, null_runner, verify_files
from .placement import place
from .repository import Repository

log = logging.getLogger(__name__)


def _pair() -> list[int]:
    return [0, 0]


def _duration(pair: list[int]) -> dict:
    return {"count": pair[0], "ns": pair[1]}  # Triton's $duration_stat


@dataclass(eq=False, slots=True)
class InferenceStatistics:
    """Triton's statistics extension for one served version since it loaded, counted where its batcher runs (a
    worker, or the engine process). A request is one call of the batcher (a request's images, or a shadow's);
    it may span batches, and is then counted in ``queue`` and ``compute_infer`` once for each batch it ran in.
    Updated on the event loop only (requests end there, ``on_batch`` runs there): no lock."""

    success: list[int] = field(default_factory=_pair)  # [count, ns]: requests answered, submit to result
    fail: list[int] = field(default_factory=_pair)  # refused, expired, failed or abandoned by their caller
    queue: list[int] = field(default_factory=_pair)  # submit to dispatch, per request and batch
    compute_infer: list[int] = field(default_factory=_pair)  # its batch's run (stacking the inputs included)
    inference_count: int = 0  # images in successful batches
    execution_count: int = 0  # successful batches
    last_inference_ms: int = 0  # when the last request ended, ms since the epoch
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, ns] of successful runs

    def request_ended(self, started_ns: int, ok: bool) -> None:
        pair = self.success if ok else self.fail
        pair[0] += 1
        pair[1] += time.monotonic_ns() - started_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def batch_ran(self, stats: BatchStats) -> None:
        if not stats.ok:  # its requests fail, and are counted there
            return
        run_ns = int(stats.run_s * 1e9)
        requests = len(stats.request_waits_s)
        self.queue[0] += requests
        self.queue[1] += int(sum(stats.request_waits_s) * 1e9)
        self.compute_infer[0] += requests
        self.compute_infer[1] += run_ns * requests  # each request waited for the whole run
        self.inference_count += stats.size
        self.execution_count += 1
        by_size = self.batches.setdefault(stats.size, [0, 0])
        by_size[0] += 1
        by_size[1] += run_ns

    def model_stat(self, name: str, version: int) -> dict:
        """Triton's ``$model_stat``. compute_input and compute_output are not timed apart from the run (count 0,
        "never collected"); there is no response cache (cache_hit and cache_miss 0)."""
        none = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(self.success), "fail": _duration(self.fail), "queue": _duration(self.queue),
                "compute_input": none, "compute_infer": _duration(self.compute_infer), "compute_output": none,
                "cache_hit": none, "cache_miss": none,
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": none, "compute_infer": _duration(pair), "compute_output": none}
                for size, pair in sorted(self.batches.items())
            ],
        }


class CountingBatcher(Batcher):
    """A Batcher counting each request in ``statistics`` as it ends (Triton's success and fail): every
    ``submit``, ``submit_many`` and ``run_now``, and a request ``check_admission`` refuses."""

    def __init__(self, *args, statistics: InferenceStatistics, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.statistics = statistics

    def submit(self, item, **kwargs):
        return self._counted(super().submit(item, **kwargs))

    def submit_many(self, items, **kwargs):
        return self._counted(super().submit_many(items, **kwargs))

    def run_now(self, prepare, **kwargs):
        prepared = []  # once ``prepare`` returned (a bad image raises in it, as in a decode before ``submit``)

        def prepare_then_note():
            item = prepare()
            prepared.append(True)
            return item

        return self._counted(super().run_now(prepare_then_note, **kwargs), reached=prepared)

    async def _counted(self, work, reached: list | None = None):
        started, ok = time.monotonic_ns(), False
        try:
            result = await work
            ok = True
            return result
        finally:  # cancelled too: the caller left, nothing was answered
            if reached is None or reached:  # a request that never reached the model is not the model's
                self.statistics.request_ended(started, ok)

    def check_admission(self, count: int = 1) -> None:
        try:
            super().check_admission(count)
        except ServiceError:  # refused before it was submitted: a failed request all the same
            self.statistics.request_ended(time.monotonic_ns(), False)
            raise


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    manifest: Manifest
    engine: OnnxEngine
    batcher: Batcher
    preprocess: PreprocessSpec
    instances: int
    labels: np.ndarray = field(repr=False)
    metrics: ModelMetrics = field(repr=False)
    padded_sizes: list[int] | None = None  # batches are padded up to one of these sizes
    statistics: InferenceStatistics = field(default_factory=InferenceStatistics, repr=False)  # its batcher's
    reported: bool = field(default=False, repr=False)  # in archserve_model_info

    async def start(self, metrics: Metrics) -> None:
        """Warm up and start the batcher; only then is the model reported in ``archserve_model_info``."""
        await self.batcher.start()
        metrics.model_info.labels(*self._info_labels()).set(1)
        self.reported = True

    def withdraw_info(self, metrics: Metrics) -> None:
        """No longer report the model in ``archserve_model_info`` (harmless if it never was). With several
        workers prometheus-client cannot remove a series (its value stays in the worker's file), so it goes to 0,
        and leaves the scrape when the worker exits."""
        if not self.reported:
            return
        self.reported = False
        if multiprocess_dir():
            metrics.model_info.labels(*self._info_labels()).set(0)
            return
        with contextlib.suppress(KeyError):
            metrics.model_info.remove(*self._info_labels())

    def _info_labels(self) -> tuple[str, ...]:
        m = self.manifest
        return self.name, str(self.version), m.architecture, self.engine.precision, self.engine.provider, m.weights.source

    def describe(self, settings: Settings) -> dict:
        m = self.manifest
        weights = m.weights.model_dump(mode="json")
        return {
            "name": self.name,
            "version": self.version,
            "architecture": m.architecture,
            "family": m.family,
            "input": {"name": m.input.name, "layout": m.input.layout, "dtype": m.input.dtype,
                      "shape": list(m.input.shape)},
            "preprocessing": m.preprocessing.model_dump(mode="json"),
            "num_classes": m.output.num_classes,
            "precision": self.engine.precision,
            "provider": self.engine.provider,
            "precisions_available": sorted(m.files),
            "batching": {
                "max_batch_size": settings.max_batch_size,
                "max_queue_delay_ms": settings.max_queue_delay_ms,
                "max_queue_size": settings.max_queue_size,
                "instances": self.instances,
                "padded_sizes": self.padded_sizes,
                "sessions": self.engine.sessions,
                "cpu_lanes": self.engine.lanes,
                "lane_threads": self.engine.lane_threads,
            },
            "params": m.complexity.params,
            "gflops": m.complexity.gflops,
            "weights": weights,
            "random_init": m.weights.source == "random-init",
            "parity": m.parity.model_dump(mode="json"),
            "created_at": m.created_at.isoformat(),
        }


def _parse_selection(entries: list[str]) -> dict[str, int | None]:
    selection: dict[str, int | None] = {}
    for entry in entries:
        name, _, version = entry.partition("@")
        if version and not version.isdigit():
            raise ModelLoadError(f"ARCHSERVE_MODELS entry {entry!r}: the version after @ must be a positive integer")
        selection[name] = int(version) if version else None
    return selection


def plan_versions(settings: Settings) -> list[tuple[str, int]]:
    """Which (model, version) pairs to serve, or an error that says what is wrong."""
    repository = Repository(settings)
    root = settings.models_dir
    available = repository.model_names()
    if not available:
        raise ModelLoadError(
            f"no models in {root}/: export some first (`make models` or "
            f"`python -m export --models resnet18 --out {root}`){repository.refused_note()}"
        )
    selection = _parse_selection(settings.models) or {name: None for name in available}
    plan = []
    for name, pinned in selection.items():
        versions = repository.versions(name) if name in available else []
        if not versions:
            raise ModelLoadError(
                f"model {name!r} is not in {root}/; it holds: {', '.join(available)}{repository.refused_note()}"
            )
        if pinned is not None:
            if pinned not in versions:
                raise ModelLoadError(
                    f"model {name!r} has no version {pinned} in {root}/; versions: {', '.join(map(str, versions))}"
                    f"{repository.refused_note()}"
                )
            plan.append((name, pinned))
        elif settings.version_policy == "all":
            plan.extend((name, v) for v in versions)
        else:
            plan.append((name, versions[-1]))
    return plan


def load_model(name: str, version: int, settings: Settings, metrics: Metrics) -> ServedModel:
    """Read and verify a version folder, open its engine, place it (``placement``) and give it a batcher."""
    path = Repository(settings).version_dir(name, version)
    try:
        manifest = load_manifest(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: the manifest is invalid: {exc}") from exc
    if manifest.name != name or manifest.version != version:
        raise ModelLoadError(
            f"{path}: the manifest says {manifest.name} v{manifest.version}; it must match its folder"
        )
    verify_files(path, manifest)
    config = EngineConfig(
        device=settings.device,
        device_id=settings.device_id,
        cuda_mem_limit_bytes=int(settings.cuda_mem_limit_gb * 1024**3),
        cudnn_exhaustive=settings.cudnn_exhaustive,
        intra_op_threads=settings.intra_op_threads,
    )
    engine = OnnxEngine(path, manifest, config)
    if settings.require_gpu and engine.provider != CUDA:
        raise ModelLoadError(
            f"require_gpu is set but {name} v{version} runs on {engine.provider}: the CUDA provider did not load "
            "(no GPU, or CUDA/cuDNN libraries missing; see the log)"
        )
    placed = place(engine, settings, f"{name} v{version}")
    labels = (name, str(version))
    null = settings.null_engine
    statistics = InferenceStatistics()
    batcher = CountingBatcher(
        null_runner(manifest.output.num_classes) if null else batch_runner(engine, placed.padded_sizes),
        run_alone=batch_runner(engine, placed.padded_sizes, alone=True) if placed.lanes > 1 and not null else None,
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        instances=placed.instances,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue_wait_ms=settings.max_queue_wait_ms,
        name=f"{name}/{version}",
        statistics=statistics,
        on_batch=_batch_observer(metrics, statistics, *labels),
        on_queue_depth=metrics.queue_depth.labels(*labels).set,
        on_expired=metrics.expired.labels(*labels).inc,
        # Every batch size, in each thread that will run batches (the batcher's start awaits it).
        warmup=(lambda: engine.warmup(placed.warmup_sizes)) if settings.warmup and not null else None,
    )
    return ServedModel(
        name=name, version=version, path=path, manifest=manifest, engine=engine, batcher=batcher,
        preprocess=PreprocessSpec(
            resize=manifest.preprocessing.resize, crop=manifest.preprocessing.crop,
            interpolation=manifest.preprocessing.interpolation, max_pixels=settings.max_image_pixels,
        ),
        instances=placed.instances,
        padded_sizes=placed.padded_sizes,
        statistics=statistics,
        labels=np.asarray(manifest.labels, dtype=object),
        metrics=ModelMetrics.of(metrics, *labels),
    )


def top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> list[dict]:
    """The ``k`` best classes of one row of logits, with softmax probabilities, best first."""
    logits = logits.astype(np.float64)
    k = min(k, logits.shape[-1])
    exp = np.exp(logits - logits.max())
    probs = exp / exp.sum()
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [{"label": str(labels[i]), "index": int(i), "score": float(probs[i])} for i in idx]


def _batch_observer(metrics: Metrics, statistics: InferenceStatistics, name: str, version: str):
    batch_size = metrics.batch_size.labels(name, version)
    inference = metrics.inference_latency.labels(name, version)
    queue_wait = metrics.queue_wait.labels(name, version)
    failures = metrics.batch_failures.labels(name, version)
    alone = metrics.alone_batches.labels(name, version)

    def on_batch(stats: BatchStats) -> None:
        batch_size.observe(stats.size)
        if stats.alone:
            alone.inc()
        inference.observe(stats.run_s)
        for wait in stats.queue_wait_s:
            queue_wait.observe(wait)
        if not stats.ok:
            failures.inc()
        statistics.batch_ran(stats)

    return on_batch


class ModelTable:
    """Served model versions by name; lookups fail with the list of what exists.

    Immutable: the lifecycle builds a new table and swaps it in one assignment,
    so a request sees either the old set or the new one, never half of a change.
    """

    def __init__(self, models: list[ServedModel] | None = None) -> None:
        self._by_name: dict[str, dict[int, ServedModel]] = {}
        for model in models or []:
            self._by_name.setdefault(model.name, {})[model.version] = model

    def __iter__(self):
        for versions in self._by_name.values():
            yield from versions.values()

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> dict[int, ServedModel]:
        return self._by_name.get(name, {})

    def get(self, name: str, version: int | None = None) -> ServedModel:
        versions = self._by_name.get(name)
        if not versions:
            served = ", ".join(self.names()) or "none (the server may still be loading)"
            raise NotFoundError(f"model {name!r} is not served; served models: {served}. See GET /models")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise NotFoundError(
                f"model {name!r} has no served version {version}; served versions: "
                f"{', '.join(map(str, sorted(versions)))}"
            )
        return versions[version]

    def with_models(self, added: list[ServedModel], removed: list[ServedModel] = ()) -> "ModelTable":
        gone = {id(m) for m in removed}
        replaced = {(a.name, a.version) for a in added}
        kept = [m for m in self if id(m) not in gone and (m.name, m.version) not in replaced]
        return ModelTable(kept + list(added))
