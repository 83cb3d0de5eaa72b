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


def bandit_view(report: dict[str, Any]) -> dict[str, Any] | None:
    """The bandit section (``allocation: thompson``), or None for fixed weights."""
    bandit = report.get("bandit")
    if not bandit:
        return None
    settings = bandit.get("settings") or {}
    phase = bandit.get("phase")
    return {
        "phase": ("warm-up: the YAML weights until every variant has "
                  f"{settings.get('warmup_images')} labelled images") if phase == "warmup"
        else "Thompson sampling: each share is the floored probability of being the best variant",
        "settings": f"floor {settings.get('floor')}, refresh every {settings.get('refresh_s')} s, "
                    f"sticky window {settings.get('sticky_window_s')} s, {settings.get('draws')} draws",
        "regret": _fmt(bandit.get("expected_regret"), ".1f"),
        "arms": [{
            "name": a.get("name"), "alpha": a.get("alpha"), "beta": a.get("beta"),
            "mean": _fmt(a.get("mean"), ".1f", 100.0, "%"),
            "interval": f"[{_fmt(a.get('low'), '.1f', 100.0)} \u2013 {_fmt(a.get('high'), '.1f', 100.0)}]",
            "labelled": a.get("labelled"), "p_best": _fmt(a.get("p_best"), ".1f", 100.0, "%"),
            "share": _fmt(a.get("share"), ".1f", 100.0, "%"),
        } for a in bandit.get("arms") or []],
    }
