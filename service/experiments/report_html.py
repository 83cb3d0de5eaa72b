"""The experiment report as one self-contained HTML page.

``render_report_html(build_report(...))`` returns a page with inline CSS and
server-side inline SVG charts: no script, no external stylesheet, font, image
or fetch of any kind, so it can be saved, mailed or opened offline. Every
string taken from the report (experiment, variant, model and class names,
verdicts) is HTML-escaped. Sections: header with the verdict; one card per
primary variant (figures with 95 % intervals, latency histogram with
p50/p90/p99 markers, top-1 classes); comparisons against the control;
cumulative top-1 accuracy over time with Wilson bands; shadow comparisons.
"""

from __future__ import annotations

import bisect
import html
import math
from datetime import datetime, timezone
from typing import Any, Sequence

__all__ = ["render_report_html"]

PALETTE = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#65a30d", "#dc2626")
_DASH = "\u2014"  # shown for missing values
_MINUS = "\u2212"

_CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --card:#fff; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 28px 24px 40px; }
header { margin-bottom: 22px; }
.kicker { color: var(--muted); font-size: 12px; letter-spacing: .06em; text-transform: uppercase; }
h1 { font-size: 26px; margin: 2px 0 6px; word-break: break-word; }
.meta { color: var(--muted); font-size: 13px; }
.verdict { margin-top: 14px; padding: 12px 16px; border-radius: 8px; border-left: 5px solid;
  font-size: 16px; font-weight: 600; background: #fff; }
.verdict .tag { display: block; font-size: 11px; font-weight: 600; letter-spacing: .06em;
  text-transform: uppercase; opacity: .75; margin-bottom: 2px; }
.v-significant { border-color: #059669; background: #ecfdf5; color: #065f46; }
.v-insufficient_data { border-color: #d97706; background: #fffbeb; color: #92400e; }
.v-no_difference { border-color: #2563eb; background: #eff6ff; color: #1e3a8a; }
.v-no_comparison { border-color: #9ca3af; background: #f3f4f6; color: #374151; }
h2 { font-size: 17px; margin: 28px 0 10px; }
h3 { font-size: 16px; margin: 0 0 2px; display: flex; align-items: center; gap: 8px; word-break: break-word; }
h4 { font-size: 12px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; }
.swatch { width: 12px; height: 12px; border-radius: 3px; display: inline-block; flex: none; }
.badge { font-size: 11px; font-weight: 600; color: var(--muted); border: 1px solid var(--line);
  border-radius: 999px; padding: 0 8px; }
.models { color: var(--muted); font-size: 12px; margin-bottom: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.figures td:first-child { color: var(--muted); width: 52%; }
table.figures td { text-align: right; font-variant-numeric: tabular-nums; }
table.figures td:first-child { text-align: left; }
.ci { color: var(--muted); font-size: 12px; margin-left: 4px; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; overflow-x: auto; }
.empty { color: var(--muted); font-style: italic; padding: 8px 0; }
.bar { height: 8px; background: #c7d2fe; border-radius: 2px; }
.classes td { padding: 3px 8px; font-size: 13px; }
.classes td.name { max-width: 220px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; font-size: 13px; margin: 4px 0 6px; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.kind { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 999px; white-space: nowrap; }
svg { display: block; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: #4b5563; }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


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


def _ci_pct(block: dict[str, Any] | None) -> str:
    if not block or _num(block.get("low")) is None or _num(block.get("high")) is None:
        return ""
    return f'<span class="ci">[{100 * block["low"]:.1f} \u2013 {100 * block["high"]:.1f}]</span>'


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


# ---------------------------------------------------------------- charts


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


def _latency_svg(variant: dict[str, Any], color: str, span: tuple[int, int] | None,
                 ymax: float = 1.0) -> str:
    hist = variant.get("latency_histogram") or {}
    edges: list[float] = list(hist.get("edges") or [])
    counts: list[int] = list(hist.get("counts") or [])
    total = sum(counts)
    if span is None or not total:
        return '<div class="empty">no requests</div>'
    lo, hi = span
    w, h = 520, 190
    left, right, top, bottom = 44, 10, 22, 34
    pw, ph = w - left - right, h - top - bottom
    nb = hi - lo
    bw = pw / nb
    shares = [c / total for c in counts]
    ymax, nticks = _nice_ceiling(ymax)
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="latency histogram of {_e(variant.get("name"))}">']
    for k in range(nticks + 1):  # y grid: share of requests
        yv = ymax * k / nticks
        y = top + ph - ph * yv / ymax
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f3"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{100 * yv:.0f}%</text>')
    for i in range(lo, hi):
        x = left + (i - lo) * bw
        bh = ph * shares[i] / ymax
        upper = f"{_ms(edges[i + 1])}" if i + 1 < len(edges) else "\u221e"
        tip = f"{_ms(edges[i])} \u2013 {upper}: {counts[i]} requests ({100 * shares[i]:.1f}%)"
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 2, 1):.1f}" '
                     f'height="{bh:.1f}" fill="{_e(color)}" fill-opacity="0.75" rx="1.5">'
                     f'<title>{_e(tip)}</title></rect>')
    step = 1 if nb <= 14 else 2
    for i in range(lo, hi + 1, step):  # x labels at bucket edges
        if i < len(edges):
            x = left + (i - lo) * bw
            parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">'
                         f'{_e(_edge_label(edges[i]))}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 4}" text-anchor="middle">'
                 f'latency (ms, per request)</text>')
    parts.append(f'<line x1="{left}" x2="{w - right}" y1="{top + ph}" y2="{top + ph}" stroke="#9ca3af"/>')
    lat = variant.get("latency_s") or {}
    for j, key in enumerate(("p50", "p90", "p99")):
        v = _num(lat.get(key))
        if v is None:
            continue
        x = left + (_bucket_position(edges, v) - lo) * bw
        x = min(max(x, left), w - right)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{top + ph}" stroke="#111827" '
                     f'stroke-width="1" stroke-dasharray="3 3"><title>{key} {_e(_ms(v))}</title></line>')
        anchor = "start" if x < w - right - 40 else "end"
        dx = 3 if anchor == "start" else -3
        parts.append(f'<text x="{x + dx:.1f}" y="{(top - 8, top + 5, top + 18)[j]}" text-anchor="{anchor}" '
                     f'style="fill:#111827;font-weight:600">{key}</text>')
    parts.append("</svg>")
    return "".join(parts)


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


def _accuracy_svg(report: dict[str, Any]) -> str:
    ts = report.get("timeseries") or {}
    series = ts.get("variants") or {}
    names = [v.get("name") for v in report.get("variants") or []]
    points = {n: [p for p in series.get(n) or [] if p.get("n")] for n in names}
    if not any(points.values()):
        return '<div class="empty">no labelled predictions yet</div>'
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
    w, h = 1100, 300
    left, right, top, bottom = 52, 16, 12, 36
    pw, ph = w - left - right, h - top - bottom

    def sx(t: float) -> float:
        return left + (pw * (t - t0) / (t1 - t0) if t1 > t0 else pw)

    def sy(v: float) -> float:
        return top + ph - ph * (v - y0) / (y1 - y0)

    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="cumulative top-1 accuracy over time">']
    ticks = max(1, round((y1 - y0) / step))
    for k in range(ticks + 1):
        yv = y0 + (y1 - y0) * k / ticks
        y = sy(yv)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f3"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{100 * yv:.0f}%</text>')
    fmt = "%H:%M:%S" if t1 - t0 < 600 else ("%H:%M" if t1 - t0 < 2 * 86400 else "%m-%d %H:%M")
    for t in _time_ticks(t0, t1):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
                     f'stroke="#9ca3af"/>')
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">'
                     f'{_e(_utc(t, fmt))}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 4}" text-anchor="middle">'
                 f'prediction time (UTC); cumulative, with 95% Wilson band</text>')
    parts.append(f'<line x1="{left}" x2="{w - right}" y1="{top + ph}" y2="{top + ph}" stroke="#9ca3af"/>')
    for i, name in enumerate(names):
        ps = points.get(name) or []
        if not ps:
            continue
        color = _e(_color(i))
        upper = " ".join(f"{sx(p['t']):.1f},{sy(p['high']):.1f}" for p in ps)
        lower = " ".join(f"{sx(p['t']):.1f},{sy(p['low']):.1f}" for p in reversed(ps))
        parts.append(f'<polygon points="{upper} {lower}" fill="{color}" fill-opacity="0.13" stroke="none"/>')
        line = " ".join(f"{sx(p['t']):.1f},{sy(p['rate']):.1f}" for p in ps)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p in ps:
            tip = (f"{name} \u00b7 {_utc(p['t'], '%Y-%m-%d %H:%M')} \u00b7 {_pct(p['rate'])} "
                   f"[{_pct(p['low'])} \u2013 {_pct(p['high'])}] \u00b7 n={p['n']}")
            parts.append(f'<circle cx="{sx(p["t"]):.1f}" cy="{sy(p["rate"]):.1f}" r="2.5" fill="{color}">'
                         f'<title>{_e(tip)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- sections


def _kind_badge(kind: Any) -> str:
    label = {"significant": "significant", "insufficient_data": "more data needed",
             "no_difference": "no difference", "no_comparison": "no comparison"}.get(str(kind), str(kind))
    return f'<span class="kind v-{_e(kind)}">{_e(label)}</span>'


def _variant_card(v: dict[str, Any], i: int, control: Any, span: tuple[int, int] | None,
                  ymax: float) -> str:
    lat = v.get("latency_s") or {}
    models = ", ".join(f"{m.get('model')} v{m.get('version')} ({m.get('n_images')} images)"
                       for m in v.get("models") or [])
    rows = [
        ("Images", _e(v.get("n_images", 0))),
        ("Requests", _e(v.get("n_requests", 0))),
        ("Latency p50 / p90 / p99",
         " / ".join(_e(_ms(lat.get(k))) for k in ("p50", "p90", "p99"))),
        ("Latency mean", _e(_ms(lat.get("mean")))),
        ("Mean confidence (top-1 score)", _e(_pct(v.get("mean_confidence")))),
        ("Labelled images", _e(v.get("labelled_n", 0))),
        ("Top-1 accuracy", _e(_pct((v.get("top1_accuracy") or {}).get("rate"))) + _ci_pct(v.get("top1_accuracy"))),
        ("Top-5 accuracy", _e(_pct((v.get("top5_accuracy") or {}).get("rate"))) + _ci_pct(v.get("top5_accuracy"))),
    ]
    table = "".join(f"<tr><td>{_e(k)}</td><td>{val}</td></tr>" for k, val in rows)
    classes = v.get("top1_distribution") or []
    if classes:
        top_share = max((_num(c.get("share")) or 0.0) for c in classes) or 1.0
        crow = []
        for c in classes:
            name = c.get("name")
            label = f"{c.get('class')}" if name is None else f"{name}"
            share = _num(c.get("share")) or 0.0
            crow.append(
                f'<tr><td class="name" title="{_e(label)}">{_e(label)}</td>'
                f'<td class="num">{_e(c.get("count"))}</td><td class="num">{_e(_pct(share))}</td>'
                f'<td style="width:35%"><div class="bar" style="width:{100 * share / top_share:.1f}%;'
                f'background:{_e(_color(i))};opacity:.45"></div></td></tr>')
        distinct = v.get("distinct_top1_classes")
        more = f" of {_e(distinct)} distinct" if distinct is not None else ""
        classes_html = (f'<h4>Top-1 classes (top {len(classes)}{more})</h4>'
                        f'<table class="classes">{"".join(crow)}</table>')
    else:
        classes_html = '<h4>Top-1 classes</h4><div class="empty">no predictions</div>'
    badge = ' <span class="badge">control</span>' if v.get("name") == control else ""
    return (
        f'<div class="card"><h3><span class="swatch" style="background:{_e(_color(i))}"></span>'
        f'{_e(v.get("name"))}{badge}</h3>'
        f'<div class="models">{_e(models) if models else "no model served yet"}</div>'
        f'<table class="figures">{table}</table>'
        f'<h4>Latency distribution</h4>{_latency_svg(v, _color(i), span, ymax)}'
        f'{classes_html}</div>'
    )


def _comparisons_table(report: dict[str, Any]) -> str:
    comps = report.get("comparisons") or []
    if not comps:
        return '<div class="panel"><div class="empty">fewer than two primary variants: nothing to compare</div></div>'
    head = ("<tr><th>Variant vs control</th><th class='num'>Labelled (variant / control)</th>"
            "<th class='num'>Top-1 difference [95% CI]</th><th class='num'>z</th>"
            "<th class='num'>p</th><th class='num'>\u03b1</th><th>Verdict</th></tr>")
    rows = []
    for c in comps:
        diff = _e(_pp(c.get("difference")))
        if _num(c.get("low")) is not None and _num(c.get("high")) is not None:
            diff += f'<span class="ci">[{_e(_pp(c["low"]))}, {_e(_pp(c["high"]))}]</span>'
        z = _num(c.get("z"))
        p = _num(c.get("p_value"))
        alpha = _num(c.get("alpha"))
        rows.append(
            f"<tr><td>{_e(c.get('variant'))} vs {_e(c.get('control'))}</td>"
            f"<td class='num'>{_e(c.get('variant_n'))} / {_e(c.get('control_n'))}</td>"
            f"<td class='num'>{diff}</td>"
            f"<td class='num'>{_DASH if z is None else _e(f'{z:.2f}'.replace('-', _MINUS))}</td>"
            f"<td class='num'>{_DASH if p is None else _e(f'{p:.3g}')}</td>"
            f"<td class='num'>{_DASH if alpha is None else _e(f'{alpha:.3g}')}</td>"
            f"<td>{_kind_badge(c.get('verdict_kind'))} {_e(c.get('verdict'))}</td></tr>")
    return f'<div class="panel"><table>{head}{"".join(rows)}</table></div>'


def _shadow_table(report: dict[str, Any]) -> str:
    comps = report.get("shadow_comparisons") or []
    shed = report.get("shadow_shed") or {}
    if not comps:
        return '<div class="panel"><div class="empty">no shadows in this experiment</div></div>'
    head = ("<tr><th>Primary \u2192 shadow</th><th class='num'>Pairs</th>"
            "<th class='num'>Top-1 agreement [95% CI]</th><th class='num'>Mean top-5 overlap</th>"
            "<th class='num'>Latency diff median</th><th class='num'>Latency diff mean</th></tr>")
    rows = []
    for c in comps:
        agree = c.get("top1_agreement") or {}
        lat = c.get("latency_diff_s") or {}
        rows.append(
            f"<tr><td>{_e(c.get('primary'))} \u2192 {_e(c.get('shadow'))}</td>"
            f"<td class='num'>{_e(c.get('n_pairs', 0))}</td>"
            f"<td class='num'>{_e(_pct(agree.get('rate')))}{_ci_pct(agree)}</td>"
            f"<td class='num'>{_e(_pct(c.get('mean_top5_overlap')))}</td>"
            f"<td class='num'>{_e(_ms_signed(lat.get('median')))}</td>"
            f"<td class='num'>{_e(_ms_signed(lat.get('mean')))}</td></tr>")
    shed_text = ", ".join(f"{_e(k)}: {_e(n)}" for k, n in shed.items())
    note = ('<div class="meta" style="margin-top:6px">Latency difference is shadow minus primary per '
            'image, both measured as time in the model\'s queue plus inference.'
            + (f" Shadow images shed under load: {shed_text}." if shed_text else "") + "</div>")
    return f'<div class="panel"><table>{head}{"".join(rows)}</table>{note}</div>'


def render_report_html(report: dict[str, Any]) -> str:
    """A complete HTML document for a report from :func:`build_report`."""
    name = report.get("experiment", "")
    variants = list(report.get("variants") or [])
    control = report.get("control")
    settings = report.get("settings") or {}
    kind = report.get("verdict_kind", "no_comparison")
    span = _hist_range(variants)
    ymax = _hist_ymax(variants, span)
    cards = "".join(_variant_card(v, i, control, span, ymax) for i, v in enumerate(variants))
    if not cards:
        cards = '<div class="card"><div class="empty">no primary variants</div></div>'
    legend = "".join(f'<span><span class="swatch" style="background:{_e(_color(i))}"></span>'
                     f'{_e(v.get("name"))}</span>' for i, v in enumerate(variants))
    meta = [f"Generated {_e(_utc(report.get('generated_at')))}"]
    if control is not None:
        meta.append(f"control: {_e(control)}")
    conf = _num(settings.get("confidence"))
    if conf is not None:
        meta.append(f"{100 * conf:g}% intervals")
    if _num(settings.get("alpha")) is not None:
        meta.append(f"\u03b1 = {_e(settings['alpha'])}, at least {_e(settings.get('min_n'))} "
                    f"labelled per variant")
    unlisted = report.get("unlisted") or {}
    if unlisted.get("primaries") or unlisted.get("shadow_pairs"):
        meta.append(f"left out (variants not in the report): {_e(unlisted.get('primaries', 0))} "
                    f"predictions, {_e(unlisted.get('shadow_pairs', 0))} shadow pairs")
    sep = " \u00b7 "
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(name)} \u00b7 experiment report</title><style>{_CSS}</style></head><body><main>"
        f'<header><div class="kicker">archserve \u00b7 A/B experiment report</div>'
        f"<h1>{_e(name)}</h1><div class=\"meta\">{sep.join(meta)}</div>"
        f'<div class="verdict v-{_e(kind)}"><span class="tag">Verdict</span>'
        f'{_e(report.get("verdict", ""))}</div></header>'
        f"<h2>Variants</h2><div class=\"cards\">{cards}</div>"
        f"<h2>Top-1 accuracy against the control</h2>{_comparisons_table(report)}"
        f'<h2>Top-1 accuracy over time</h2><div class="panel"><div class="legend">{legend}</div>'
        f"{_accuracy_svg(report)}</div>"
        f"<h2>Shadow comparisons</h2>{_shadow_table(report)}"
        "<footer>Accuracy counts labelled images (feedback received). Intervals: Wilson score for "
        "proportions, Newcombe hybrid score for differences. p: two-sided pooled two-proportion "
        "z-test; with several variants each is tested at a Bonferroni-corrected \u03b1.</footer>"
        "</main></body></html>\n"
    )
