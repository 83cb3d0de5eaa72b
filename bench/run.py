"""``make bench``: engine-only, archserve end-to-end and the naive server, per model, in one go.

For each model (default resnet50 then resnet18):

1. engine only (``bench.engine_only`` in a subprocess): img/s and ms per batch at
   each batch size, the ceiling;
2. archserve (``python -m service``) on a free loopback port, closed loop with
   1 client and with 16 clients (``bench.loadgen``);
3. the naive server (``bench.naive_server``), the same two loads;
4. the engine again (not with ``--quick``). The targets divide by the mean of
   the two engine runs, which bracket the load points in time, and the table
   shows how far the machine drifted between them.

The four steps run for every model, and all of that ``--repeats`` times
(default 3), one repeat after the other. Each target is judged on its median
repeat (``judge``): with three, it passes when it passed in two of them (a
repeat whose step failed counts against it). On a
shared 2-core VM one repeat's e2e / raw ratio moves by a few percent from the
machine alone (the engine alone moved by up to 6.7% between its two timings in
one repeat on 2026-11-28), as much as some targets' margins; the table shows
every repeat and how many met each target.

Only one server runs at a time; each is stopped with SIGTERM (killed if it has
not exited after a timeout). The models are exported into ``--models-dir``
first if missing. Everything is written to ``bench/results/<date>-<host>.json``
and summarised as markdown tables with the targets' pass/fail.

    python -m bench.run                 # 3 repeats of 20 s load points: ~14 minutes on 2 cores, more on a busy one
    python -m bench.run --repeats 1     # one repeat: ~4.6 minutes
    python -m bench.run --quick         # a smoke run of under 2 minutes (one repeat)
    python -m bench.run --duration 30 --models resnet50 --server-arg=--max-queue-delay-ms=2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service import threads

from .http_client import Target, http_get, run_async
from .images import make_jpegs
from .load import closed_loop
from .loadgen import format_report

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Targets: archserve end-to-end against the engine alone and against the naive server.
E2E_OF_RAW = {"resnet50": 0.90, "resnet18": 0.80}
E2E_OF_RAW_DEFAULT = 0.80
P50_OVER_RAW_MS = 5.0
NAIVE_P50_REL, NAIVE_P50_ABS_MS = 0.10, 2.0


# ---------------------------------------------------------------------------- machine


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


def machine_info() -> dict:
    import onnxruntime as ort

    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers_available": ort.get_available_providers(),
        "loadavg_start": os.getloadavg(),
        **{"git_" + k: v for k, v in git_state().items()},
    }


def _process_tree(pid: int) -> dict[int, list[str]]:
    """``pid`` and its live descendants (worker processes): each one's /proc stat fields after the command
    name (``[1]`` the parent pid, ``[11]``/``[12]`` utime/stime, ``[13]``/``[14]`` of reaped children). Empty if
    ``pid`` is not running."""
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: dict[int, list[str]] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in stats and current not in tree:
            tree[current] = stats[current]
            todo.extend(children.get(current, []))
    return tree


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (worker processes), plus what the tree has reaped."""
    tree = _process_tree(pid)
    if pid not in tree:
        return 0.0
    total = sum(int(fields[11]) + int(fields[12]) for fields in tree.values())
    total += int(tree[pid][13]) + int(tree[pid][14])  # cutime + cstime: descendants already waited for
    return total / os.sysconf("SC_CLK_TCK")


# The server names its threads for the OS (service/threads.py); by that name, what each one does.
THREAD_GROUPS = ((threads.DECODE, "decode"), (threads.BATCH, "inference"), (threads.ONNXRUNTIME + " ", "inference"))


def _thread_group(pid: int, tid: int, comm: str) -> str:
    if tid == pid:  # each process's main thread runs its event loop (uvicorn: the HTTP side)
        return "event_loop"
    return next((group for prefix, group in THREAD_GROUPS if comm.startswith(prefix)), "other")


