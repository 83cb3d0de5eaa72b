"""bench.engine_only's timing rounds: a fake engine shows which batch size ran when, then the real one runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import engine_only

ROOT = Path(__file__).resolve().parents[2]


class RecordingEngine:
    """Runs nothing; records the batch size of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, batch):
        self.calls.append(len(batch))
        return batch


def visits(calls: list[int]) -> list[int]:
    """The batch sizes in the order they were visited (consecutive repeats collapsed)."""
    return [size for i, size in enumerate(calls) if i == 0 or calls[i - 1] != size]


def test_rounds_visit_every_size_in_alternating_order_and_pool_the_runs():
    fake = RecordingEngine()
    rows = engine_only.measure(fake, [1, 2, 4], (8, 8, 3), min_runs=6, max_runs=6, budget_s=0.0,
                                warmup_runs=2, rounds=3)
    assert visits(fake.calls) == [1, 2, 4, 2, 1, 2, 4]  # 1 2 4 | 4 2 1 | 1 2 4
    # Per round: ceil(6 / 3) = 2 timed runs; warm-up 2 in the first round, 1 after each later change of size.
    assert [fake.calls.count(size) for size in (1, 2, 4)] == [2 + 2 + 1 + 2 + 1 + 2] * 3
    assert [row["batch_size"] for row in rows] == [1, 2, 4]
    for row in rows:
        assert row["runs"] == 6
        assert len(row["round_img_s"]) == 3 and all(x > 0 for x in row["round_img_s"])


def test_one_round_is_the_old_single_stretch_per_size():
    fake = RecordingEngine()
    rows = engine_only.measure(fake, [1, 2], (4, 4, 3), min_runs=3, max_runs=3, budget_s=0.0,
                                warmup_runs=1, rounds=1)
    assert fake.calls == [1] * 4 + [2] * 4
    assert [row["runs"] for row in rows] == [3, 3]


def test_rounds_below_one_are_refused():
    with pytest.raises(ValueError, match="rounds"):
        engine_only.measure(RecordingEngine(), [1], (4, 4, 3), min_runs=1, max_runs=1, budget_s=0.0,
                             warmup_runs=0, rounds=0)
    proc = subprocess.run([sys.executable, "-m", "bench.engine_only", "--rounds", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds must be at least 1" in proc.stderr


def test_the_engine_benchmark_runs_the_real_model_in_rounds(exported_repo, tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.engine_only", "--models-dir", str(exported_repo), "--model", "resnet18",
         "--batch-sizes", "1,2", "--rounds", "2", "--budget-s", "0.2", "--min-runs", "2", "--json", str(out),
         "--device", "cpu"],  # the CPU on every machine, as the assertions below expect
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and report["provider"] == "CPUExecutionProvider"
    rows = report["batches"]
    assert [row["batch_size"] for row in rows] == [1, 2]
    assert all(row["runs"] >= 2 and len(row["round_img_s"]) == 2 for row in rows)
    best = max(rows, key=lambda row: row["img_s"])
    assert report["best"] == {"batch_size": best["batch_size"], "img_s": best["img_s"]}
    assert "img/s per round" in proc.stdout
