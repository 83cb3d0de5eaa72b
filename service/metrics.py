"""Prometheus metrics: base units (seconds), ``_total`` counters, histograms.

Labels come only from served model names and versions (or ``_unknown`` for a
request naming no served model), never from raw paths. With several worker
processes, prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
set by ``python -m service`` before the workers start) makes one scrape show
the sum over all of them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

# `_created` timestamps double the exposition and no dashboard here uses them.
disable_created_metrics()

LABELS = ("model", "version")
UNKNOWN_MODEL = "_unknown"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class LabelledChildren:
    """``child(metric, *values)`` is ``metric.labels(*values)``, looked up once per label set.

    prometheus-client resolves labels under a lock on every call; the request
    path asks for the same few children on every request. Children are created
    on first use (as ``labels`` would), so the exposition is unchanged. Only
    label sets that are never ``remove``d may go through here: the cache would
    keep a removed child alive but no longer exported (``model_info`` is removed
    on unload, so it does not). Label values are bounded (served models,
    experiment variants, status codes), and so is the cache.
    """

    def __init__(self) -> None:
        self._children: dict[tuple, object] = {}

    def child(self, metric, *values: str):
        key = (metric, values)
        try:
            return self._children[key]
        except KeyError:
            # Two threads racing here both get the same child: labels() itself is locked.
            child = self._children[key] = metric.labels(*values)
            return child


class Metrics(LabelledChildren):
    """The service's metrics, registered once per process."""

    def __init__(self, registry: CollectorRegistry = DEFAULT_REGISTRY) -> None:
        super().__init__()
        self.registry = registry
        self.requests = Counter(
            "archserve_requests", "Classification requests by final HTTP status code.",
            LABELS + ("code",), registry=registry,
        )
        self.images = Counter(
            "archserve_images", "Images classified successfully.", LABELS, registry=registry,
        )
        self.request_latency = Histogram(
            "archserve_request_duration_seconds",
            "End-to-end time of a classification request, from arrival to response.",
            LABELS, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.preprocess_latency = Histogram(
            "archserve_preprocess_duration_seconds",
            "Time to decode, resize and crop one image (thread pool).",
            LABELS, buckets=STAGE_BUCKETS, registry=registry,
        )
        self.queue_wait = Histogram(
            "archserve_queue_wait_seconds",
            "Time an image waited in its model's queue before its batch was dispatched.",
            LABELS, buckets=STAGE_BUCKETS, registry=registry,
        )
        self.inference_latency = Histogram(
            "archserve_inference_duration_seconds",
            "onnxruntime run time of one batch.",
            LABELS, buckets=STAGE_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "archserve_batch_size", "Images per batch sent to onnxruntime.",
            LABELS, buckets=BATCH_BUCKETS, registry=registry,
        )
        self.alone_batches = Counter(
            "archserve_alone_batches",
            "Batches run alone on all the CPU cores: with CPU lanes, one request that found the model idle (the "
            "rest of archserve_batch_size_count ran in a lane, beside other batches). Always 0 without lanes.",
            LABELS, registry=registry,
        )
        self.batch_failures = Counter(
            "archserve_batch_failures", "Batches whose onnxruntime run failed.", LABELS, registry=registry,
        )
        self.expired = Counter(
            "archserve_expired_images", "Images dropped from a queue because their deadline passed.",
            LABELS, registry=registry,
        )
        self.queue_depth = Gauge(
            "archserve_queue_depth", "Images waiting in the model's queue.",
            LABELS, registry=registry, multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "archserve_inflight_requests", "Classification requests being served.",
            LABELS, registry=registry, multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "archserve_model_info",
            "A served model version (value 1) and how it runs: architecture, precision, execution provider, "
            "weight provenance.",
            LABELS + ("architecture", "precision", "provider", "weights"),
            registry=registry, multiprocess_mode="liveall",
        )
        self.model_loads = Counter(
            "archserve_model_loads",
            "Model versions loaded at run time (hot reload, load calls) by outcome: loaded or failed.",
            ("model", "outcome"), registry=registry,
        )
        self.ready = Gauge(
            "archserve_ready", "1 once every model is loaded and warmed up.",
            registry=registry, multiprocess_mode="livemin",
        )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def forget_dead_processes(directory: str) -> list[int]:
    """Remove the live-mode gauge files of worker processes that are gone, and return their pids.

    prometheus-client keeps a ``gauge_live*_<pid>.db`` file per process until ``mark_process_dead`` is called
    for it (this does the same). A worker killed, or replaced in a rolling restart, would otherwise go on being
    merged into every scrape: its ``archserve_model_info`` series and queue depth forever, and its
    ``archserve_ready`` in the ``livemin``. Counters and histograms of dead workers stay, as they should (their
    totals happened)."""
    files: dict[int, list[str]] = {}
    for name in os.listdir(directory):
        if name.startswith("gauge_live") and name.endswith(".db"):
            pid = name[: -len(".db")].rpartition("_")[2]
            if pid.isdigit():
                files.setdefault(int(pid), []).append(name)
    dead = sorted(pid for pid in files if not _process_exists(pid))
    for pid in dead:
        for name in files[pid]:
            # What prometheus-client's mark_process_dead does, but another worker scraping at the same moment
            # may have removed the file first (the collector itself tolerates that for live gauges).
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
    return dead


def exposition(registry: CollectorRegistry = DEFAULT_REGISTRY) -> tuple[bytes, str]:
    """The text exposition for ``/metrics``, merged over processes when multiprocess."""
    if directory := multiprocess_dir():
        forget_dead_processes(directory)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        from .runtime_metrics import multiprocess_collectors  # process_* of every process, the GPUs

        for collector in multiprocess_collectors():
            merged.register(collector)
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST


EXPERIMENT_LABELS = ("experiment", "variant")
CONFIDENCE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
OVERLAP_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DIFFERENCE_BUCKETS = (-2.5, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, -0.005, 0.0,
                      0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class ModelMetrics:
    """One model version's request metrics, labelled once when it loads: the request path only observes."""

    in_flight: Gauge
    images: Counter
    latency: Histogram
    preprocess: Histogram

    @classmethod
    def of(cls, metrics: Metrics, name: str, version: str) -> "ModelMetrics":
        labels = (name, version)
        return cls(
            in_flight=metrics.child(metrics.in_flight, *labels),
            images=metrics.child(metrics.images, *labels),
            latency=metrics.child(metrics.request_latency, *labels),
            preprocess=metrics.child(metrics.preprocess_latency, *labels),
        )


class ExperimentMetrics(LabelledChildren):
    """Per experiment and variant; label values come only from the experiments file."""

    def __init__(self, registry: CollectorRegistry = DEFAULT_REGISTRY) -> None:
        super().__init__()
        self.requests = Counter(
            "archserve_experiment_requests", "Requests to an experiment by the variant that served them and status.",
            EXPERIMENT_LABELS + ("code",), registry=registry,
        )
        self.latency = Histogram(
            "archserve_experiment_request_duration_seconds",
            "End-to-end request time by experiment variant.",
            EXPERIMENT_LABELS, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.confidence = Histogram(
            "archserve_experiment_confidence", "Top-1 softmax probability of each image, by variant.",
            EXPERIMENT_LABELS, buckets=CONFIDENCE_BUCKETS, registry=registry,
        )
        self.shadow_images = Counter(
            "archserve_shadow_images",
            "Images of a shadow variant by outcome: done, shed, failed, or skipped_identical (not run: the model "
            "version serving the request is the shadow's own).",
            EXPERIMENT_LABELS + ("outcome",), registry=registry,
        )
        self.shadow_agreement = Counter(
            "archserve_shadow_top1_agreement",
            "Shadow runs whose top-1 class agreed (agree=true) or not with the primary's on the same image.",
            EXPERIMENT_LABELS + ("agree",), registry=registry,
        )
        self.shadow_overlap = Histogram(
            "archserve_shadow_top5_overlap", "Share of the primary's top-5 classes also in the shadow's top-5.",
            EXPERIMENT_LABELS, buckets=OVERLAP_BUCKETS, registry=registry,
        )
        self.shadow_latency_difference = Histogram(
            "archserve_shadow_latency_difference_seconds",
            "Shadow minus primary model latency (queue + inference) on the same image.",
            EXPERIMENT_LABELS, buckets=DIFFERENCE_BUCKETS, registry=registry,
        )
        self.feedback = Counter(
            "archserve_feedback", "Images that received a true label, by the variant that served them.",
            EXPERIMENT_LABELS, registry=registry,
        )
        self.feedback_correct = Counter(
            "archserve_feedback_correct",
            "Labelled images whose true class was in the variant's top-k (k=1 or 5).",
            EXPERIMENT_LABELS + ("k",), registry=registry,
        )
        self.guardrail_breached = Gauge(
            "archserve_experiment_guardrail_breached",
            "1 while a guardrail decision (pause or alert) stands against a variant, by the guardrail that fired.",
            EXPERIMENT_LABELS + ("guardrail",), registry=registry, multiprocess_mode="livemax",
        )
        # (experiment, variant) -> [answers, 5xx answers] in this process, for the error_rate guardrail.
        self.answers: dict[tuple[str, str], list[int]] = {}
        self.variant_model = Gauge(
            "archserve_experiment_variant_model",
            "1 for each model version an experiment variant has served: joins the per-model series (compute per "
            "image) to variants.",
            EXPERIMENT_LABELS + LABELS, registry=registry, multiprocess_mode="max",  # one series, not one per pid
        )
        self.store_errors = Counter(
            "archserve_store_errors",
            "Prediction-log writes that failed and were buffered for retry (the request was still answered).",
            registry=registry,
        )
        self.store_up = Gauge(
            "archserve_store_up",
            "0 while the experiment store is degraded (writes buffered), else 1 (also when no store is configured).",
            registry=registry, multiprocess_mode="livemin",
        )
        self.store_pending = Gauge(
            "archserve_store_pending_records", "Prediction records buffered in memory while the store is down.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.store_dropped = Counter(
            "archserve_store_dropped_records",
            "Prediction records dropped, oldest first, because the store was down longer than the buffer lasts.",
            registry=registry,
        )
        self.store_write_wait = Histogram(
            "archserve_store_write_wait_seconds",
            "How long each prediction-log write was waited for (a request's, before its answer, or a shadow's); "
            "bounded: a slower write goes on in the background and its records are buffered.",
            buckets=STAGE_BUCKETS, registry=registry,
        )
