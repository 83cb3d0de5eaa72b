"""An experiment's report: per-variant figures, comparisons, shadows, verdict, time series.

``build_report(data, variants=[...], shadows=[...])`` returns plain JSON data
(``json.dumps(report, allow_nan=False)`` works: no NaN, no infinity, no numpy
types). Rates are fractions in [0, 1], times are seconds (latencies) or unix
times (timestamps). Anything that cannot be computed (no data) is ``null``;
counts are then 0. Intervals are 95 % (Wilson score for a proportion,
Newcombe's hybrid score for a difference of proportions).

Top level:

* ``experiment``: the experiment's name. ``generated_at``: unix time (``now``).
* ``control``: the first primary variant (comparisons are against it), or null.
* ``settings``: ``confidence``, ``alpha`` (before Bonferroni), ``min_n``,
  ``power``, ``min_effect`` used by the verdict (see ``stats.verdict``).
* ``verdict``: one line of text; ``verdict_kind``: ``"insufficient_data"``,
  ``"significant"``, ``"no_difference"`` or ``"no_comparison"`` (fewer than two
  primary variants). With two variants it is the comparison's verdict; with
  more, the comparisons' verdicts joined as ``"B vs A: ...; C vs A: ..."`` and
  the kind is the most decisive one (significant > insufficient_data >
  no_difference).
* ``variants``: one object per primary variant, in the order given:

  * ``name``; ``models``: ``[{model, version, n_images}]`` that served it.
  * ``n_images``: primary predictions (one per image); ``n_requests``:
    distinct request ids.
  * ``latency_s``: ``{n, p50, p90, p99, mean}`` over *requests* (a request's
    latency is arrival to response, the same for all its images; the max is
    taken if they differ). Percentiles interpolate linearly (numpy default).
  * ``latency_histogram``: ``{edges, counts}`` over requests; ``counts[i]``
    counts latencies in ``[edges[i], edges[i+1])``, the last one those
    ``>= edges[-1]``. The edges are fixed (``LATENCY_EDGES_S``), the same for
    every variant and every report.
  * ``top1_distribution``: the 10 most frequent top-1 classes,
    ``[{class, name, count, share}]``, by count then class index; ``name``
    from ``labels[variant]`` or null; ``share`` = count / ``n_images``.
    ``distinct_top1_classes``: how many different top-1 classes were served.
  * ``mean_confidence``: mean top-1 softmax score.
  * ``labelled_n``: images with feedback (a true label).
  * ``top1_accuracy``, ``top5_accuracy``: ``{correct, n, rate, low, high}``
    over the labelled images (top-5: the label is among the returned classes).
* ``comparisons``: one per primary variant after the control:
  ``{control, variant, metric: "top1_accuracy", control_n, variant_n,
  difference, low, high, z, p_value, alpha, verdict, verdict_kind,
  needed_per_variant}``; ``difference`` is variant minus control (positive:
  the variant is more accurate), ``z`` has the same sign, ``p_value`` is the
  two-sided pooled z-test, ``alpha`` the Bonferroni level ``0.05 / (k - 1)``
  for k primary variants, ``needed_per_variant`` the N of "need ~N more"
  (else null).
* ``shadow_comparisons``: one per (primary variant, shadow variant) pair,
  primary variants outer: ``{primary, shadow, n_pairs, top1_agreement:
  {agree, n, rate, low, high}, mean_top5_overlap, latency_diff_s: {median,
  mean}}``. A pair is the primary's and the shadow's prediction on the same
  image; agreement: same top-1 class; top-5 overlap: ``|top5 ∩ top5'| / 5``;
  latency difference: shadow minus primary per pair (both are model latency:
  time in the model's queue plus inference, so decoding and HTTP are excluded).
* ``shadow_shed``: ``{shadow variant: images shed}`` for the shadows asked for
  (0 if absent from the data).
* ``timeseries``: cumulative top-1 accuracy for charts: ``{edges, variants:
  {name: [{t, n, correct, rate, low, high}]}}``. ``edges`` split the span from
  the first to the last primary prediction (``created_at``) into
  ``TIMESERIES_BUCKETS`` equal buckets (one if the span is 0, none without
  data); point ``i`` counts the labelled predictions created up to ``edges[i+1]``
  (``t``). Labels arriving later change past points: it is accuracy by
  prediction time, as known now.
* ``unlisted``: ``{primaries, shadow_pairs}``: records of variants or shadows
  not asked for, left out of everything above.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, defaultdict
from typing import Any, Iterable

from service.experiments.stats import (
    decide,
    difference_interval,
    percentiles,
    two_proportion_test,
    wilson_interval,
)
from service.store.records import ExperimentData, LabelledPrediction, ShadowPair

__all__ = ["LATENCY_EDGES_S", "TIMESERIES_BUCKETS", "TOP_CLASSES", "build_report"]

# 0, then 1, 1.5, 2, 3, 5, 7 per decade from 1 ms to 10 s: about 6 buckets a decade.
LATENCY_EDGES_S: tuple[float, ...] = (0.0,) + tuple(
    round(m * 10.0 ** e, 6) for e in range(-3, 1) for m in (1, 1.5, 2, 3, 5, 7)
) + (10.0,)
TIMESERIES_BUCKETS = 20
TOP_CLASSES = 10
CONFIDENCE = 0.95
POWER = 0.8
MIN_EFFECT = 0.01

_KIND_RANK = {"significant": 0, "insufficient_data": 1, "no_difference": 2}


def build_report(data: ExperimentData, *, variants: list[str], shadows: list[str],
                 labels: dict[str, list[str]] | None = None, now: float | None = None,
                 alpha: float = 0.05, min_n: int = 30) -> dict[str, Any]:
    """The report of ``data`` for the primary ``variants`` (the first is the control)
    and the ``shadows``; fields in the module docstring. Never raises on missing
    data: a variant without records gets zero counts and nulls."""
    labels = labels or {}
    variants = list(dict.fromkeys(variants))
    shadows = list(dict.fromkeys(shadows))
    wanted, wanted_shadows = set(variants), set(shadows)

    by_variant: dict[str, list[LabelledPrediction]] = defaultdict(list)
    unlisted_primaries = 0
    for lp in data.primaries:
        if lp.prediction.variant in wanted:
            by_variant[lp.prediction.variant].append(lp)
        else:
            unlisted_primaries += 1

    pairs: dict[tuple[str, str], list[ShadowPair]] = defaultdict(list)
    unlisted_pairs = 0
    for pair in data.shadow_pairs:
        key = (pair.primary.variant, pair.shadow.variant)
        if key[0] in wanted and key[1] in wanted_shadows:
            pairs[key].append(pair)
        else:
            unlisted_pairs += 1

    blocks = [_variant_block(v, by_variant.get(v, []), labels.get(v)) for v in variants]
    comparisons = _comparisons(blocks, alpha=alpha, min_n=min_n)
    text, kind = _overall_verdict(variants, comparisons)

    return {
        "experiment": data.experiment,
        "generated_at": float(time.time() if now is None else now),
        "control": variants[0] if variants else None,
        "settings": {"confidence": CONFIDENCE, "alpha": alpha, "min_n": min_n,
                     "power": POWER, "min_effect": MIN_EFFECT},
        "verdict": text,
        "verdict_kind": kind,
        "variants": blocks,
        "comparisons": comparisons,
        "shadow_comparisons": [
            _shadow_block(v, s, pairs.get((v, s), [])) for v in variants for s in shadows
        ],
        "shadow_shed": {s: int(data.shadow_shed.get(s, 0)) for s in shadows},
        "timeseries": _timeseries(variants, by_variant),
        "unlisted": {"primaries": unlisted_primaries, "shadow_pairs": unlisted_pairs},
    }


def _rate_block(successes: int, n: int, key: str = "correct") -> dict[str, Any]:
    if n == 0:
        return {key: 0, "n": 0, "rate": None, "low": None, "high": None}
    low, high = wilson_interval(successes, n, CONFIDENCE)
    return {key: successes, "n": n, "rate": successes / n, "low": low, "high": high}


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _histogram(values: Iterable[float]) -> dict[str, list]:
    counts = [0] * len(LATENCY_EDGES_S)
    for v in values:
        # bisect_right - 1: the bucket whose lower edge is <= v; negative clock skew -> first bucket.
        counts[max(0, bisect.bisect_right(LATENCY_EDGES_S, v) - 1)] += 1
    return {"edges": list(LATENCY_EDGES_S), "counts": counts}


def _class_name(names: list[str] | None, index: int) -> str | None:
    if names is not None and 0 <= index < len(names):
        return str(names[index])
    return None


def _variant_block(name: str, preds: list[LabelledPrediction],
                   names: list[str] | None) -> dict[str, Any]:
    records = [lp.prediction for lp in preds]
    n_images = len(records)

    request_latency: dict[str, float] = {}
    for r in records:
        prev = request_latency.get(r.request_id)
        request_latency[r.request_id] = r.latency_s if prev is None else max(prev, r.latency_s)
    latencies = list(request_latency.values())
    p50, p90, p99 = percentiles(latencies, (50, 90, 99))

    top1 = Counter(r.top5[0] for r in records if r.top5)
    top = sorted(top1.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CLASSES]

    labelled = [lp for lp in preds if lp.label is not None]
    top1_ok = sum(1 for lp in labelled if lp.prediction.top5[:1] == (lp.label,))
    top5_ok = sum(1 for lp in labelled if lp.label in lp.prediction.top5[:5])

    models = Counter((r.model, r.version) for r in records)
    return {
        "name": name,
        "models": [{"model": m, "version": v, "n_images": c}
                   for (m, v), c in sorted(models.items(), key=lambda kv: (-kv[1], kv[0]))],
        "n_images": n_images,
        "n_requests": len(request_latency),
        "latency_s": {"n": len(latencies), "p50": p50, "p90": p90, "p99": p99,
                      "mean": _mean(latencies)},
        "latency_histogram": _histogram(latencies),
        "top1_distribution": [
            {"class": int(c), "name": _class_name(names, c), "count": k, "share": k / n_images}
            for c, k in top
        ],
        "distinct_top1_classes": len(top1),
        "mean_confidence": _mean([float(r.top5_scores[0]) for r in records if r.top5_scores]),
        "labelled_n": len(labelled),
        "top1_accuracy": _rate_block(top1_ok, len(labelled)),
        "top5_accuracy": _rate_block(top5_ok, len(labelled)),
    }


def _comparisons(blocks: list[dict[str, Any]], *, alpha: float, min_n: int) -> list[dict[str, Any]]:
    if len(blocks) < 2:
        return []
    control = blocks[0]
    level = alpha / (len(blocks) - 1)
    sc, nc = control["top1_accuracy"]["correct"], control["top1_accuracy"]["n"]
    out = []
    for block in blocks[1:]:
        sv, nv = block["top1_accuracy"]["correct"], block["top1_accuracy"]["n"]
        decision = decide(sc, nc, sv, nv, name_a=control["name"], name_b=block["name"],
                          alpha=level, power=POWER, min_n=min_n, min_effect=MIN_EFFECT)
        entry: dict[str, Any] = {
            "control": control["name"], "variant": block["name"], "metric": "top1_accuracy",
            "control_n": nc, "variant_n": nv,
            "difference": None, "low": None, "high": None, "z": None, "p_value": None,
            "alpha": level, "verdict": decision.text, "verdict_kind": decision.kind,
            "needed_per_variant": decision.needed_per_variant,
        }
        if nc and nv:
            low, high = difference_interval(sv, nv, sc, nc, CONFIDENCE)
            z, p = two_proportion_test(sv, nv, sc, nc)
            entry.update(difference=sv / nv - sc / nc, low=low, high=high, z=z, p_value=p)
        out.append(entry)
    return out


def _overall_verdict(variants: list[str], comparisons: list[dict[str, Any]]) -> tuple[str, str]:
    if not variants:
        return "no variants: nothing to compare", "no_comparison"
    if len(variants) == 1:
        return f"only one variant ({variants[0]}): nothing to compare", "no_comparison"
    if len(comparisons) == 1:
        return comparisons[0]["verdict"], comparisons[0]["verdict_kind"]
    text = "; ".join(f"{c['variant']} vs {c['control']}: {c['verdict']}" for c in comparisons)
    kind = min((c["verdict_kind"] for c in comparisons), key=_KIND_RANK.__getitem__)
    return text, kind


def _shadow_block(primary: str, shadow: str, pairs: list[ShadowPair]) -> dict[str, Any]:
    n = len(pairs)
    agree = sum(1 for p in pairs if p.primary.top5[:1] == p.shadow.top5[:1] and p.primary.top5)
    overlaps = [len(set(p.primary.top5[:5]) & set(p.shadow.top5[:5])) / 5.0 for p in pairs]
    diffs = [p.shadow.latency_s - p.primary.latency_s for p in pairs]
    return {
        "primary": primary,
        "shadow": shadow,
        "n_pairs": n,
        "top1_agreement": _rate_block(agree, n, key="agree"),
        "mean_top5_overlap": _mean(overlaps),
        "latency_diff_s": {"median": percentiles(diffs, (50,))[0], "mean": _mean(diffs)},
    }


def _timeseries(variants: list[str],
                by_variant: dict[str, list[LabelledPrediction]]) -> dict[str, Any]:
    times = [lp.prediction.created_at for v in variants for lp in by_variant.get(v, [])]
    if not times:
        return {"edges": [], "variants": {v: [] for v in variants}}
    t0, t1 = min(times), max(times)
    buckets = TIMESERIES_BUCKETS if t1 > t0 else 1
    edges = [t0 + (t1 - t0) * i / buckets for i in range(buckets)] + [t1]
    series: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        labelled = sorted(
            (lp.prediction.created_at, lp.prediction.top5[:1] == (lp.label,))
            for lp in by_variant.get(v, []) if lp.label is not None
        )
        stamps = [t for t, _ in labelled]
        cum_correct = [0]
        for _, ok in labelled:
            cum_correct.append(cum_correct[-1] + int(ok))
        points = []
        for t in edges[1:]:
            n = bisect.bisect_right(stamps, t)
            points.append({"t": t, **_rate_block(cum_correct[n], n)})
        series[v] = points
    return {"edges": edges, "variants": series}
