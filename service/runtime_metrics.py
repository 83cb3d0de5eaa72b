"""The standard runtime metrics next to ours: ``process_*`` and ``python_*`` (prometheus-client's own
collectors) and, where NVML answers, each GPU's utilisation and memory.

With one process they go on its registry. With several (workers, the engine process) a scrape reaches one
worker, whose own ``process_*`` would describe a different process each time: there the ``process_*``
series are those of every process in the server's tree, one series per process, labelled ``pid``, so
``sum(process_resident_memory_bytes)`` is the whole server.
"""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("archserve")
ROOT_PID_ENV = "ARCHSERVE_SUPERVISOR_PID"  # set by `python -m service` before it starts any child


def register_standard(registry) -> None:
    """A private registry (one process): the collectors the default registry would have had, and the GPUs."""
    ProcessCollector(registry=registry)
    for collector in (PLATFORM_COLLECTOR, GC_COLLECTOR, GPUS):
        registry.register(collector)


def multiprocess_collectors() -> list:
    return [ProcessTreeCollector(int(os.environ.get(ROOT_PID_ENV) or os.getpid())), PLATFORM_COLLECTOR, GPUS]


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants, from /proc (Linux); just ``root`` where there is no /proc."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "(comm)": state, ppid
    pids, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        pids += children
        frontier = children
    return sorted(pids)


class ProcessTreeCollector:
    """prometheus-client's ProcessCollector for every process of the server, one ``pid`` label each."""

    def __init__(self, root: int) -> None:
        self.root = root

    def collect(self):
        families: dict[str, Metric] = {}
        for pid in tree_pids(self.root):
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return list(families.values())


class GpuCollector:
    """Utilisation and memory of each GPU through NVML (nvidia-ml-py). No GPU, no driver or no library: no
    series at all (not zeros, which would read as an idle GPU)."""

    def __init__(self) -> None:
        self._nvml = None
        self._tried = False
        self._lock = threading.Lock()  # scrapes may come from several threads

    def _init(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # no library, no driver (NVMLError), no device
                    log.debug("no GPU metrics: NVML unavailable (%s)", exc)
        return self._nvml

    def collect(self):
        nvml = self._init()
        if nvml is None:
            return []
        labels = ["gpu", "name", "uuid"]
        util = GaugeMetricFamily("archserve_gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was running a kernel (NVML).", labels=labels)
        used = GaugeMetricFamily("archserve_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).",
                                 labels=labels)
        total = GaugeMetricFamily("archserve_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels)
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                values = [str(index), _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle))]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric(values, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
                used.add_metric(values, memory.used)
                total.add_metric(values, memory.total)
        except Exception as exc:  # a device lost mid-scrape: leave the GPU series out of this scrape
            log.warning("GPU metrics left out of this scrape: %s", exc)
            return []
        return [util, used, total]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # older nvidia-ml-py returns bytes


GPUS = GpuCollector()  # one per process: NVML is initialised once
