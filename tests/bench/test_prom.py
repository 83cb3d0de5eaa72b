"""bench.prom: the server's own figures over a window, from two scrapes of archserve's real metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench.prom import histogram_quantile, parse_metrics, server_figures
from service.metrics import Metrics


def test_samples_are_keyed_by_name_and_sorted_labels():
    text = ('# TYPE x_total counter\nx_total{model="m",code="200"} 3.0\n'
            'h_bucket{model="m",le="+Inf"} 2.0\nplain 1.5\n')
    assert parse_metrics(text) == {
        ("x_total", (("code", "200"), ("model", "m"))): 3.0,
        ("h_bucket", (("le", "+Inf"), ("model", "m"))): 2.0,
        ("plain", ()): 1.5,
    }
    with pytest.raises(ValueError):
        parse_metrics("not { prometheus text\n")


def test_quantiles_interpolate_inside_the_bucket_as_prometheus_does():
    buckets = {0.1: 10.0, 0.2: 30.0, float("inf"): 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == 0.2  # in the +Inf bucket: its lower bound
    assert histogram_quantile(0.5, {}) is None


def test_the_server_figures_are_the_deltas_over_the_window():
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def batch(model: str, size: int, seconds: float) -> None:
        metrics.batch_size.labels(model, "1").observe(size)
        metrics.inference_latency.labels(model, "1").observe(seconds)
        for _ in range(size):
            metrics.requests.labels(model, "1", "200").inc()
            metrics.request_latency.labels(model, "1").observe(seconds + 0.01)

    batch("resnet18", 1, 0.02)  # before the window: not counted
    batch("other", 8, 0.5)  # another model: not counted
    before = parse_metrics(generate_latest(registry).decode())
    batch("resnet18", 4, 0.03)
    batch("resnet18", 2, 0.01)
    metrics.requests.labels("resnet18", "1", "503").inc()
    after = parse_metrics(generate_latest(registry).decode())

    figures = server_figures(before, after, "resnet18")
    assert figures["batches"] == 2 and figures["images_batched"] == 6 and figures["mean_batch_size"] == 3.0
    assert figures["batch_size_histogram"] == {"<=2": 1, "<=4": 1}
    assert figures["inference_ms_per_batch"] == pytest.approx(20.0)
    assert figures["requests_by_code"] == {"200": 6, "503": 1}
    assert figures["request_latency_ms"]["mean"] == pytest.approx((4 * 40.0 + 2 * 20.0) / 6, abs=1e-3)
    # Rank 3 of 6: two at <= 25 ms, four more by 50 ms, so a quarter of the way into that bucket.
    assert figures["request_latency_ms"]["p50"] == pytest.approx(31.25)
    assert server_figures(None, after, "resnet18") is None
