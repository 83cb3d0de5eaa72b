"""archserve's ``/metrics`` over a measured window: a scrape at each end, the deltas as server-side figures."""

from __future__ import annotations

import asyncio
import math

from prometheus_client.parser import text_string_to_metric_families

from .http_client import ProtocolError, Target, http_get

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition; raises ValueError on text that is not one."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def scrape(target: Target) -> Samples | None:
    try:
        status, body = await http_get(target, "/metrics")
    except (OSError, asyncio.TimeoutError, ProtocolError, asyncio.IncompleteReadError):
        return None
    if status != 200:
        return None
    try:
        return parse_metrics(body.decode("utf-8", "replace"))
    except ValueError:  # a /metrics that is not Prometheus text: no server figures, as without one
        return None


def _select(samples: Samples, name: str, model: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name and ("model", model) in labels}


def _total(samples: Samples, name: str, model: str) -> float:
    return sum(_select(samples, name, model).values())


def _buckets(samples: Samples, name: str, model: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in _select(samples, name + "_bucket", model).items():
        le = dict(labels).get("le")
        if le is not None:
            bound = math.inf if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + value
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile on cumulative bucket counts: linear inside the bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        cumulative = buckets[bound]
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def server_figures(before: Samples | None, after: Samples | None, model: str) -> dict | None:
    """Deltas of archserve's metrics over the measured window."""
    if before is None or after is None:
        return None

    def delta(name: str) -> float:
        return _total(after, name, model) - _total(before, name, model)

    def hist_delta(name: str) -> dict[float, float]:
        b, a = _buckets(before, name, model), _buckets(after, name, model)
        return {k: a[k] - b.get(k, 0.0) for k in a}

    def mean_ms(name: str) -> float | None:
        count = delta(name + "_count")
        return 1000.0 * delta(name + "_sum") / count if count > 0 else None

    batches = delta("archserve_batch_size_count")
    images = delta("archserve_batch_size_sum")
    request_buckets = hist_delta("archserve_request_duration_seconds")
    quantiles = {}
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value = histogram_quantile(q, request_buckets)
        quantiles[label] = None if value is None else round(1000.0 * value, 3)
    batch_buckets = hist_delta("archserve_batch_size")
    batch_hist, below = {}, 0.0
    for bound in sorted(batch_buckets):
        count = batch_buckets[bound] - below
        below = batch_buckets[bound]
        if count > 0:
            batch_hist["+Inf" if math.isinf(bound) else f"<={int(bound)}"] = int(round(count))
    codes: dict[str, int] = {}
    for labels, value in _select(after, "archserve_requests_total", model).items():
        previous = (before or {}).get(("archserve_requests_total", labels), 0.0)
        if value - previous > 0:
            codes[dict(labels).get("code", "?")] = int(round(value - previous))
    return {
        "batches": int(round(batches)),
        "images_batched": int(round(images)),
        "mean_batch_size": round(images / batches, 3) if batches > 0 else None,
        "batch_size_histogram": batch_hist,
        "alone_batches": int(round(delta("archserve_alone_batches_total"))),
        "request_latency_ms": {**quantiles, "mean": _round(mean_ms("archserve_request_duration_seconds"))},
        "inference_ms_per_batch": _round(mean_ms("archserve_inference_duration_seconds")),
        "preprocess_ms_per_image": _round(mean_ms("archserve_preprocess_duration_seconds")),
        "queue_wait_ms_per_image": _round(mean_ms("archserve_queue_wait_seconds")),
        "requests_by_code": codes,
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
