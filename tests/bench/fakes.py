"""What bench.run's steps record, made up: the engine, archserve and the naive server, with chosen figures."""

from __future__ import annotations

from bench import summary


def engine_report(img_s: dict[int, float]) -> dict:
    rows = [{"batch_size": b, "img_s": v, "ms_per_batch": 1000 * b / v} for b, v in img_s.items()]
    best = max(rows, key=lambda row: row["img_s"])
    return {"batches": rows, "best": {"batch_size": best["batch_size"], "img_s": best["img_s"]},
            "cpu": {"other_cores": 0.0}}


def load_point(img_s: float, p50_ms: float, mean_batch: float | None = None) -> dict:
    point = {"throughput_img_s": img_s, "latency_ms": {"p50": p50_ms}, "errors": {}, "cpu": {"other_cores": 0.01}}
    if mean_batch is not None:
        point["server"] = {"mean_batch_size": mean_batch}
    return point


def results(archserve_img_s: float, archserve_p50: float, naive_img_s: float, naive_p50: float) -> dict:
    return {
        "engine": engine_report({1: 50.0, 2: 52.0, 4: 50.0, 8: 48.0}),  # batch 1 runs in 20 ms
        "archserve": {"c1": load_point(10.0, archserve_p50), "c16": load_point(archserve_img_s, 300.0, 7.6)},
        "naive": {"c1": load_point(10.0, naive_p50), "c16": load_point(naive_img_s, 350.0)},
    }


def repeat_checks(*archserve_img_s: float, model: str = "resnet50") -> list[list[dict]]:
    """The targets of one repeat per e2e figure (all else equal; the raw engine's best is 52 img/s)."""
    return [summary.targets(summary.summarise(model, results(a, 24.0, 45.0, 23.5), 1, 16), 16)
            for a in archserve_img_s]
