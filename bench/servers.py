"""The processes a benchmark starts: model exports, and servers on free loopback ports, stopped however they end."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .http_client import Target, http_get, run_async

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def export_models(models_dir: Path, names: list[str], *export_args: str) -> list[str]:
    """Export those of ``names`` that ``models_dir`` lacks (``python -m export``, its output shown); return them."""
    from modelrepo.layout import list_versions

    missing = [n for n in names if not list_versions(models_dir / n)]
    if missing:
        print(f"exporting {', '.join(missing)} into {models_dir}/ (about 30 s a model)", flush=True)
        proc = subprocess.run([PY, "-m", "export", "--models", ",".join(missing), "--out", str(models_dir),
                               *export_args], cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"exporting {', '.join(missing)} failed with exit code {proc.returncode}")
    return missing


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a loopback port: started, waited for, stopped (SIGTERM, then kill)."""

    def __init__(self, label: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None):
        self.label, self.argv, self.port, self.log_path = label, argv, port, log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> "Server":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until ``/health/ready`` answers 200; fails at once if the server exits or says its start
        failed (archserve's ``"status": "failed"``, e.g. CUDA required and the CPU got)."""
        started = time.monotonic()
        target = Target("127.0.0.1", self.port)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode} before it was ready; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            body = None
            with contextlib.suppress(Exception):
                status, raw = run_async(http_get(target, "/health/ready", timeout=2.0))
                if status == 200:
                    return time.monotonic() - started
                body = json.loads(raw)
            if isinstance(body, dict) and body.get("status") == "failed":
                raise RuntimeError(f"{self.label} failed to start: {body.get('reason')}; log: {self.log_path}")
            time.sleep(0.25)
        raise RuntimeError(f"{self.label} was not ready within {timeout:g}s; log: {self.log_path}\n{self.log_tail()}")

    def get_json(self, path: str):
        status, body = run_async(http_get(Target("127.0.0.1", self.port), path))
        return json.loads(body) if status == 200 else None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                print(f"  {self.label} did not exit 40 s after SIGTERM; killing it", flush=True)
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
