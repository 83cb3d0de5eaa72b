"""``make bench``'s verdict: one row per model and repeat, the targets, each judged on its median repeat, the tables."""

from __future__ import annotations

import math

from .report import dig, md_table

# Targets: archserve end-to-end against the engine alone and against the naive server. The p50 at the low
# client count has no allowance against the naive server: batching must not cost a lone client anything.
E2E_OF_RAW = {"resnet50": 0.90, "resnet18": 0.80}
E2E_OF_RAW_DEFAULT = 0.80
P50_OVER_RAW_MS = 5.0


def engine_both_ends(before: dict, after: dict | None) -> dict:
    """The engine measured before and after the load points, as one report: per batch size the mean of the
    two img/s (and ms per batch); ``img_s_before``/``img_s_after`` keep both. ``before`` alone if no after."""
    if not after:
        return before
    later = {row["batch_size"]: row for row in after["batches"]}
    rows = []
    for row in before["batches"]:
        other = later.get(row["batch_size"])
        if other is None:
            continue
        merged = {**row, "img_s_before": row["img_s"], "img_s_after": other["img_s"]}
        for key in ("img_s", "ms_per_batch", "ms_per_image"):
            if key in row and key in other:
                merged[key] = round((row[key] + other[key]) / 2, 3)
        if "runs" in row and "runs" in other:
            merged["runs"] = row["runs"] + other["runs"]
        if "ms_per_batch_min" in row and "ms_per_batch_min" in other:
            merged["ms_per_batch_min"] = min(row["ms_per_batch_min"], other["ms_per_batch_min"])
        merged.pop("round_img_s", None)  # each run's rounds stay in its own report
        rows.append(merged)
    if not rows:
        return before
    best = max(rows, key=lambda row: row["img_s"])
    return {**before, "batches": rows, "best": {"batch_size": best["batch_size"], "img_s": best["img_s"]}}


def summarise(model: str, r: dict, low: int, high: int) -> dict:
    from .engine_only import at_batch

    engine = r.get("engine") and engine_both_ends(r["engine"], r.get("engine_after"))
    a_hi, a_lo = dig(r, "archserve", f"c{high}"), dig(r, "archserve", f"c{low}")
    n_hi, n_lo = dig(r, "naive", f"c{high}"), dig(r, "naive", f"c{low}")
    mean_batch = dig(a_hi, "server", "mean_batch_size")
    row: dict = {"model": model}
    if engine:
        best = engine["best"]
        bs1 = at_batch(engine, 1)
        row.update(raw_best_img_s=best["img_s"], raw_best_batch=best["batch_size"],
                   raw_b1_ms=bs1["ms_per_batch"] if bs1["batch_size"] == 1 else None)
        top = at_batch(engine, best["batch_size"])
        if "img_s_after" in top:  # how far the machine moved between the two engine runs, at the best batch
            row["raw_drift"] = top["img_s_after"] / top["img_s_before"] - 1
        if mean_batch:
            formed = at_batch(engine, mean_batch)
            row.update(raw_formed_img_s=formed["img_s"], raw_formed_batch=formed["batch_size"])
    row.update(
        mean_batch=mean_batch,
        archserve_img_s=dig(a_hi, "throughput_img_s"),
        archserve_p50_lo=dig(a_lo, "latency_ms", "p50"),
        archserve_p50_hi=dig(a_hi, "latency_ms", "p50"),
        naive_img_s=dig(n_hi, "throughput_img_s"),
        naive_p50_lo=dig(n_lo, "latency_ms", "p50"),
        errors={k: v for k, v in (("archserve", dig(a_hi, "errors")), ("naive", dig(n_hi, "errors"))) if v},
    )
    row["cpu_ms_per_img"] = cpu_breakdown(r, a_hi, row.get("raw_best_img_s"))
    others = [dig(x, "cpu", "other_cores") for x in (r.get("engine"), a_lo, a_hi, n_lo, n_hi, r.get("engine_after"))]
    others = [o for o in others if o is not None]
    row["other_cores_max"] = max(others) if others else None
    if row.get("archserve_img_s") is not None and row.get("raw_best_img_s"):
        row["ratio_best"] = row["archserve_img_s"] / row["raw_best_img_s"]
    if row.get("archserve_img_s") is not None and row.get("raw_formed_img_s"):
        row["ratio_formed"] = row["archserve_img_s"] / row["raw_formed_img_s"]
    if row.get("archserve_p50_lo") is not None and row.get("raw_b1_ms") is not None:
        row["p50_minus_raw_ms"] = row["archserve_p50_lo"] - row["raw_b1_ms"]
    if row.get("archserve_p50_lo") is not None and row.get("naive_p50_lo") is not None:
        row["p50_minus_naive_ms"] = row["archserve_p50_lo"] - row["naive_p50_lo"]
    return row


