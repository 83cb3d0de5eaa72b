"""bench.gpu, the GPU run, end to end on the CPU: the same script the GPU machine runs, with the CPU provider."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_on_the_cpu_and_reports_them(exported_repo, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--quick", "--device", "cpu", "--models-dir", str(exported_repo),
         "--models", "resnet18", "--serve-model", "resnet18", "--batch-sizes", "1,2",
         "--steps", "facts,decode,engine,sessions,serve", "--out", str(out), "--decode-s", "0.5",
         "--compare-env", "per-size:ARCHSERVE_PAD_BATCHES=always,ARCHSERVE_SESSION_PER_BATCH_SIZE=always"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu-results.json").read_text())

    assert data["facts"]["device"] == "cpu" and data["facts"]["cores"] >= 1
    for size in ("500x375", "4032x3024"):
        assert data["decode"][size]["one_process"]["img_s"] > 0
    engine = data["engine"]["resnet18"]
    assert engine["provider"] == "CPUExecutionProvider" and engine["precision"] == "fp32"
    assert [b["batch_size"] for b in engine["batches"]] == [1, 2]
    patterns = data["sessions"]["variants"]["server options"]
    assert all(patterns[p] > 0 for p in ("1 thread", "2 threads", "alternating sizes"))
    assert set(patterns["first run in a new thread, ms"]) == {"b2", "b4"}
    per_size = [v for v in data["sessions"]["variants"].values() if v.get("session_per_size")]
    assert len(per_size) == 1 and per_size[0]["alternating sizes"] > 0

    serve = data["serve"]
    for config in ("w1", "w2"):
        assert serve[config]["provider_check"] == "ok", serve[config]
        points = {k: v for k, v in serve[config].items() if k.startswith(("jpeg", "v2", "phone"))}
        assert len(points) == 3
        for label, report in points.items():
            assert report["errors"] == {} and report["ok"] > 0, (config, label, report)
            assert report["throughput_img_s"] > 0
    assert serve["w1"]["v2-b4-c2"]["images_per_request"] == 4
    from service.models.placement import available_cores

    lanes = 2 if available_cores() >= 2 else 1  # on the CPU, one worker: one batch per lane under load
    assert serve["w1"]["batching"]["instances"] == serve["w1"]["batching"]["cpu_lanes"] == lanes
    # 2 workers feed one engine process, which places the model as one worker would, and alone reports it
    assert serve["w2"]["batching"]["instances"] == serve["w2"]["batching"]["cpu_lanes"] == lanes
    assert serve["w2"]["workers_loaded"] == 1
    assert serve["w1"]["batching"]["sessions"] == (1 + lanes if lanes > 1 else 1)  # and one per lane
    compared = serve["per-size"]  # a --compare-env server: its settings reached it, and it served the w1 points
    assert compared["env"]["ARCHSERVE_SESSION_PER_BATCH_SIZE"] == "always"
    assert compared["batching"]["sessions"] == len(compared["batching"]["padded_sizes"]) > 1
    assert compared["jpeg-c1"]["errors"] == {} and compared["jpeg-c1"]["ok"] > 0
    from bench.gpu import gpu_memory_used_mib

    readable = gpu_memory_used_mib() is not None  # nvidia-smi and a GPU it can read, or unknown (None)
    for key in ("gpu_memory_before_mib", "gpu_memory_used_mib"):
        assert isinstance(serve["w1"][key], int) if readable else serve["w1"][key] is None

    table = (out / "gpu-results.md").read_text()
    assert "| w1 | jpeg-c1 |" in table and "| resnet18 | CPUExecutionProvider | fp32 |" in table
    assert "| b1 | b2 |" in table  # the engine table has the batch sizes that ran
    sessions = len(compared["batching"]["padded_sizes"])  # 1, 2, 4, 8: --quick caps the largest batch at 8
    assert f"| per-size | CPUExecutionProvider fp32 | {sessions} |" in table  # sessions per model, per server


def test_a_server_that_cannot_become_ready_fails_the_wait_at_once(exported_repo, tmp_path):
    """require_gpu on the CPU: the bench stops waiting as soon as the server says its start failed."""
    import time

    from bench.servers import PY, Server, free_port

    port = free_port()
    argv = [PY, "-m", "service", "--port", str(port), "--models-dir", str(exported_repo), "--models", "resnet18",
            "--device", "cpu", "--require-gpu"]
    with Server("archserve", argv, port, tmp_path / "server.log", {"ARCHSERVE_WARMUP": "false"}) as server:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="failed to start: require_gpu is set"):
            server.wait_ready(timeout=120)
        assert time.monotonic() - started < 60


def test_the_decode_ceiling_uses_the_served_models_preprocessing(experiment_repo, tmp_path):
    from bench.gpu_ceilings import preprocessing_of

    assert preprocessing_of(experiment_repo, "inception_v3")[:2] == (342, 299)
    assert preprocessing_of(experiment_repo, "resnet18") == (256, 224, "bilinear")
    assert preprocessing_of(tmp_path, "resnet50") == (256, 224, "bilinear")  # not exported: ResNet's


def test_the_latency_target_is_met_below_its_goal_and_the_table_says_so():
    from bench.gpu import build_parser
    from bench.gpu_report import TARGET_P50_1_CLIENT_MS, markdown, summarise

    args = build_parser().parse_args([])

    def p50_row(ms: float) -> dict:
        data = {"serve": {"w1": {"jpeg-c1": {"server": {"request_latency_ms": {"p50": ms}},
                                             "latency_ms": {"p50": ms + 1}}}}}
        data["summary"] = summarise(data, args)
        (row,) = [r for r in data["summary"]["rows"] if r["target"].startswith("p50 at 1 client")]
        return row, markdown(data)

    below, table = p50_row(TARGET_P50_1_CLIENT_MS - 1)
    assert below["met"] is True and f"≤ {TARGET_P50_1_CLIENT_MS:,} ms" in table
    above, _ = p50_row(TARGET_P50_1_CLIENT_MS + 1)
    assert above["met"] is False


def test_compare_env_specs_are_parsed_or_refused_with_a_reason():
    from argparse import ArgumentTypeError

    from bench.gpu import env_spec

    assert env_spec("one:A=1, B = x=y") == {"label": "one", "env": {"A": "1", "B": "x=y"}}
    for bad in ("noenv", "label:", ":A=1", "label:A", "label:=1", "w1:A=1", "w4:A=1", "a/b:A=1", "a b:A=1"):
        with pytest.raises(ArgumentTypeError):
            env_spec(bad)


def test_compare_env_labels_must_differ():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--compare-env", "x:A=1", "--compare-env", "x:B=2", "--steps", "facts"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "--compare-env labels must differ" in proc.stderr
