"""What every benchmark report carries: the machine and commit it ran on, markdown tables, the JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from .servers import ROOT


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    if not (ROOT / ".git").exists():  # an exported copy (git archive) inside another checkout: not its commit
        return {"commit": "", "dirty": None}
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_facts() -> dict:
    """The host, its CPU, Python, onnxruntime and the commit: enough to tell two results files' machines apart."""
    import onnxruntime as ort

    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        **{"git_" + k: v for k, v in git_state().items()},
    }


def dig(d: dict | None, *keys):
    """``d[k1][k2]...``, or None where a level is missing (a step that failed or did not run)."""
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def md_table(head: list[str], rows: Iterable[list]) -> list[str]:
    """A markdown table's lines: the header, its rule, then one line per row (a short row leaves cells out)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def write_json(path: Path, data) -> None:
    """Replace ``path`` at once: a reader (or a run cut short) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