def cpu_breakdown(r: dict, point: dict | None, raw_img_s: float | None) -> dict | None:
    """Core-ms per image at a load point, by server thread group, beside the engine's alone.

    ``engine_alone`` is the engine runs' CPU (cores, the mean of both runs) over the best img/s: what
    onnxruntime spends per image with the machine to itself. ``inference`` is what it spent in the server,
    so ``inference_vs_alone`` is what sharing the cores with decoding and HTTP cost it."""
    per_img = dig(point, "cpu", "server_threads_core_ms_per_img")
    if not per_img:
        return None
    out = {**per_img, "total": dig(point, "cpu", "server_core_ms_per_img")}
    cores = [c for c in (dig(r, "engine", "cpu", "engine_cores"), dig(r, "engine_after", "cpu", "engine_cores"))
             if c is not None]
    if cores and raw_img_s:
        out["engine_alone"] = round(1000 * sum(cores) / len(cores) / raw_img_s, 2)
        if out.get("inference"):
            out["inference_vs_alone"] = round(out["inference"] / out["engine_alone"] - 1, 3)
    return out


def targets(row: dict, high: int) -> list[dict]:
    """The issue's targets for one model in one repeat. ``margin`` is how far the measurement is on the right
    side of its threshold (negative: the wrong side), in the measurement's unit; ``judge`` ranks repeats by it.
    The verdict is the margin's sign: at the threshold (0) a pass, except for the strict ``>`` targets."""
    model = row["model"]
    out = []

    def add(name: str, measured: str, threshold: str, margin: float | None, strict: bool = False) -> None:
        ok = None if margin is None else (margin > 0 if strict else margin >= 0)
        out.append({"model": model, "target": name, "measured": measured, "threshold": threshold,
                    "pass": ok, "margin": margin})

    need = E2E_OF_RAW.get(model, E2E_OF_RAW_DEFAULT)
    ratio = row.get("ratio_best")
    add(f"e2e @{high} / raw engine (best batch)", f"{ratio:.1%}" if ratio is not None else "n/a",
        f">= {need:.0%}", None if ratio is None else ratio - need)
    diff = row.get("p50_minus_raw_ms")
    add("p50 @1 - raw batch-1 latency", f"{diff:+.1f} ms" if diff is not None else "n/a",
        f"<= +{P50_OVER_RAW_MS:g} ms", None if diff is None else P50_OVER_RAW_MS - diff)
    mb = row.get("mean_batch")
    add(f"mean batch size @{high}", f"{mb:.2f}" if mb is not None else "n/a", "> 1",
        None if mb is None else mb - 1, strict=True)
    a, n = row.get("archserve_img_s"), row.get("naive_img_s")
    both = a is not None and n is not None
    add(f"throughput @{high} vs naive", f"{a:.1f} vs {n:.1f} img/s" if both else "n/a", "archserve > naive",
        a - n if both else None, strict=True)
    a, n = row.get("archserve_p50_lo"), row.get("naive_p50_lo")
    both = a is not None and n is not None
    add("p50 @1 vs naive", f"{a:.2f} vs {n:.2f} ms ({a - n:+.2f})" if both else "n/a",
        "archserve <= naive (same run)", n - a if both else None)
    return out


