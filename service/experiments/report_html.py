"""The experiment report as one self-contained HTML page.

``render_report_html(build_report(...))`` returns a page with inline CSS and
server-side inline SVG charts: no script, no external stylesheet, font, image
or fetch of any kind, so it can be saved, mailed or opened offline. This module
turns the report into formatted figures and chart geometry; the Jinja2 template
``templates/report.html`` lays them out, with autoescaping on, so every string
taken from the report (experiment, variant, model and class names, verdicts) is
HTML-escaped. Sections: header with the verdict; one card per primary variant
(figures with 95 % intervals, latency histogram with p50/p90/p99 markers, top-1
classes); comparisons against the control; cumulative top-1 accuracy over time
with Wilson bands; shadow comparisons.
"""

from __future__ import annotations

import bisect
import math
from datetime import datetime, timezone
from typing import Any, Sequence

import jinja2

from .report_extras_html import bandit_view, cost_rows

__all__ = ["render_report_html"]

PALETTE = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#65a30d", "#dc2626")
_DASH = "\u2014"  # shown for missing values
_MINUS = "\u2212"
_KINDS = {"significant": "significant", "insufficient_data": "more data needed",
          "no_difference": "no difference", "no_comparison": "no comparison"}

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("service.experiments", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,  # a name the template expects and this module forgot is a bug, not a blank
)
_ENV.filters["px"] = lambda v: f"{v:.1f}"  # SVG coordinates: a tenth of a pixel is plenty


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pct(value: Any, digits: int = 1) -> str:
    v = _num(value)
    return _DASH if v is None else f"{100.0 * v:.{digits}f}%"


def _signed(text: str) -> str:
    return text.replace("-", _MINUS) if text.startswith("-") else ("+" + text if text[0].isdigit() else text)


def _pp(value: Any) -> str:
    v = _num(value)
    return _DASH if v is None else _signed(f"{100.0 * v:.1f}") + " pp"


def _ci_pct(block: dict[str, Any] | None) -> tuple[str, str] | None:
    if not block or _num(block.get("low")) is None or _num(block.get("high")) is None:
        return None
    return f"{100 * block['low']:.1f}", f"{100 * block['high']:.1f}"


