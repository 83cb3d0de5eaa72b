"""The guardrails section of the report page: what is checked, and each decision with its time and evidence.

Kept apart from ``report_html`` (its own module, added to the finished page) so the report's renderer stays
as it is; every value is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from typing import Any

_STYLE = ("<style>.guardrails{margin:1.5em 0;padding:.8em 1em;border:1px solid #d0d7de;border-radius:6px}"
          ".guardrails .paused{color:#b42318;font-weight:600}.guardrails .alert{color:#b54708;font-weight:600}"
          ".guardrails td,.guardrails th{padding:.2em .6em;text-align:left;vertical-align:top}</style>")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def section(block: dict[str, Any] | None) -> str:
    """The section for a report's ``guardrails`` block; empty without guardrails."""
    if not block:
        return ""
    config = block.get("config") or {}
    checks = ", ".join(f"{k} {_value(v)}" for k, v in config.items() if v is not None)
    rows = []
    for d in block.get("decisions") or []:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d["decided_at"]))
        evidence = "; ".join(f"{k}: {_value(v)}" for k, v in sorted((d.get("evidence") or {}).items()))
        kind = "paused" if d.get("paused") else "alert"
        rows.append(
            f"<tr><td>{html.escape(d['variant'])}</td><td class=\"{kind}\">{kind}</td>"
            f"<td>{html.escape(d['guardrail'])}</td><td>{html.escape(when)}</td><td>{html.escape(evidence)}</td></tr>"
        )
    table = ("<table><tr><th>Variant</th><th>Action</th><th>Guardrail</th><th>Decided</th><th>Evidence</th></tr>"
             + "".join(rows) + "</table>") if rows else "<p>No guardrail has fired.</p>"
    return (f"{_STYLE}<section class=\"guardrails\"><h2>Guardrails</h2><p>{html.escape(checks)}</p>"
            f"{table}</section>")


def with_guardrails(page: str, block: dict[str, Any] | None) -> str:
    """``page`` (from ``render_report_html``) with the section right after its header."""
    extra = section(block)
    if not extra:
        return page
    head, sep, tail = page.partition("</header>")
    return head + sep + extra + tail if sep else page.replace("</body>", extra + "</body>")