def judge(repeats: list[list[dict]]) -> list[dict]:
    """Each target over the repeats of one run: judged on its median repeat.

    The repeats are ranked by ``margin`` and the verdict, measurement and margin are those of the median one
    (with an even count, the lower of the two middle ones). With an odd count that is a majority vote: the
    target passes when it passed in more than half of the repeats. ``repeats`` keeps every repeat's
    measurement and ``passed`` how many of the ``of`` repeats met it. A repeat in which a step failed (no
    margin) ranks below every measured one, so it counts against the target: when the median lands on one,
    the target is not judged (``pass`` None), never passed on a minority of measured repeats."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for checks in repeats:
        for check in checks:
            groups.setdefault((check["model"], check["target"]), []).append(check)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda c: -math.inf if c.get("margin") is None else c["margin"])
        median = ranked[(len(ranked) - 1) // 2]
        out.append({**median, "repeats": [c["measured"] for c in group],
                    "passed": sum(c["pass"] is True for c in group), "of": len(group)})
    return out


def _f(value, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(rows: list[dict], checks: list[dict], low: int, high: int) -> str:
    """The tables: one row per model (per model and repeat when rows carry ``repeat``), then the targets
    (with every repeat's measurement when ``checks`` come from ``judge`` over several repeats)."""
    repeated = any("repeat" in r for r in rows)
    first = ["model", "repeat"] if repeated else ["model"]

    def label(r: dict) -> list[str]:
        return [r["model"], str(r.get("repeat", ""))] if repeated else [r["model"]]

    lines = md_table(
        [*first, "raw engine img/s: best (batch)", "raw @ formed batch (batch)", f"archserve e2e img/s @{high}",
         "/ raw best", "/ raw formed", f"naive e2e img/s @{high}", f"archserve p50 @{low} ms", "raw batch-1 ms",
         "difference ms", f"naive p50 @{low} ms", "vs naive ms", f"mean batch @{high}", "raw drift (after / before)",
         "other load (cores)"],
        ([*label(r),
          f"{_f(r.get('raw_best_img_s'))} ({r.get('raw_best_batch', 'n/a')})",
          f"{_f(r.get('raw_formed_img_s'))} ({r.get('raw_formed_batch', 'n/a')})",
          _f(r.get("archserve_img_s")),
          _f(r.get("ratio_best"), "{:.0%}"),
          _f(r.get("ratio_formed"), "{:.0%}"),
          _f(r.get("naive_img_s")),
          _f(r.get("archserve_p50_lo")),
          _f(r.get("raw_b1_ms")),
          _f(r.get("p50_minus_raw_ms"), "{:+.1f}"),
          _f(r.get("naive_p50_lo")),
          _f(r.get("p50_minus_naive_ms"), "{:+.1f}"),
          _f(r.get("mean_batch"), "{:.2f}"),
          _f(r.get("raw_drift"), "{:+.1%}"),
          _f(r.get("other_cores_max"), "{:.2f}")] for r in rows))
    if any(r.get("cpu_ms_per_img") for r in rows):
        cpu = [(r, r.get("cpu_ms_per_img") or {}) for r in rows]
        lines += ["", *md_table(
            [*first, "engine alone: core-ms/img", f"archserve @{high}: inference", "vs alone", "decode",
             "event loop", "other", "server total"],
            ([*label(r), _f(c.get("engine_alone")), _f(c.get("inference")),
              _f(c.get("inference_vs_alone"), "{:+.0%}"), _f(c.get("decode"), "{:.2f}"),
              _f(c.get("event_loop"), "{:.2f}"), _f(c.get("other"), "{:.2f}"), _f(c.get("total"))]
             for r, c in cpu))]

    def result(c: dict) -> str:
        return "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")

    if any(len(c.get("repeats", ())) > 1 for c in checks):
        lines += ["", *md_table(
            ["model", "target", "median repeat", "every repeat", "threshold", "met in", "result"],
            ([c["model"], c["target"], c["measured"], "; ".join(c["repeats"]), c["threshold"],
              f"{c['passed']} of {c['of']}", result(c)] for c in checks))]
    else:
        lines += ["", *md_table(["model", "target", "measured", "threshold", "result"],
                                ([c["model"], c["target"], c["measured"], c["threshold"], result(c)] for c in checks))]
    return "\n".join(lines)