def _ms(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    if abs(v) >= 1.0:
        return f"{v:.2f} s"
    ms = 1000.0 * v
    return f"{ms:.2f} ms" if abs(ms) < 10 else f"{ms:.1f} ms"


def _ms_signed(value: Any) -> str:
    v = _num(value)
    return _DASH if v is None else _signed(_ms(v))


def _edge_label(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:g}s"
    return f"{1000 * seconds:g}"


def _utc(t: Any, fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    v = _num(t)
    if v is None:
        return _DASH
    return datetime.fromtimestamp(v, tz=timezone.utc).strftime(fmt)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _fixed(value: Any, spec: str) -> str:
    v = _num(value)
    return _DASH if v is None else format(v, spec)


# ---------------------------------------------------------------- charts


class _Chart:
    """An SVG's size and its plot area's edges, in pixels, plus what the template draws in it."""

    def __init__(self, width: int, height: int, margins: tuple[int, int, int, int], **parts: Any) -> None:
        left, right, top, bottom = margins
        self.width, self.height = width, height
        self.left, self.right, self.top, self.base = left, width - right, top, height - bottom  # base: the x axis
        self.__dict__.update(parts)

    @property
    def middle(self) -> float:
        return (self.left + self.right) / 2


def _hist_range(variants: Sequence[dict[str, Any]]) -> tuple[int, int] | None:
    """The bucket indices [lo, hi) to draw: the non-empty ones of any variant, padded."""
    used: list[int] = []
    size = 0
    for v in variants:
        counts = (v.get("latency_histogram") or {}).get("counts") or []
        size = max(size, len(counts))
        used += [i for i, c in enumerate(counts) if c]
    if not used:
        return None
    lo, hi = max(0, min(used) - 1), min(size, max(used) + 2)
    while hi - lo < 8 and (lo > 0 or hi < size):  # at least 8 buckets, for a readable axis
        if hi < size:
            hi += 1
        if hi - lo < 8 and lo > 0:
            lo -= 1
    return lo, hi


def _hist_ymax(variants: Sequence[dict[str, Any]], span: tuple[int, int] | None) -> float:
    """The largest share of requests in one drawn bucket, over all variants (a common y scale)."""
    top = 0.0
    for v in variants:
        counts = (v.get("latency_histogram") or {}).get("counts") or []
        total = sum(counts)
        if total and span is not None:
            top = max(top, max(counts[span[0]:span[1]], default=0) / total)
    return top or 1.0


def _latency_chart(variant: dict[str, Any], color: str, span: tuple[int, int] | None,
                   ymax: float = 1.0) -> _Chart | None:
    hist = variant.get("latency_histogram") or {}
    edges: list[float] = list(hist.get("edges") or [])
    counts: list[int] = list(hist.get("counts") or [])
    total = sum(counts)
    if span is None or not total:
        return None
    lo, hi = span
    c = _Chart(520, 190, (44, 10, 22, 34), color=color)
    ph = c.base - c.top
    bw = (c.right - c.left) / (hi - lo)
    shares = [n / total for n in counts]
    ymax, nticks = _nice_ceiling(ymax)
    c.grid = [{"y": c.base - ph * k / nticks, "label": f"{100 * ymax * k / nticks:.0f}%"}
              for k in range(nticks + 1)]  # share of requests
    c.bars = []
    for i in range(lo, hi):
        bh = ph * shares[i] / ymax
        upper = _ms(edges[i + 1]) if i + 1 < len(edges) else "\u221e"
        c.bars.append({"x": c.left + (i - lo) * bw + 1, "y": c.base - bh, "width": max(bw - 2, 1), "height": bh,
                       "tip": f"{_ms(edges[i])} \u2013 {upper}: {counts[i]} requests ({100 * shares[i]:.1f}%)"})
    step = 1 if hi - lo <= 14 else 2
    c.x_labels = [{"x": c.left + (i - lo) * bw, "text": _edge_label(edges[i])}  # at bucket edges
                  for i in range(lo, hi + 1, step) if i < len(edges)]
    c.markers = []
    lat = variant.get("latency_s") or {}
    for j, key in enumerate(("p50", "p90", "p99")):
        v = _num(lat.get(key))
        if v is None:
            continue
        x = min(max(c.left + (_bucket_position(edges, v) - lo) * bw, c.left), c.right)
        anchor = "start" if x < c.right - 40 else "end"
        c.markers.append({"x": x, "key": key, "value": _ms(v), "anchor": anchor,
                          "text_x": x + (3 if anchor == "start" else -3), "text_y": c.top + (-8, 5, 18)[j]})
    return c


def _bucket_position(edges: list[float], v: float) -> float:
    """Fractional bucket index of ``v`` (linear within its bucket)."""
    i = max(0, bisect.bisect_right(edges, v) - 1)
    if i + 1 >= len(edges):
        return i + 0.5
    a, b = edges[i], edges[i + 1]
    return i + (v - a) / (b - a)


def _nice_ceiling(v: float) -> tuple[float, int]:
    """A round axis maximum >= v (a share) and how many grid steps divide it evenly."""
    for top, ticks in ((0.05, 5), (0.1, 5), (0.2, 4), (0.3, 3), (0.4, 4), (0.5, 5), (0.6, 3),
                       (0.8, 4), (1.0, 5)):
        if v <= top + 1e-12:
            return top, ticks
    return 1.0, 5


_TICK_STEPS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
                 86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400)


def _time_ticks(t0: float, t1: float, most: int = 8) -> list[float]:
    """Round UTC times (whole minutes, hours, days) inside [t0, t1], at most ``most`` of them."""
    if t1 <= t0:
        return [t0]
    step = next((s for s in _TICK_STEPS_S if (t1 - t0) / s <= most), None)
    if step is None:
        return [t0 + (t1 - t0) * k / (most - 1) for k in range(most)]
    first = math.ceil(t0 / step) * step
    ticks = [float(t) for t in range(int(first), int(math.floor(t1)) + 1, step) if t0 <= t <= t1]
    return ticks or [t0, t1]


def _accuracy_chart(report: dict[str, Any]) -> _Chart | None:
    ts = report.get("timeseries") or {}
    series = ts.get("variants") or {}
    names = [v.get("name") for v in report.get("variants") or []]
    points = {n: [p for p in series.get(n) or [] if p.get("n")] for n in names}
    if not any(points.values()):
        return None
    times = [p["t"] for ps in points.values() for p in ps]
    edges = [e for e in (ts.get("edges") or []) if _num(e) is not None]
    t0 = min(edges[0], min(times)) if edges else min(times)
    t1 = max(times)
    lows = [p["low"] for ps in points.values() for p in ps if _num(p.get("low")) is not None]
    highs = [p["high"] for ps in points.values() for p in ps if _num(p.get("high")) is not None]
    step = 0.05 if max(highs) - min(lows) <= 0.4 else 0.1
    y0 = max(0.0, math.floor(min(lows) / step + 1e-9) * step)
    y1 = min(1.0, math.ceil(max(highs) / step - 1e-9) * step)
    if y1 - y0 < 2 * step:
        y1 = min(1.0, y0 + 2 * step)
        y0 = max(0.0, y1 - 2 * step)
    c = _Chart(1100, 300, (52, 16, 12, 36))
    pw, ph = c.right - c.left, c.base - c.top

    def sx(t: float) -> float:
        return c.left + (pw * (t - t0) / (t1 - t0) if t1 > t0 else pw)

    def sy(v: float) -> float:
        return c.top + ph - ph * (v - y0) / (y1 - y0)

    ticks = max(1, round((y1 - y0) / step))
    c.grid = [{"y": sy(y0 + (y1 - y0) * k / ticks), "label": f"{100 * (y0 + (y1 - y0) * k / ticks):.0f}%"}
              for k in range(ticks + 1)]
    fmt = "%H:%M:%S" if t1 - t0 < 600 else ("%H:%M" if t1 - t0 < 2 * 86400 else "%m-%d %H:%M")
    c.time_ticks = [{"x": sx(t), "label": _utc(t, fmt)} for t in _time_ticks(t0, t1)]
    c.series = []
    for i, name in enumerate(names):
        ps = points.get(name) or []
        if not ps:
            continue
        upper = " ".join(f"{sx(p['t']):.1f},{sy(p['high']):.1f}" for p in ps)
        lower = " ".join(f"{sx(p['t']):.1f},{sy(p['low']):.1f}" for p in reversed(ps))
        c.series.append({
            "color": _color(i),
            "band": f"{upper} {lower}",
            "line": " ".join(f"{sx(p['t']):.1f},{sy(p['rate']):.1f}" for p in ps),
            "points": [{"x": sx(p["t"]), "y": sy(p["rate"]),
                        "tip": (f"{name} \u00b7 {_utc(p['t'], '%Y-%m-%d %H:%M')} \u00b7 {_pct(p['rate'])} "
                                f"[{_pct(p['low'])} \u2013 {_pct(p['high'])}] \u00b7 n={p['n']}")} for p in ps],
        })
    return c


# ---------------------------------------------------------------- sections


def _kind(kind: Any) -> dict[str, str]:
    return {"css": str(kind), "label": _KINDS.get(str(kind), str(kind))}


def _variant_card(v: dict[str, Any], i: int, control: Any, span: tuple[int, int] | None,
                  ymax: float) -> dict[str, Any]:
    lat = v.get("latency_s") or {}
    top1, top5 = v.get("top1_accuracy") or {}, v.get("top5_accuracy") or {}
    classes = v.get("top1_distribution") or []
    top_share = max(((_num(c.get("share")) or 0.0) for c in classes), default=0.0) or 1.0
    return {
        "name": v.get("name"),
        "color": _color(i),
        "control": v.get("name") == control,
        "models": ", ".join(f"{m.get('model')} v{m.get('version')} ({m.get('n_images')} images)"
                            for m in v.get("models") or []),
        "figures": [
            ("Images", v.get("n_images", 0), None),
            ("Requests", v.get("n_requests", 0), None),
            ("Latency p50 / p90 / p99", " / ".join(_ms(lat.get(k)) for k in ("p50", "p90", "p99")), None),
            ("Latency mean", _ms(lat.get("mean")), None),
            ("Mean confidence (top-1 score)", _pct(v.get("mean_confidence")), None),
            ("Labelled images", v.get("labelled_n", 0), None),
            ("Top-1 accuracy", _pct(top1.get("rate")), _ci_pct(top1)),
            ("Top-5 accuracy", _pct(top5.get("rate")), _ci_pct(top5)),
        ],
        "chart": _latency_chart(v, _color(i), span, ymax),
        "classes": [{"label": str(c.get("class") if c.get("name") is None else c.get("name")),
                     "count": c.get("count"),
                     "share": _pct(_num(c.get("share")) or 0.0),
                     "bar": 100 * (_num(c.get("share")) or 0.0) / top_share} for c in classes],
        "distinct": v.get("distinct_top1_classes"),
    }


def _comparison_row(c: dict[str, Any]) -> dict[str, Any]:
    has_interval = _num(c.get("low")) is not None and _num(c.get("high")) is not None
    return {
        "variant": c.get("variant"), "control": c.get("control"),
        "variant_n": c.get("variant_n"), "control_n": c.get("control_n"),
        "difference": _pp(c.get("difference")),
        "interval": (_pp(c["low"]), _pp(c["high"])) if has_interval else None,
        "z": _fixed(c.get("z"), ".2f").replace("-", _MINUS),
        "p": _fixed(c.get("p_value"), ".3g"),
        "alpha": _fixed(c.get("alpha"), ".3g"),
        "kind": _kind(c.get("verdict_kind")),
        "verdict": c.get("verdict"),
    }


def _shadow_row(c: dict[str, Any]) -> dict[str, Any]:
    agree = c.get("top1_agreement") or {}
    lat = c.get("latency_diff_s") or {}
    return {
        "primary": c.get("primary"), "shadow": c.get("shadow"), "pairs": c.get("n_pairs", 0),
        "agreement": _pct(agree.get("rate")), "interval": _ci_pct(agree),
        "overlap": _pct(c.get("mean_top5_overlap")),
        "median": _ms_signed(lat.get("median")), "mean": _ms_signed(lat.get("mean")),
    }


def _meta(report: dict[str, Any]) -> list[str]:
    """The header's line under the title: when, the control, and the statistical settings."""
    settings = report.get("settings") or {}
    meta = [f"Generated {_utc(report.get('generated_at'))}"]
    if report.get("control") is not None:
        meta.append(f"control: {report['control']}")
    conf = _num(settings.get("confidence"))
    if conf is not None:
        meta.append(f"{100 * conf:g}% intervals")
    if _num(settings.get("alpha")) is not None:
        meta.append(f"\u03b1 = {settings['alpha']}, at least {settings.get('min_n')} labelled per variant")
    unlisted = report.get("unlisted") or {}
    if unlisted.get("primaries") or unlisted.get("shadow_pairs"):
        meta.append(f"left out (variants not in the report): {unlisted.get('primaries', 0)} "
                    f"predictions, {unlisted.get('shadow_pairs', 0)} shadow pairs")
    return meta


def render_report_html(report: dict[str, Any]) -> str:
    """A complete HTML document for a report from :func:`build_report`."""
    variants = list(report.get("variants") or [])
    control = report.get("control")
    span = _hist_range(variants)
    ymax = _hist_ymax(variants, span)
    return _ENV.get_template("report.html").render(
        name=report.get("experiment", ""),
        meta=_meta(report),
        kind=report.get("verdict_kind", "no_comparison"),
        verdict=report.get("verdict", ""),
        variants=[_variant_card(v, i, control, span, ymax) for i, v in enumerate(variants)],
        comparisons=[_comparison_row(c) for c in report.get("comparisons") or []],
        accuracy=_accuracy_chart(report),
        shadows=[_shadow_row(c) for c in report.get("shadow_comparisons") or []],
        shed=", ".join(f"{k}: {n}" for k, n in (report.get("shadow_shed") or {}).items()),
        cost=cost_rows(report),
        bandit=bandit_view(report),
    )
