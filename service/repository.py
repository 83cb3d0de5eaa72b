"""The models being served: loaded from the model repository, each with its engine and batcher."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelrepo.layout import list_model_names, list_versions
from modelrepo.manifest import Manifest, load_manifest

from .batching import BatchStats, Batcher
from .engine import CPU, CUDA, EngineConfig, ModelLoadError, OnnxEngine, verify_files
from .errors import NotFoundError
from .metrics import Metrics, multiprocess_dir
from .preprocess import PreprocessSpec
from .settings import Settings

log = logging.getLogger(__name__)


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
    padded_sizes: list[int] | None = None  # batches are padded up to one of these sizes
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
    root = settings.models_dir
    available = list_model_names(root)
    if not available:
        raise ModelLoadError(
            f"no models in {root}/: export some first (`make models` or "
            f"`python -m export --models resnet18 --out {root}`)"
        )
    selection = _parse_selection(settings.models) or {name: None for name in available}
    plan = []
    for name, pinned in selection.items():
        versions = list_versions(root / name)
        if not versions:
            raise ModelLoadError(f"model {name!r} is not in {root}/; it holds: {', '.join(available)}")
        if pinned is not None:
            if pinned not in versions:
                raise ModelLoadError(
                    f"model {name!r} has no version {pinned} in {root}/; versions: {', '.join(map(str, versions))}"
                )
            plan.append((name, pinned))
        elif settings.version_policy == "all":
            plan.extend((name, v) for v in versions)
        else:
            plan.append((name, versions[-1]))
    return plan


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """1, the powers of two below the maximum, and the maximum: the sizes batches take."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def load_model(name: str, version: int, settings: Settings, metrics: Metrics) -> ServedModel:
    path = settings.models_dir / name / str(version)
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
    instances = settings.instances or 1  # two: unmeasured since per-size sessions (docs/benchmarks.md)
    batch_sizes = warmup_batch_sizes(settings.max_batch_size)
    padded_sizes = batch_sizes if _wanted(settings.pad_batches, engine.provider) else None
    lanes = cpu_lanes(settings, engine.provider, padded_sizes)
    if settings.cpu_lanes > 1 and lanes == 1:
        log.warning("%s v%s: cpu_lanes=%d is for one CPU session; on %s%s, batches run one at a time",
                    name, version, settings.cpu_lanes, engine.provider, " with padded batches" if padded_sizes else "")
    if lanes > 1:
        if settings.instances and settings.instances != lanes:
            log.warning("%s v%s: cpu_lanes=%d runs %d batches at once; instances=%d is not used",
                        name, version, lanes, lanes, settings.instances)
        cores = cpu_cores(settings)
        if lanes > cores:
            log.warning("%s v%s: cpu_lanes=%d is more than the %d cores: the lanes share cores",
                        name, version, lanes, cores)
        engine.split(lanes, max(1, cores // lanes))
        instances = lanes
    if padded_sizes and _wanted(settings.session_per_batch_size, engine.provider):
        engine.specialise(padded_sizes)
    elif settings.session_per_batch_size == "always" and not padded_sizes:
        log.warning("%s v%s: session_per_batch_size=always needs padded batches (pad_batches is %s on %s); "
                    "one session serves every size", name, version, settings.pad_batches, engine.provider)
    labels = (str(version),)
    observe = _batch_observer(metrics, name, str(version))
    batcher = Batcher(
        _stacked(engine, padded_sizes),
        run_alone=_stacked(engine, padded_sizes, alone=True) if lanes > 1 else None,
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        instances=instances,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        name=f"{name}/{version}",
        on_batch=observe,
        on_queue_depth=metrics.queue_depth.labels(name, *labels).set,
        on_expired=metrics.expired.labels(name, *labels).inc,
        # Every batch size, in each thread that will run batches (the batcher's start awaits it).
        warmup=(lambda: engine.warmup(batch_sizes)) if settings.warmup else None,
    )
    return ServedModel(
        name=name, version=version, path=path, manifest=manifest, engine=engine, batcher=batcher,
        preprocess=PreprocessSpec(
            resize=manifest.preprocessing.resize, crop=manifest.preprocessing.crop,
            interpolation=manifest.preprocessing.interpolation, max_pixels=settings.max_image_pixels,
        ),
        instances=instances,
        padded_sizes=padded_sizes,
        labels=np.asarray(manifest.labels, dtype=object),
    )


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_cores(settings: Settings) -> int:
    """The cores a model's inference may use on the CPU: ``intra_op_threads`` if set (in a container, the CPU
    quota is not what the process sees), else the cores this process may run on."""
    return settings.intra_op_threads or available_cores()


def cpu_lanes(settings: Settings, provider: str, padded_sizes: list[int] | None) -> int:
    """How many batches of a model run at once on the CPU provider, each on ``cpu_cores // lanes`` threads (1:
    one at a time, on all of them). Explicit ``cpu_lanes`` wins; auto (0) is 2 where there are at least 2 cores,
    unless ``instances`` is set or there are several worker processes (each would count all the cores as its
    own; measured with one). Never with padded batches (their sessions are per size)."""
    if provider != CPU or padded_sizes:
        return 1
    if settings.cpu_lanes:
        return settings.cpu_lanes
    if settings.instances or settings.workers > 1:
        return 1
    return 2 if cpu_cores(settings) >= 2 else 1


def _wanted(setting: str, provider: str) -> bool:
    """An auto/always/never setting for an engine on ``provider``: auto means on CUDA only."""
    return setting == "always" or (setting == "auto" and provider == CUDA)


def padded_size(count: int, sizes: list[int] | None) -> int:
    """The smallest of ``sizes`` (ascending) that holds ``count`` items (``count`` itself if none does, or no
    sizes)."""
    if not sizes:
        return count
    return next((size for size in sizes if size >= count), count)


def _stacked(engine: OnnxEngine, sizes: list[int] | None = None, alone: bool = False):
    """The batcher's ``run_batch``: stack the items, padded with zeros to one of ``sizes`` if given, and run them
    (``engine.run_alone`` with ``alone``, the batcher's ``run_alone``)."""

    def run(batch: np.ndarray) -> np.ndarray:
        return engine.run_alone(batch) if alone else engine.run(batch)

    def run_batch(items: list[np.ndarray]) -> list[np.ndarray]:
        count = len(items)
        size = padded_size(count, sizes)
        if size == count:
            return list(run(np.stack(items)))
        batch = np.empty((size, *items[0].shape), dtype=items[0].dtype)
        np.stack(items, out=batch[:count])
        batch[count:] = 0  # blank padding; the items are copied once, not over zeros
        return list(run(batch)[:count])

    return run_batch


def _batch_observer(metrics: Metrics, name: str, version: str):
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
