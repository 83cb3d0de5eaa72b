"""The report page's cost and bandit sections: their rows, formatted (``templates/report_extras.html`` lays
them out). Kept apart from ``report_html`` so that each section stays one small, separate change."""

from __future__ import annotations

from typing import Any

_DASH = "\u2014"  # shown for missing values


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    v = _num(value)
    return _DASH if v is None else format(scale * v, spec) + suffix


def cost_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant with a ``cost`` block (see ``service.experiments.cost``)."""
    rows = []
    for v in report.get("variants") or []:
        cost = v.get("cost")
        if not cost:
            continue
        params = _num(cost.get("params"))
        rows.append({
            "name": v.get("name"),
            "model": f"{cost.get('model')} v{cost.get('version')}" if cost.get("version") else str(cost.get("model")),
            "params": _DASH if params is None else f"{params / 1e6:.1f} M",
            "gflops": _fmt(cost.get("gflops"), ".2f"),
            "compute": _fmt(cost.get("compute_s_per_image"), ".2f", 1000.0, " ms"),
            "images": cost.get("measured_images", 0),
            "difference": _fmt(cost.get("compute_difference_s"), "+.2f", 1000.0, " ms"),
            "gain": _fmt(cost.get("top1_gain_per_ms"), "+.2f", 100.0, " pp/ms"),
            "summary": cost.get("summary") or "",
        })
    return rows
