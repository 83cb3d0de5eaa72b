"""Cost per variant: compute per image from the batcher's metrics, manifest complexity, accuracy per extra ms."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from service.experiments.cost import VariantModel, add_cost, measured_compute
from service.experiments.report_html import render_report_html
from service.metrics import Metrics


def _block(name, correct, n):
    return {"name": name, "top1_accuracy": {"correct": correct, "n": n, "rate": correct / n if n else None}}


def _registry_with_batches():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for model, version, size, run_s in (("resnet50", "1", 4, 0.012), ("resnet50", "1", 2, 0.006),
                                        ("se_resnet50", "1", 3, 0.0135), ("other", "2", 1, 9.0)):
        metrics.batch_size.labels(model, version).observe(size)  # as served.py's batch observer does
        metrics.inference_latency.labels(model, version).observe(run_s)
    return registry


def test_compute_per_image_is_run_seconds_over_images_per_model_version():
    measured = measured_compute(_registry_with_batches())
    seconds, images = measured[("resnet50", "1")]
    assert images == 6 and abs(seconds - 0.018) < 1e-12
    assert measured[("se_resnet50", "1")] == (0.0135, 3.0)


def test_cost_against_control_with_the_human_line():
    report = {"variants": [_block("control", 700, 1000), _block("se", 719, 1000), _block("fresh", 0, 0)]}
    variants = [VariantModel("control", "resnet50", 1, 25_557_032, 4.09),
                VariantModel("se", "se_resnet50", 1, 28_088_024, 3.86),
                VariantModel("fresh", "other", 2, 10, 0.5)]
    add_cost(report, variants, measured_compute(_registry_with_batches()))
    control, se, fresh = (v["cost"] for v in report["variants"])
    assert abs(control["compute_s_per_image"] - 0.003) < 1e-12 and control["measured_images"] == 6
    assert control["compute_difference_s"] is None and control["summary"] is None  # the control is the baseline
    assert abs(se["compute_s_per_image"] - 0.0045) < 1e-12 and se["params"] == 28_088_024 and se["gflops"] == 3.86
    assert abs(se["compute_difference_s"] - 0.0015) < 1e-12 and abs(se["compute_ratio"] - 1.5) < 1e-12
    assert abs(se["top1_difference"] - 0.019) < 1e-12
    assert abs(se["top1_gain_per_ms"] - 0.019 / 1.5) < 1e-12
    assert se["summary"] == "se (se_resnet50) costs +50% compute per image (+1.50 ms) for +1.9 top-1 points against control"
    assert fresh["top1_difference"] is None and fresh["top1_gain_per_ms"] is None  # no labels: null, not 0
    assert "top-1 not known yet" in fresh["summary"]
    json.dumps(report, allow_nan=False)


def test_nulls_when_nothing_is_measured_or_the_compute_is_the_same():
    report = {"variants": [_block("a", 5, 10), _block("b", 6, 10), _block("c", 7, 10)]}
    variants = [VariantModel("a", "m", 1, 1, 1.0), VariantModel("b", "m", 1, 1, 1.0), VariantModel("c", "n", None, None, None)]
    add_cost(report, variants, {("m", "1"): (0.01, 10.0)})
    a, b, c = (v["cost"] for v in report["variants"])
    assert b["compute_difference_s"] == 0.0 and b["top1_gain_per_ms"] is None  # same model: no division by 0
    assert c["compute_s_per_image"] is None and c["compute_ratio"] is None
    assert "not measured yet" in c["summary"]


def test_the_page_shows_the_cost_table_and_line():
    report = {"experiment": "x", "variants": [_block("control", 700, 1000), _block("se", 719, 1000)]}
    add_cost(report, [VariantModel("control", "resnet50", 1, 25_557_032, 4.09),
                      VariantModel("se", "se_resnet50", 1, 28_088_024, 3.86)], measured_compute(_registry_with_batches()))
    page = render_report_html(report)
    assert "Cost per variant" in page and "25.6 M" in page and "4.50 ms" in page and "+1.50 ms" in page
    assert "costs +50% compute per image" in page


# A worker process: one model's batches, observed as served.py's batch observer does, in multiprocess mode.
WORKER = """
from service.metrics import Metrics
m = Metrics(None)
for size, run_s in ((4, 0.02), (1, 0.01)):
    m.batch_size.labels("resnet18", "1").observe(size)
    m.inference_latency.labels("resnet18", "1").observe(run_s)
"""


def test_with_several_workers_every_process_counts(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):  # two workers (or a worker and the engine), each with its own batches
        subprocess.run([sys.executable, "-c", WORKER], env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    measured = measured_compute(CollectorRegistry())  # this process's registry is empty: the files count
    seconds, images = measured[("resnet18", "1")]
    assert images == 10 and abs(seconds - 0.06) < 1e-12
