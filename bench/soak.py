"""A soak: steady load, hot reloads and an experiment with a shadow, for minutes (``python -m bench.soak``).

One server on a copy of the model repository, serving an experiment: ``--control`` (weight 90) against
``--challenger`` (weight 10), with ``--challenger`` as a shadow of every request too, its predictions in a
SQLite store. The load is 500x375 JPEGs to the experiment, open loop (Poisson, on raw sockets) at ``--load`` x
the capacity measured first in closed loop. Every ``--reload-every`` seconds a new version of the control model
is published into the repository (a copy of the latest), which the server loads and swaps in while serving
(poll every 2 s); versions older than the two latest are deleted afterwards.

Each minute is its own open-loop window: p50 and p99 from when each request was due, answers by status, the
RSS of the server's process tree (sampled every 2 s: the minute's floor and peak; the peak holds a retired
version still waiting out its requests). Targets: no error; drift of the RSS floor from the second minute (the
first with a retired version in it, like every later one) to the last < 5%.

    python -m bench.soak                      # 10 minutes, ~11 in all
    python -m bench.soak --minutes 2 --reload-every 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from modelrepo.layout import list_versions
from modelrepo.manifest import MANIFEST_FILENAME

from .cpu_meter import process_tree
from .http_client import run_async
from .images import make_jpegs
from .load import closed_loop, open_loop
from .report import machine_facts, md_table, write_json
from .servers import PY, ROOT, Server, export_models, free_port

EXPERIMENT = "soak"


def rss_mb(pid: int) -> float:
    total = 0
    for child in process_tree(pid):
        try:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass  # gone between the listing and the read
    return round(total / 1024, 1)


def publish_next(model_dir: Path) -> int:
    """Copy the latest version to the next number, written aside and renamed in (the server never sees a half
    copy); drop all but the two latest. Returns the new version."""
    versions = list_versions(model_dir)
    new = versions[-1] + 1
    staging = model_dir / f".staging-{new}"
    shutil.copytree(model_dir / str(versions[-1]), staging)
    manifest = json.loads((staging / MANIFEST_FILENAME).read_text())
    manifest["version"] = new  # a version's manifest names its folder
    (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2))
    staging.rename(model_dir / str(new))
    for old in versions[:-1]:
        shutil.rmtree(model_dir / str(old), ignore_errors=True)
    return new


def verdicts(minutes: list[dict]) -> dict:
    errors = {}
    for m in minutes:
        for status, count in m["errors"].items():
            errors[status] = errors.get(status, 0) + count
    # On each minute's floor (a sample taken while a retired version still waits out its requests is higher),
    # from the second minute, the first that holds a version being retired, as every later one does.
    after_first, end = minutes[min(1, len(minutes) - 1)]["rss_mb_min"], minutes[-1]["rss_mb_min"]
    drift = round((end - after_first) / after_first, 4) if after_first else None
    return {
        "errors": {"value": errors, "bound": "none", "ok": not errors},
        "rss_drift_after_first_minute": {"value": drift, "bound": "< 0.05", "ok": drift is not None and drift < 0.05},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models")
    parser.add_argument("--control", default="resnet18")
    parser.add_argument("--challenger", default="resnet50")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--minute-seconds", type=float, default=60.0, help="length of one reporting window")
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--reload-every", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    export_models(args.models_dir, [args.control, args.challenger])
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    repo = work / "models"
    repo.mkdir()
    for name in (args.control, args.challenger):
        shutil.copytree(args.models_dir / name / str(list_versions(args.models_dir / name)[-1]), repo / name / "1")
    (work / "experiments.yaml").write_text(
        f"experiments:\n  - name: {EXPERIMENT}\n    variants:\n"
        f"      - {{name: control, model: {args.control}, weight: 90}}\n"
        f"      - {{name: challenger, model: {args.challenger}, weight: 10}}\n"
        f"    shadows:\n      - {{name: shadow, model: {args.challenger}}}\n"
    )
    port = free_port()
    env = {"ARCHSERVE_EXPERIMENTS_FILE": str(work / "experiments.yaml"), "ARCHSERVE_STORE_PATH": str(work / "s.db"),
           "ARCHSERVE_POLL_INTERVAL_S": "2", "ARCHSERVE_ACCESS_LOG": "false"}
    argv_server = [PY, "-m", "service", "--port", str(port), "--models-dir", str(repo), "--log-level", "warning"]
    images = make_jpegs()
    results: dict = {"machine": machine_facts(), "command": " ".join(
        [Path(PY).name, "-m", "bench.soak", *(argv if argv is not None else sys.argv[1:])]), "minutes": []}
    reloads: list[tuple[float, int]] = []
    rss_samples: list[float] = []  # every 2 s: a minute's floor is what stays, its peak the old version not yet gone
    stop = threading.Event()

    def reloader(started: float) -> None:
        while not stop.wait(args.reload_every):
            reloads.append((round(time.monotonic() - started, 1), publish_next(repo / args.control)))

    def sampler(pid: int) -> None:
        while not stop.wait(2.0):
            rss_samples.append(rss_mb(pid))

    with Server("archserve", argv_server, port, work / "server.log", env=env) as server:
        server.wait_ready()
        capacity = run_async(closed_loop(server.url, EXPERIMENT, args.clients, args.capacity_seconds,
                                         images=images))
        rate = capacity["throughput_req_s"] * args.load
        results["capacity"] = capacity
        print(f"capacity {capacity['throughput_req_s']} requests/s; soak at {rate:.1f}/s for {args.minutes:g} x "
              f"{args.minute_seconds:g} s, a reload every {args.reload_every:g} s", flush=True)
        started = time.monotonic()
        threads = [threading.Thread(target=reloader, args=(started,), daemon=True),
                   threading.Thread(target=sampler, args=(server.proc.pid,), daemon=True)]
        for thread in threads:
            thread.start()
        results["rss_mb_start"] = rss_mb(server.proc.pid)
        try:
            for minute in range(int(round(args.minutes))):
                report = run_async(open_loop(server.url, EXPERIMENT, rate, args.minute_seconds, warmup=0.0,
                                             images=images, seed=minute, max_connections=1024))
                window, rss_samples[:] = list(rss_samples), []
                point = {"minute": minute + 1, "ok": report["ok"], "errors": report["errors"],
                         "error_codes": report["error_codes"],
                         "p50_ms": report["latency_ms"]["p50"], "p99_ms": report["latency_ms"]["p99"],
                         "late": report["late"]["late"], "rss_mb": rss_mb(server.proc.pid),
                         "rss_mb_min": min(window, default=None), "rss_mb_max": max(window, default=None),
                         "reloads_so_far": len(reloads)}
                results["minutes"].append(point)
                print(f"  {point}", flush=True)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        served = server.get_json("/models") or {}
        results["served_at_end"] = served
        log = (work / "server.log").read_text(errors="replace")
        results["server_log_errors"] = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    results["reloads"] = reloads
    results["verdicts"] = verdicts(results["minutes"])
    rows = [[m["minute"], m["ok"], m["error_codes"] or "-", m["p50_ms"], m["p99_ms"],
             f"{m['rss_mb_min']}-{m['rss_mb_max']}", m["reloads_so_far"]] for m in results["minutes"]]
    print("\n".join(md_table(["minute", "200s", "errors", "p50 ms", "p99 ms", "RSS MB (min-max)", "reloads"],
                            rows)))
    for name, v in results["verdicts"].items():
        print(f"{name}: {v['value']} ({v['bound']}): {'pass' if v['ok'] else 'FAIL'}")
    out = args.out or ROOT / "docs" / "results" / f"soak-{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    write_json(out, results)
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
