"""Where a model's batches run: how many at once, padded to which sizes, on how many threads.

``served.load_model`` asks ``place``. On CUDA, batches are padded to a few
sizes, each with its own session (cuDNN plans per shape); on the CPU, a model
runs two lanes on half the cores each, unless told otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..settings import Settings
from .engine import CPU, CUDA, OnnxEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    instances: int  # batches that may run at once
    lanes: int  # CPU lanes (1: batches run one at a time on all the cores)
    padded_sizes: list[int] | None  # batches are padded up to one of these sizes
    warmup_sizes: list[int]


def place(engine: OnnxEngine, settings: Settings, label: str) -> Placement:
    """Decide where ``engine``'s batches run, and set the engine up for it (lanes, per-size sessions)."""
    instances = settings.instances or 1
    batch_sizes = warmup_batch_sizes(settings.max_batch_size)
    padded_sizes = batch_sizes if wanted_on(settings.pad_batches, engine.provider) else None
    lanes = cpu_lanes(settings, engine.provider, padded_sizes)
    if settings.cpu_lanes > 1 and lanes == 1:
        log.warning("%s: cpu_lanes=%d is for one CPU session; on %s%s, batches run one at a time",
                    label, settings.cpu_lanes, engine.provider, " with padded batches" if padded_sizes else "")
    if lanes > 1:
        if settings.instances and settings.instances != lanes:
            log.warning("%s: cpu_lanes=%d runs %d batches at once; instances=%d is not used",
                        label, lanes, lanes, settings.instances)
        cores = cpu_cores(settings)
        if lanes > cores:
            log.warning("%s: cpu_lanes=%d is more than the %d cores: the lanes share cores", label, lanes, cores)
        engine.split(lanes, max(1, cores // lanes))
        instances = lanes
    if padded_sizes and wanted_on(settings.session_per_batch_size, engine.provider):
        engine.specialise(padded_sizes)
    elif settings.session_per_batch_size == "always" and not padded_sizes:
        log.warning("%s: session_per_batch_size=always needs padded batches (pad_batches is %s on %s); "
                    "one session serves every size", label, settings.pad_batches, engine.provider)
    # On CUDA each new shape costs a cuDNN search, and padded sizes may each have a session: every size is
    # warmed. On the CPU, once one batch has run, a new size's first run costs no more than its next (measured:
    # docs/benchmarks.md), so one is enough, and a hot reload does not take the cores from serving for seconds.
    warm_every_size = engine.provider == CUDA or padded_sizes is not None
    return Placement(instances, lanes, padded_sizes, batch_sizes if warm_every_size else [1])


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """1, the powers of two below the maximum, and the maximum: the sizes batches take."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


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
    unless ``instances`` is set or several worker processes each load the models (each would count all the cores
    as its own; one engine process for all of them does not). Never with padded batches (sessions per size)."""
    if provider != CPU or padded_sizes:
        return 1
    if settings.cpu_lanes:
        return settings.cpu_lanes
    if settings.instances or (settings.workers > 1 and not settings.split):
        return 1
    return 2 if cpu_cores(settings) >= 2 else 1


def wanted_on(setting: str, provider: str) -> bool:
    """An auto/always/never setting for an engine on ``provider``: auto means on CUDA only."""
    return setting == "always" or (setting == "auto" and provider == CUDA)
