"""bench.engine_process end to end on the test model, briefly: the handoff and the front-end's cost are measured
and written (the server points are the same load loop as bench.run's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_engine_process_benchmark_measures_the_handoff_and_the_front_end(exported_repo, tmp_path):
    out = tmp_path / "engine-process.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.engine_process", "--models-dir", str(exported_repo), "--models", "resnet18",
         "--skip", "servers,alternate", "--handoff-rounds", "2", "--handoff-block", "5", "--duration", "2",
         "--warmup", "0.5", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["handoff"]) == {"1", "8", "32"}
    for size, point in data["handoff"].items():
        assert point["requests_each"] == 2 * 5 and point["in_process_us"] > 0 and point["engine_us"] > 0
        # from the unrounded medians: within the two roundings of the figures beside it
        assert abs(point["added_us"] - (point["engine_us"] - point["in_process_us"])) <= 0.15
    front_end, in_process = data["front_end"], data["front_end_in_process"]
    assert front_end["errors"] == {} and front_end["img_s"] > 0
    assert front_end["processes"] == {"engine": 1, "front_ends_or_workers": 1}  # the null engine maps onnxruntime
    assert in_process["processes"] == {"engine": 0, "front_ends_or_workers": 1}
    assert front_end["front_end_threads_core_ms_per_img"]["decode"] > 0
    assert front_end["front_end_threads_core_ms_per_img"]["inference"] == 0  # no session in the front-end
    assert front_end["decode_core_ms_this_process"] > 0
