"""prometheus-client's multiprocess mode: the live gauges of worker processes that are gone leave the scrape."""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import exposition, forget_dead_processes

# A worker process: it sets its model info and queue depth (live gauges) and a counter, then exits.
WORKER = """
from service.metrics import Metrics
m = Metrics(None)  # as the app does in multiprocess mode
m.model_info.labels("resnet18", "1", "resnet18", "fp32", "CPUExecutionProvider", "random-init").set(1)
m.queue_depth.labels("resnet18", "1").set(3)
m.requests.labels("resnet18", "1", "200").inc(5)
print(__import__("os").getpid())
"""


def _worker(directory) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout)


def _scrape(directory, monkeypatch) -> dict[str, list]:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    text = exposition()[0].decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_a_dead_workers_live_gauges_leave_the_scrape_and_its_counters_stay(tmp_path, monkeypatch):
    gone = _worker(tmp_path)  # has exited
    assert {f"gauge_liveall_{gone}.db", f"gauge_livesum_{gone}.db"} <= {p.name for p in tmp_path.glob("gauge_live*")}
    # a live process's files (this one's) must stay
    (tmp_path / f"gauge_liveall_{os.getpid()}.db").write_bytes((tmp_path / f"gauge_liveall_{gone}.db").read_bytes())

    families = _scrape(tmp_path, monkeypatch)
    assert [s.labels["pid"] for s in families["archserve_model_info"]] == [str(os.getpid())]
    assert all(s.value == 0 for s in families.get("archserve_queue_depth", []))
    assert sum(s.value for s in families["archserve_requests"] if s.name == "archserve_requests_total") == 5
    assert not list(tmp_path.glob(f"gauge_live*_{gone}.db"))
    assert forget_dead_processes(str(tmp_path)) == []  # nothing left to forget


def test_forget_dead_processes_names_the_dead_and_keeps_other_files(tmp_path):
    gone = _worker(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    assert forget_dead_processes(str(tmp_path)) == [gone]
    after = {p.name for p in tmp_path.iterdir()}
    assert before - after == {p for p in before if p.startswith("gauge_live")}
    assert {f"gauge_liveall_{gone}.db", f"gauge_livesum_{gone}.db"} <= before - after
    assert f"counter_{gone}.db" in after
