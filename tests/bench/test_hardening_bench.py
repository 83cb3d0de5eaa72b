"""bench.overload's and bench.soak's verdicts, and the soak's version publishing (their load loops are the same
as bench.loadgen's, tested there)."""

from __future__ import annotations

import json

from bench.overload import verdicts as overload_verdicts
from bench.soak import publish_next, verdicts as soak_verdicts


def _report(ok: int, errors: dict, p50: float, p99: float, scheduled: int, refused_p99: float | None = None,
            batch_ms: float = 100.0, duration: float = 30.0) -> dict:
    error_latency = {"503": {"p99": refused_p99}} if refused_p99 is not None else {}
    return {"throughput_req_s": ok / duration, "errors": errors, "latency_ms": {"p50": p50, "p99": p99},
            "error_latency_ms": error_latency, "late": {"scheduled": scheduled},
            "requests": ok + sum(errors.values()), "server": {"inference_ms_per_batch": batch_ms}}


def test_overload_verdicts_pass_when_every_target_holds():
    over = _report(ok=1350, errors={"503": 2650}, p50=900, p99=1500, scheduled=4000, refused_p99=20)
    light = _report(ok=1000, errors={}, p50=100, p99=400, scheduled=1000)
    v = overload_verdicts(capacity=47.0, over=over, light=light, max_wait_ms=1000)
    assert all(target["ok"] for target in v.values()), v
    assert v["goodput_share"]["value"] == round(45.0 / 47.0, 3)
    assert v["p99_200_ms"]["bound"] == "<= 1600"  # 1.5 x 1000 + one batch of 100 ms


def test_overload_verdicts_fail_on_slow_answers_lost_requests_and_a_long_tail():
    over = _report(ok=1000, errors={"503": 2900, "timeout": 3}, p50=7000, p99=7400, scheduled=4000, refused_p99=80)
    light = _report(ok=990, errors={"504": 10}, p50=100, p99=900, scheduled=1000)
    v = overload_verdicts(capacity=47.0, over=over, light=light, max_wait_ms=1000)
    failed = {name for name, target in v.items() if not target["ok"]}
    assert failed == {"goodput_share", "p99_200_ms", "p99_503_ms", "sent_equals_answered", "light_p99_over_p50",
                      "light_errors"}
    assert v["sent_equals_answered"]["value"]["lost"] == {"timeout": 3}


def test_overload_without_a_wait_bound_has_no_latency_bound_to_meet():
    over = _report(ok=1350, errors={"503": 2650}, p50=900, p99=1500, scheduled=4000, refused_p99=20)
    v = overload_verdicts(capacity=47.0, over=over, light=over, max_wait_ms=0)
    assert v["p99_200_ms"] == {"value": 1500, "bound": None, "ok": False}


def test_soak_verdicts_count_every_error_and_the_rss_drift_after_the_first_minute():
    minutes = [{"errors": {}, "rss_mb_min": 800.0}, {"errors": {"503": 2}, "rss_mb_min": 1000.0},
               {"errors": {"503": 1, "504": 1}, "rss_mb_min": 1049.0}]
    v = soak_verdicts(minutes)
    assert v["errors"] == {"value": {"503": 3, "504": 1}, "bound": "none", "ok": False}
    # from the second minute's floor: the first minute had no retired version in it
    assert v["rss_drift_after_first_minute"]["value"] == 0.049 and v["rss_drift_after_first_minute"]["ok"]
    minutes[-1]["rss_mb_min"] = 1051.0
    assert not soak_verdicts(minutes)["rss_drift_after_first_minute"]["ok"]


def test_the_soak_publishes_a_copy_as_the_next_version_and_keeps_the_two_latest(tmp_path):
    model = tmp_path / "resnet18"
    (model / "3").mkdir(parents=True)
    (model / "3" / "model.json").write_text(json.dumps({"name": "resnet18", "version": 3}))
    (model / "3" / "model.onnx").write_bytes(b"weights")
    assert publish_next(model) == 4
    assert json.loads((model / "4" / "model.json").read_text()) == {"name": "resnet18", "version": 4}
    assert (model / "4" / "model.onnx").read_bytes() == b"weights"
    assert publish_next(model) == 5
    assert sorted(p.name for p in model.iterdir()) == ["4", "5"]  # no staging folder left behind


def test_first_run_measures_each_size_after_a_batch_of_one(exported_repo):
    from bench.first_run import first_runs

    result = first_runs(exported_repo / "resnet18" / "1", "cpu", [2, 4], rounds=1)
    assert result["provider"] == "CPUExecutionProvider"
    assert set(result["sizes"]) == {"2", "4"}
    for point in result["sizes"].values():
        assert len(point["first_ms"]) == len(point["next_ms"]) == 1 and point["first_ms"][0] > 0
        assert point["first_over_next"] == round(point["first_ms"][0] / point["next_ms"][0], 3)