def process_tree_threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of the live threads of ``pid`` and its descendants, by what they do: ``event_loop`` (main
    threads), ``decode``, ``inference`` (the batch threads and onnxruntime's own pool) and ``other``.

    A thread that ended is not counted: compare two samples of long-lived threads (a server's are)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups = {"event_loop": 0.0, "decode": 0.0, "inference": 0.0, "other": 0.0}
    for proc in _process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{proc}/task").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (task / "stat").read_text()
                    comm = stat[stat.index("(") + 1:stat.rindex(")")]
                    fields = stat.rsplit(")", 1)[1].split()
                    groups[_thread_group(proc, int(task.name), comm)] += (int(fields[11]) + int(fields[12])) / tick
    return groups


class CpuMeter:
    """CPU cores used over an interval: the whole machine, one process with its descendants, and this process."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.start = self._sample()
        self.threads_start = process_tree_threads_cpu_s(pid) if pid else None

    def _sample(self) -> tuple[float, float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        idle = values[3] + values[4]
        busy = sum(values[:8]) - idle
        proc = process_tree_cpu_s(self.pid) if self.pid else 0.0  # a server's worker processes count too
        t = os.times()
        me = t.user + t.system + t.children_user + t.children_system  # this process and reaped children
        return time.monotonic(), busy / tick, proc, me

    def stop(self) -> dict:
        t1, busy1, proc1, me1 = self._sample()
        t0, busy0, proc0, me0 = self.start
        wall = max(t1 - t0, 1e-9)
        machine, server, bench = (busy1 - busy0) / wall, (proc1 - proc0) / wall, (me1 - me0) / wall
        out = {"machine_cores": round(machine, 2), "server_cores": round(server, 2), "loadgen_cores": round(bench, 2),
               "other_cores": round(max(0.0, machine - server - bench), 2), "wall_s": round(wall, 1)}
        if self.threads_start is not None:
            end = process_tree_threads_cpu_s(self.pid)
            out["server_threads_cores"] = {k: round(max(0.0, end[k] - self.threads_start[k]) / wall, 3) for k in end}
        return out


def machine_busy_cores(seconds: float = 1.0) -> float:
    """Cores busy on the whole machine over ``seconds`` (from /proc/stat)."""
    meter = CpuMeter(None)
    time.sleep(seconds)
    return meter.stop()["machine_cores"]


def settle(max_wait_s: float, quiet_cores: float = 0.3) -> dict:
    """Wait (at most ``max_wait_s``) until other work on the machine uses under ``quiet_cores``.

    Runs between steps, when nothing of ours is running, so what is busy is
    someone else. Returns what it saw; the step runs anyway after the wait.
    """
    started = time.monotonic()
    busy = machine_busy_cores(1.0)
    while busy >= quiet_cores and time.monotonic() - started < max_wait_s:
        busy = machine_busy_cores(2.0)
    waited = time.monotonic() - started
    if busy >= quiet_cores:
        print(f"  note: the machine is busy with other work ({busy:.2f} cores) after waiting {waited:.0f}s; "
              "figures from this step are noisy", flush=True)
    return {"other_cores_before": round(busy, 2), "waited_s": round(waited, 1)}


class NoiseGuard:
    """Bounded patience with other work on a shared machine.

    Before each step it waits (``settle_s`` at most) for the machine to be
    quiet; a measurement during which other processes used more than
    ``threshold`` cores is taken again, up to ``retries`` times, keeping the
    cleanest. Once ``budget_s`` has passed since the guard was made (one per
    repeat), there is no more waiting or re-measuring, so a busy machine makes
    the run noisier, not endless.
    """

    def __init__(self, budget_s: float, settle_s: float, retries: int, threshold: float = 0.15) -> None:
        self.deadline = time.monotonic() + budget_s
        self.settle_s, self.retries, self.threshold = settle_s, retries, threshold

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def settle(self) -> dict:
        return settle(min(self.settle_s, self.left()))

    def measure(self, label: str, fn):
        best, attempts = None, 0
        while True:
            report = fn()
            attempts += 1
            other = report["cpu"]["other_cores"]
            if best is None or other < best["cpu"]["other_cores"]:
                best = report
            if other <= self.threshold or attempts > self.retries or self.left() <= 0:
                break
            print(f"  other work used {other:.2f} cores during {label}; measuring it again", flush=True)
            self.settle()
        best["attempts"] = attempts
        return best


# ---------------------------------------------------------------------------- models and servers


def ensure_models(models_dir: Path, names: list[str]) -> None:
    from modelrepo.layout import list_versions

    missing = [n for n in names if not list_versions(models_dir / n)]
    if not missing:
        return
    print(f"exporting {', '.join(missing)} into {models_dir}/ (about 30 s a model)", flush=True)
    subprocess.run([PY, "-m", "export", "--models", ",".join(missing), "--out", str(models_dir)], cwd=ROOT,
                   check=True, timeout=1800)


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


# ---------------------------------------------------------------------------- the steps


def run_engine(models_dir: Path, model: str, args, out_dir: Path) -> dict:
    path = out_dir / f"engine-{model}.json"
    cmd = [PY, "-m", "bench.engine_only", "--models-dir", str(models_dir), "--model", model,
           "--batch-sizes", args.batch_sizes, "--budget-s", str(args.engine_budget_s),
           "--min-runs", str(args.engine_min_runs), "--warmup-runs", str(args.engine_warmup_runs),
           "--rounds", str(args.engine_rounds), "--json", str(path)]
    env = {**os.environ, **dict(args.server_env)}
    meter = CpuMeter(None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    cpu = meter.stop()
    cpu["engine_cores"] = cpu.pop("loadgen_cores")  # the engine run is a reaped child of this process
    del cpu["server_cores"]
    if proc.returncode != 0:
        raise RuntimeError(f"bench.engine_only failed for {model}:\n{proc.stderr[-3000:]}")
    print(proc.stdout.rstrip(), flush=True)
    print(f"  cpu cores: {cpu}", flush=True)
    report = json.loads(path.read_text())
    report["cpu"] = cpu
    return report


def load_points(server: Server, model: str, args, images: list[bytes]) -> dict:
    out = {}
    for clients in args.clients:
        def point() -> dict:
            meter = CpuMeter(server.proc.pid)
            report = run_async(closed_loop(
                server.url, model, clients, args.duration, warmup=args.warmup, images=images, timeout=args.timeout,
            ))
            report["cpu"] = meter.stop()
            if report["throughput_img_s"]:  # CPU cost per image: steadier than img/s on a shared machine
                report["cpu"]["server_core_ms_per_img"] = round(
                    1000 * report["cpu"]["server_cores"] / report["throughput_img_s"], 2)
                if "server_threads_cores" in report["cpu"]:  # where that CPU went
                    report["cpu"]["server_threads_core_ms_per_img"] = {
                        k: round(1000 * v / report["throughput_img_s"], 2)
                        for k, v in report["cpu"]["server_threads_cores"].items()}
            print(format_report(report), flush=True)
            print(f"  cpu cores: {report['cpu']}", flush=True)
            return report

        out[f"c{clients}"] = args.guard.measure(f"{clients} client(s)", point)
    return out


def run_archserve(models_dir: Path, model: str, args, images: list[bytes], logs: Path) -> dict:
    port = free_port()
    argv = [PY, "-m", "service", "--port", str(port), "--models-dir", str(models_dir), "--models", model,
            *args.server_arg]
    with Server(f"archserve {model}", argv, port, logs / f"archserve-{model}.log", dict(args.server_env)) as server:
        ready_s = server.wait_ready()
        info = server.get_json(f"/models/{model}")
        print(f"archserve {model} ready in {ready_s:.1f}s on port {port}", flush=True)
        result = {"argv": argv[1:], "env": dict(args.server_env), "ready_s": round(ready_s, 2), "model_info": info,
                  **load_points(server, model, args, images)}
    return result


def run_naive(models_dir: Path, model: str, args, images: list[bytes], logs: Path) -> dict:
    port = free_port()
    argv = [PY, "-m", "bench.naive_server", "--models-dir", str(models_dir), "--model", model, "--port", str(port)]
    with Server(f"naive {model}", argv, port, logs / f"naive-{model}.log") as server:
        ready_s = server.wait_ready()
        print(f"naive {model} ready in {ready_s:.1f}s on port {port}", flush=True)
        result = {"argv": argv[1:], "ready_s": round(ready_s, 2), **load_points(server, model, args, images)}
    return result


# ---------------------------------------------------------------------------- summary


def _get(d: dict | None, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


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
    a_hi, a_lo = _get(r, "archserve", f"c{high}"), _get(r, "archserve", f"c{low}")
    n_hi, n_lo = _get(r, "naive", f"c{high}"), _get(r, "naive", f"c{low}")
    mean_batch = _get(a_hi, "server", "mean_batch_size")
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
        archserve_img_s=_get(a_hi, "throughput_img_s"),
        archserve_p50_lo=_get(a_lo, "latency_ms", "p50"),
        archserve_p50_hi=_get(a_hi, "latency_ms", "p50"),
        naive_img_s=_get(n_hi, "throughput_img_s"),
        naive_p50_lo=_get(n_lo, "latency_ms", "p50"),
        errors={k: v for k, v in (("archserve", _get(a_hi, "errors")), ("naive", _get(n_hi, "errors"))) if v},
    )
    row["cpu_ms_per_img"] = cpu_breakdown(r, a_hi, row.get("raw_best_img_s"))
    others = [_get(x, "cpu", "other_cores") for x in (r.get("engine"), a_lo, a_hi, n_lo, n_hi, r.get("engine_after"))]
    others = [o for o in others if o is not None]
    row["other_cores_max"] = max(others) if others else None
    if row.get("archserve_img_s") is not None and row.get("raw_best_img_s"):
        row["ratio_best"] = row["archserve_img_s"] / row["raw_best_img_s"]
    if row.get("archserve_img_s") is not None and row.get("raw_formed_img_s"):
        row["ratio_formed"] = row["archserve_img_s"] / row["raw_formed_img_s"]
    if row.get("archserve_p50_lo") is not None and row.get("raw_b1_ms") is not None:
        row["p50_minus_raw_ms"] = row["archserve_p50_lo"] - row["raw_b1_ms"]
    return row


def cpu_breakdown(r: dict, point: dict | None, raw_img_s: float | None) -> dict | None:
    """Core-ms per image at a load point, by server thread group, beside the engine's alone.

    ``engine_alone`` is the engine runs' CPU (cores, the mean of both runs) over the best img/s: what
    onnxruntime spends per image with the machine to itself. ``inference`` is what it spent in the server,
    so ``inference_vs_alone`` is what sharing the cores with decoding and HTTP cost it."""
    per_img = _get(point, "cpu", "server_threads_core_ms_per_img")
    if not per_img:
        return None
    out = {**per_img, "total": _get(point, "cpu", "server_core_ms_per_img")}
    cores = [c for c in (_get(r, "engine", "cpu", "engine_cores"), _get(r, "engine_after", "cpu", "engine_cores"))
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
    add("p50 @1 vs naive", f"{a:.1f} vs {n:.1f} ms" if both else "n/a",
        f"<= naive +{NAIVE_P50_REL:.0%} or +{NAIVE_P50_ABS_MS:g} ms",
        max(n * (1 + NAIVE_P50_REL), n + NAIVE_P50_ABS_MS) - a if both else None)
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

    def label(r: dict) -> list[str]:
        return [r["model"], str(r.get("repeat", ""))] if repeated else [r["model"]]

    first = "| model | repeat |" if repeated else "| model |"
    head = (first + " raw engine img/s: best (batch) | raw @ formed batch (batch) | archserve e2e img/s @" + str(high)
            + " | / raw best | / raw formed | naive e2e img/s @" + str(high) + " | archserve p50 @" + str(low)
            + " ms | raw batch-1 ms | difference ms | naive p50 @" + str(low) + " ms | mean batch @" + str(high)
            + " | raw drift (after / before) | other load (cores) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            *label(r),
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
            _f(r.get("mean_batch"), "{:.2f}"),
            _f(r.get("raw_drift"), "{:+.1%}"),
            _f(r.get("other_cores_max"), "{:.2f}"),
        ]) + " |")
    if any(r.get("cpu_ms_per_img") for r in rows):
        head = (first + f" engine alone: core-ms/img | archserve @{high}: inference | vs alone | decode "
                "| event loop | other | server total |")
        lines += ["", head, "|" + "---|" * head.count(" | ") + "---|"]
        for r in rows:
            c = r.get("cpu_ms_per_img") or {}
            lines.append("| " + " | ".join([
                *label(r), _f(c.get("engine_alone")), _f(c.get("inference")),
                _f(c.get("inference_vs_alone"), "{:+.0%}"), _f(c.get("decode"), "{:.2f}"),
                _f(c.get("event_loop"), "{:.2f}"), _f(c.get("other"), "{:.2f}"), _f(c.get("total")),
            ]) + " |")
    several = any(len(c.get("repeats", ())) > 1 for c in checks)
    if several:
        lines += ["", "| model | target | median repeat | every repeat | threshold | met in | result |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines += ["", "| model | target | measured | threshold | result |", "|---|---|---|---|---|"]
    for c in checks:
        result = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        if several:
            lines.append(f"| {c['model']} | {c['target']} | {c['measured']} | {'; '.join(c['repeats'])} "
                         f"| {c['threshold']} | {c['passed']} of {c['of']} | {result} |")
        else:
            lines.append(f"| {c['model']} | {c['target']} | {c['measured']} | {c['threshold']} | {result} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def run_model(model: str, models_dir: Path, args, images: list[bytes], logs: Path, tmp: Path, skip: set[str]) -> dict:
    """One model's steps, in order: the engine, archserve, the naive server, the engine again. A failing step
    is recorded under ``failures`` and the others still run."""
    r: dict = {}
    steps = (("engine", lambda: run_engine(models_dir, model, args, tmp)),
             ("archserve", lambda: run_archserve(models_dir, model, args, images, logs)),
             ("naive", lambda: run_naive(models_dir, model, args, images, logs)),
             # The engine once more: the machine's drift during the run, and a ceiling from both ends.
             ("engine_after", lambda: run_engine(models_dir, model, args, tmp)))
    for name, step in steps:
        if name in skip or (name == "engine_after" and (r.get("engine") is None or args.quick)):
            continue
        print(f"--- {model}: {name}", flush=True)
        quiet = args.guard.settle()
        try:
            r[name] = args.guard.measure("the engine run", step) if name.startswith("engine") else step()
            r[name]["settle"] = quiet
        except Exception as exc:  # one failing step must not lose the others' figures
            print(f"  {name} failed: {exc}", flush=True)
            r[name] = None
            r.setdefault("failures", {})[name] = str(exc)
    return r




def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path("bench/models"))
    p.add_argument("--models", default="resnet50,resnet18")
    p.add_argument("--duration", type=float, help="measured seconds per load point (default 20; --quick 5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per load point (default 3; --quick 1.5)")
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke run: short load points, short engine runs")
    p.add_argument("--clients", default="1,16", help="closed-loop client counts: low,high (default 1,16)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="engine-only batch sizes")
    p.add_argument("--engine-budget-s", type=float, help="engine timed seconds per batch size (default 3; quick 0.5)")
    p.add_argument("--engine-rounds", type=int, help="engine rounds over all batch sizes, alternating the order, "
                   "each size's median over all of them (default 3; quick 2; see bench/engine_only.py)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for archserve, e.g. --server-arg=--max-queue-delay-ms=2 (repeatable)")
    p.add_argument("--server-env", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="environment for archserve and the engine run, e.g. ARCHSERVE_INTRA_OP_THREADS=2")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: engine, archserve, naive, "
                   "engine_after (the engine again after the servers; never in --quick)")
    p.add_argument("--settle-s", type=float, help="before each step, wait up to this long for other work on the "
                   "machine to stop (default 60; --quick 10)")
    p.add_argument("--retries", type=int, help="re-measure a point during which other work used > 0.15 cores, "
                   "this many times at most (default 2; --quick 0)")
    p.add_argument("--noise-budget-s", type=float, help="per repeat: once this many seconds have passed since "
                   "the repeat began, no more waiting for quiet or re-measuring (default 600; --quick 30)")
    p.add_argument("--repeats", type=int, help="run every step for every model this many times, one repeat after "
                   "the other; each target is judged on its median repeat (default 3; --quick 1)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.5 if args.quick else 3.0)
    args.engine_budget_s = args.engine_budget_s or (0.5 if args.quick else 3.0)
    args.settle_s = args.settle_s if args.settle_s is not None else (10.0 if args.quick else 60.0)
    args.noise_budget_s = args.noise_budget_s if args.noise_budget_s is not None else (30.0 if args.quick else 600.0)
    args.retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    if args.engine_rounds is not None and args.engine_rounds < 1:
        print("error: --engine-rounds must be at least 1", file=sys.stderr)
        return 2
    args.engine_rounds = args.engine_rounds or (2 if args.quick else 3)
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.engine_min_runs = 2 if args.quick else 5
    args.engine_warmup_runs = 1 if args.quick else 2
    args.clients = [int(c) for c in args.clients.split(",")]
    if len(args.clients) != 2 or min(args.clients) < 1:
        print("error: --clients takes two counts, e.g. 1,16", file=sys.stderr)
        return 2
    if args.duration > 600:
        print("error: --duration is at most 600 s", file=sys.stderr)
        return 2
    low, high = args.clients
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    models_dir = args.models_dir if args.models_dir.is_absolute() else ROOT / args.models_dir
    out_dir = args.out if args.out.is_absolute() else ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    machine = machine_info()
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    result_path = out_dir / f"{stamp}-{machine['host']}.json"
    logs = out_dir / f"{stamp}-{machine['host']}-logs"
    logs.mkdir(exist_ok=True)
    print(f"{machine['cpu_model']}, {machine['cores']} cores, onnxruntime {machine['onnxruntime']}, "
          f"load average {machine['loadavg_start'][0]:.2f}; {args.duration:g}s per load point", flush=True)

    ensure_models(models_dir, models)
    images = make_jpegs()
    results: dict = {"machine": machine, "config": {
        "models": models, "models_dir": str(models_dir), "duration_s": args.duration, "warmup_s": args.warmup,
        "clients": args.clients, "batch_sizes": args.batch_sizes, "engine_budget_s": args.engine_budget_s,
        "engine_rounds": args.engine_rounds, "repeats": args.repeats,
        "quick": args.quick, "settle_s": args.settle_s, "server_args": args.server_arg,
        "server_env": dict(args.server_env),
        "images": {"count": len(images), "size": "500x375", "quality": 90, "bytes": [len(i) for i in images]},
    }, "repeats": []}
    with tempfile.TemporaryDirectory(prefix="archserve-bench-") as tmp:
        for repeat in range(1, args.repeats + 1):
            # Each repeat has the whole noise budget: a noisy first repeat must not leave the last unprotected.
            args.guard = NoiseGuard(budget_s=args.noise_budget_s, settle_s=args.settle_s, retries=args.retries)
            measured: dict = {}
            results["repeats"].append({"repeat": repeat, "models": measured})
            repeat_logs = logs / f"repeat-{repeat}" if args.repeats > 1 else logs
            repeat_logs.mkdir(exist_ok=True)
            for model in models:
                print(f"\n=== {model}" + (f", repeat {repeat} of {args.repeats}" if args.repeats > 1 else "")
                      + " ===", flush=True)
                measured[model] = run_model(model, models_dir, args, images, repeat_logs, Path(tmp), skip)
            rows = [summarise(m, measured[m], low, high) for m in models]
            results["repeats"][-1].update(summary=rows, targets=[c for row in rows for c in targets(row, high)])
            if args.repeats > 1:
                print(f"\n{markdown(rows, results['repeats'][-1]['targets'], low, high)}\n", flush=True)
                result_path.write_text(json.dumps(results, indent=2))  # the repeats so far, if a later one dies

    # Every model's row of every repeat (by model, then repeat), then each target judged on its median repeat.
    rows = [{**row, "repeat": rep["repeat"]} if args.repeats > 1 else row
            for m in models for rep in results["repeats"] for row in rep["summary"] if row["model"] == m]
    checks = judge([rep["targets"] for rep in results["repeats"]])
    machine["loadavg_end"] = os.getloadavg()
    machine["provider"] = next((_get(rep["models"][m], "engine", "provider") for rep in results["repeats"]
                                for m in models if _get(rep["models"][m], "engine", "provider")), None)
    results.update(summary=rows, targets=checks, elapsed_s=round(time.monotonic() - started, 1))
    table = markdown(rows, checks, low, high)
    results["table"] = table
    result_path.write_text(json.dumps(results, indent=2))
    print(f"\n{table}\n")
    print(f"provider {machine['provider']}; load average {machine['loadavg_start'][0]:.2f} at start, "
          f"{machine['loadavg_end'][0]:.2f} at end; {results['elapsed_s']:.0f}s in all")
    print(f"results: {result_path.relative_to(ROOT) if result_path.is_relative_to(ROOT) else result_path}")
    print(f"server logs: {logs.relative_to(ROOT) if logs.is_relative_to(ROOT) else logs}")
    return 1 if any(r.get("failures") for rep in results["repeats"] for r in rep["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
