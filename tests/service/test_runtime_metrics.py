"""The standard process_* and python_* metrics, with one process and with several, and the GPUs through NVML
(absent where NVML does not answer, as on a machine without a GPU)."""

from __future__ import annotations

import types

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.runtime_metrics import GpuCollector, tree_pids
from tests.service.server import front_end_pids, running_server, service_tree, wait_until

GPU_SERIES = ("archserve_gpu_utilization_ratio", "archserve_gpu_memory_used_bytes", "archserve_gpu_memory_total_bytes")


def _families(url: str) -> dict[str, list]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _nvml_answers() -> bool:
    return GpuCollector()._init() is not None


def test_one_process_scrape_has_the_standard_collectors_and_gpus_only_where_nvml_answers(exported_repo):
    with running_server(models_dir=exported_repo, models=["resnet18"], warmup=False) as (url, _app):
        families = _families(url)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds", "python_info"):
        assert name in families, name
    rss = families["process_resident_memory_bytes"][0].value
    assert rss > 50e6  # this test process, with onnxruntime and a model in it
    assert all((name in families) == _nvml_answers() for name in GPU_SERIES)


def test_several_processes_scrape_has_process_metrics_for_every_process_of_the_tree(exported_repo, tmp_path):
    with service_tree(exported_repo, tmp_path, "--models", "resnet18", "--workers", "2") as (proc, url, _log):
        wait_until(url, "/health/ready")
        workers = front_end_pids(url, 2)
        families = _families(url)
        tree = set(tree_pids(proc.pid))
    series = {int(s.labels["pid"]): s.value for s in families["process_resident_memory_bytes"]}
    # the supervisor, both front-ends and the engine process (and nothing outside the server)
    assert proc.pid in series and workers <= set(series) and len(series) >= 4
    assert set(series) <= tree
    assert all(value > 10e6 for value in series.values())
    assert all((name in families) == _nvml_answers() for name in GPU_SERIES)


def _fake_nvml(devices: list[tuple[str, int, int, int]], fail_on=None) -> types.ModuleType:
    """A stand-in for pynvml: (name, utilisation %, used bytes, total bytes) per device."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda i: devices[i][0].encode()  # older nvidia-ml-py answers bytes
    nvml.nvmlDeviceGetUUID = lambda i: f"GPU-{i}"

    def memory(i):
        if fail_on == i:
            raise RuntimeError("GPU is lost")
        return types.SimpleNamespace(used=devices[i][2], total=devices[i][3])

    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetUtilizationRates = lambda i: types.SimpleNamespace(gpu=devices[i][1])
    return nvml


def test_gpu_collector_reports_each_device(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml",
                        _fake_nvml([("NVIDIA H200", 87, 5 << 30, 141 << 30), ("NVIDIA L4", 0, 1 << 20, 24 << 30)]))
    families = {f.name: f.samples for f in GpuCollector().collect()}
    util = {s.labels["gpu"]: (s.labels["name"], s.value) for s in families["archserve_gpu_utilization_ratio"]}
    assert util == {"0": ("NVIDIA H200", 0.87), "1": ("NVIDIA L4", 0.0)}
    assert [s.value for s in families["archserve_gpu_memory_total_bytes"]] == [141 << 30, 24 << 30]
    assert [s.labels["uuid"] for s in families["archserve_gpu_memory_used_bytes"]] == ["GPU-0", "GPU-1"]


def test_gpu_collector_without_nvml_or_with_a_lost_device_reports_nothing(monkeypatch):
    broken = _fake_nvml([])

    def no_driver():
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = no_driver
    monkeypatch.setitem(__import__("sys").modules, "pynvml", broken)
    assert GpuCollector().collect() == []
    monkeypatch.setitem(__import__("sys").modules, "pynvml", _fake_nvml([("A", 1, 2, 3), ("B", 1, 2, 3)], fail_on=1))
    assert GpuCollector().collect() == []  # not half a scrape: device 0 alone would read as the whole machine
