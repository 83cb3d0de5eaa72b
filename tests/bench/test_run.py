"""python -m bench.run: arguments refused before anything runs, and the repeat loop with the steps faked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import run as bench_run
from tests.bench.fakes import results

ROOT = Path(__file__).resolve().parents[2]


def test_engine_rounds_below_one_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--engine-rounds", "-1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--engine-rounds must be at least 1" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_repeats_below_one_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--repeats", "0", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--repeats must be at least 1" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_run_of_three_repeats_writes_each_and_judges_the_median(tmp_path, monkeypatch):
    """bench.run's main loop with the steps faked: three repeats of two models, the second repeat's naive
    server failing for resnet18."""
    calls = []

    def fake_run_model(model, models_dir, args, images, logs, tmp, skip):
        calls.append((model, logs.name))
        repeat = len([c for c in calls if c[0] == model])
        a = {"resnet50": (46.7, 47.0, 48.0), "resnet18": (45.0, 44.0, 43.0)}[model][repeat - 1]
        r = results(a, 24.0, 45.0, 23.5)
        r["engine"]["provider"] = "CPUExecutionProvider"
        if model == "resnet18" and repeat == 2:
            r["naive"] = None
            r["failures"] = {"naive": "it did not start"}
        return r

    guards = []

    class RecordingGuard(bench_run.NoiseGuard):  # one per repeat, each with the whole budget
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            guards.append((self, kwargs))

    monkeypatch.setattr(bench_run, "NoiseGuard", RecordingGuard)
    monkeypatch.setattr(bench_run, "run_model", fake_run_model)
    monkeypatch.setattr(bench_run, "export_models", lambda models_dir, names: [])
    monkeypatch.setattr(bench_run, "make_jpegs", lambda: [b"jpeg"])
    code = bench_run.main(["--repeats", "3", "--out", str(tmp_path)])
    assert code == 1  # a step failed in one repeat
    assert calls == [(m, f"repeat-{i}") for i in (1, 2, 3) for m in ("resnet50", "resnet18")]
    assert len({id(g) for g, _ in guards}) == 3 and all(kw["budget_s"] == 600.0 for _, kw in guards)
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["config"]["repeats"] == 3 and [rep["repeat"] for rep in data["repeats"]] == [1, 2, 3]
    assert data["repeats"][1]["models"]["resnet18"]["failures"] == {"naive": "it did not start"}
    assert [(row["model"], row["repeat"]) for row in data["summary"]] == \
        [(m, i) for m in ("resnet50", "resnet18") for i in (1, 2, 3)]
    judged = {(c["model"], c["target"]): c for c in data["targets"]}
    ratio = judged[("resnet50", "e2e @16 / raw engine (best batch)")]
    assert ratio["pass"] is True and ratio["passed"] == 2 and ratio["measured"] == "90.4%"
    naive = judged[("resnet18", "throughput @16 vs naive")]  # 45 = 45 fails, 44 n/a, 43 < 45 fails
    assert naive["pass"] is False and naive["passed"] == 0 and naive["repeats"][1] == "n/a"
    for model in ("resnet50", "resnet18"):  # 24.0 ms against the naive server's 23.5 in every measured repeat
        p50 = judged[(model, "p50 @1 vs naive")]
        assert p50["pass"] is False and p50["threshold"] == "archserve <= naive (same run)"
    assert {row["p50_minus_naive_ms"] for row in data["summary"] if "p50_minus_naive_ms" in row} == {0.5}
    assert data["machine"]["provider"] == "CPUExecutionProvider"
    assert "| 2 of 3 | PASS |" in data["table"]
    assert sorted(p.name for p in tmp_path.glob("*-logs/*")) == ["repeat-1", "repeat-2", "repeat-3"]


def _round(p50_ms: float, latencies: list[float], other: float = 0.01) -> dict:
    """A closed-loop report of one round, as ``measure_point`` gives it with ``keep_latencies``."""
    return {"duration_s": 5.0, "requests": len(latencies) + 1, "ok": len(latencies), "images_ok": len(latencies),
            "errors": {"timeout": 1}, "throughput_img_s": len(latencies) / 5.0, "latency_ms": {"p50": p50_ms},
            "latencies_s": list(latencies), "server": {"mean_batch_size": 1.0},
            "cpu": {"server_cores": 1.0, "other_cores": other, "wall_s": 5.0,
                    "server_threads_cores": {"inference": 0.8, "decode": 0.1}}}


def test_rounds_of_one_point_pool_their_latencies_and_counts():
    first, second = _round(10.0, [0.010] * 3), _round(30.0, [0.030] * 2, other=0.2)
    pooled = bench_run.pool([first, second])
    assert pooled["latency_ms"]["p50"] == 10.0  # the median of all five requests, not of the two rounds
    assert pooled["round_p50_ms"] == [10.0, 30.0] and pooled["rounds"] == 2
    assert (pooled["ok"], pooled["requests"], pooled["duration_s"], pooled["errors"]) == (5, 7, 10.0, {"timeout": 2})
    assert pooled["throughput_img_s"] == 0.5
    assert pooled["cpu"]["other_cores"] == 0.2  # the noisiest round decides whether to measure again
    assert pooled["cpu"]["server_core_ms_per_img"] == 2000.0  # 1 core over 0.5 img/s
    assert pooled["cpu"]["server_threads_core_ms_per_img"] == {"decode": 200.0, "inference": 1600.0}
    assert "latencies_s" not in pooled


def test_the_low_point_alternates_which_server_goes_first(monkeypatch):
    order = []

    def fake_point(server, model, clients, args, images, *, duration, warmup, keep_latencies):
        order.append((server, duration, warmup))
        assert keep_latencies and clients == 1
        return _round(1.0 if server == "a" else 2.0, [0.001 if server == "a" else 0.002])

    monkeypatch.setattr(bench_run, "measure_point", fake_point)
    monkeypatch.setattr(bench_run, "format_report", lambda report: "")
    args = type("Args", (), {"pair_rounds": 3, "duration": 6.0, "warmup": 3.0})()
    result = bench_run.alternating({"a": "a", "b": "b"}, "m", 1, args, [])
    assert [s for s, _, _ in order] == ["a", "b", "b", "a", "a", "b"]
    assert {d for _, d, _ in order} == {2.0}
    assert [w for _, _, w in order] == [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]  # a full warm-up on each server's first round
    assert result["a"]["latency_ms"]["p50"] == 1.0 and result["b"]["latency_ms"]["p50"] == 2.0
    assert result["a"]["rounds"] == 3 and result["cpu"] == {"other_cores": 0.01}


def test_pair_rounds_below_one_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--pair-rounds", "0", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--pair-rounds must be at least 1" in proc.stderr
