"""What each variant costs: model compute per image, params and GFLOPs, and accuracy bought per extra ms.

Compute per image is the batcher's own measure: the onnxruntime run time of
each batch (``archserve_inference_duration_seconds``) over the images in it
(``archserve_batch_size``), summed per model version since the process (or,
with several workers, the multiprocess metrics directory) started. Both are
observed for every batch, so ``sum(run seconds) / sum(images)`` is the mean
run time per image. It is taken from the metrics rather than the prediction
log because the log holds request latency (queueing, decoding, HTTP), not
compute. With several workers the metrics directory merges every process's
counts, the engine's included, so any worker answers the same.

``add_cost(report, variants, measured)`` puts a ``cost`` object in each
variant block of a report:

* ``model``, ``version``: the version served now (null when none is).
* ``params``, ``gflops``: from its manifest (``complexity``).
* ``compute_s_per_image``: mean run time per image (null before any batch);
  ``measured_images``: the images it is measured over.
* against the control (the first variant), null for the control itself and
  whenever a figure is missing: ``compute_difference_s``,
  ``compute_ratio`` (variant / control), ``top1_difference`` (fraction),
  ``top1_gain_per_ms`` = top-1 difference / compute difference in ms (null
  when the compute is the same), and ``summary``: one human line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess

from ..metrics import multiprocess_dir

RUN_SECONDS = "archserve_inference_duration_seconds_sum"
IMAGES = "archserve_batch_size_sum"

Measured = dict[tuple[str, str], tuple[float, float]]  # (model, version) -> (run seconds, images)


@dataclass(frozen=True)
class VariantModel:
    """The model version a variant is served by now, with its manifest's complexity."""

    name: str
    model: str
    version: int | None
    params: int | None
    gflops: float | None


def measured_compute(registry: CollectorRegistry) -> Measured:
    """Run seconds and images per (model, version), merged over workers when multiprocess."""
    if directory := multiprocess_dir():
        registry = CollectorRegistry()  # a fresh one: the directory's files hold every process's counts
        multiprocess.MultiProcessCollector(registry, path=directory)
    totals: dict[tuple[str, str], list[float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in (RUN_SECONDS, IMAGES) and "model" in sample.labels:
                key = (sample.labels["model"], sample.labels.get("version", ""))
                pair = totals.setdefault(key, [0.0, 0.0])
                pair[0 if sample.name == RUN_SECONDS else 1] += sample.value
    return {k: (s, n) for k, (s, n) in totals.items()}


def _rate(block: dict[str, Any]) -> float | None:
    return (block.get("top1_accuracy") or {}).get("rate")


def _summary(name: str, model: str, ratio: float | None, diff_s: float | None, top1_diff: float | None) -> str:
    if ratio is None or diff_s is None:
        return f"{name} ({model}): compute per image not measured yet, no cost comparison"
    cost = f"{name} ({model}) costs {100 * (ratio - 1):+.0f}% compute per image ({1000 * diff_s:+.2f} ms)"
    if top1_diff is None:
        return cost + " against control; top-1 not known yet (no labelled images)"
    return cost + f" for {100 * top1_diff:+.1f} top-1 points against control"


def add_cost(report: dict[str, Any], variants: list[VariantModel], measured: Measured) -> None:
    """Add each variant block's ``cost`` (see the module docstring); blocks match ``variants`` by name."""
    models = {v.name: v for v in variants}
    blocks = report.get("variants") or []
    per_image: dict[str, float | None] = {}
    for block in blocks:
        vm = models.get(block["name"])
        seconds, images = measured.get((vm.model, str(vm.version)), (0.0, 0.0)) if vm and vm.version else (0.0, 0.0)
        per_image[block["name"]] = seconds / images if images else None
        block["cost"] = {
            "model": vm.model if vm else None, "version": vm.version if vm else None,
            "params": vm.params if vm else None, "gflops": vm.gflops if vm else None,
            "compute_s_per_image": per_image[block["name"]], "measured_images": int(images),
            "compute_difference_s": None, "compute_ratio": None, "top1_difference": None,
            "top1_gain_per_ms": None, "summary": None,
        }
    if not blocks:
        return
    control = blocks[0]
    base, base_top1 = per_image[control["name"]], _rate(control)
    for block in blocks[1:]:
        cost, mine, top1 = block["cost"], per_image[block["name"]], _rate(block)
        if mine is not None and base is not None:
            cost["compute_difference_s"] = mine - base
            cost["compute_ratio"] = mine / base if base > 0 else None
        if top1 is not None and base_top1 is not None:
            cost["top1_difference"] = top1 - base_top1
        diff_ms = None if cost["compute_difference_s"] is None else 1000 * cost["compute_difference_s"]
        if diff_ms and cost["top1_difference"] is not None:  # null, not infinity, when the compute is the same
            cost["top1_gain_per_ms"] = cost["top1_difference"] / diff_ms
        cost["summary"] = _summary(block["name"], cost["model"] or "not served", cost["compute_ratio"],
                                   cost["compute_difference_s"], cost["top1_difference"])


def variant_models(table: Any, variants: list[Any]) -> list[VariantModel]:
    """The version each variant (``name``, ``model``, ``version`` or None) is served by now, from the model table."""
    out = []
    for v in variants:
        versions = table.versions(v.model)
        served = (versions.get(v.version) if v.version else versions[max(versions)]) if versions else None
        if served is None:  # unloaded since the experiments were validated: no cost to report
            out.append(VariantModel(v.name, v.model, v.version, None, None))
            continue
        complexity = served.manifest.complexity
        out.append(VariantModel(v.name, v.model, served.version, complexity.params, complexity.gflops))
    return out
