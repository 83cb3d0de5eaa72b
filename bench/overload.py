"""Overload and load at 70%: admission by queue wait (``python -m bench.overload``).

One server (``python -m service``, one model, default settings but ``--max-queue-wait-ms``), three phases:

1. ``capacity``: closed loop, ``--clients`` JPEG clients (500x375) for ``--capacity-seconds``: what the server
   answers per second when every client waits for its answer. The open loops below are rated from it.
2. ``overload``: open loop at ``--overload`` x capacity (Poisson arrivals, seeded) for ``--duration`` seconds,
   on raw sockets with up to ``--max-connections`` connections, so the generator holds its rate however slowly
   the server answers; a request it cannot send on time is counted late, and its latency counts from when it
   was due.
3. ``light``: open loop at ``--light`` x capacity for ``--duration`` seconds.

Targets (the issue's, checked and printed):

- overload: goodput (200s per second) >= 90% of capacity; p99 of the 200s <= 1.5 x max queue wait + one
  batch's run time (the server's mean over the window); p99 of every other answer (503) < 50 ms; every request
  sent was answered (no timeout, no connection error, nothing unfinished).
- light: p99 <= 5 x p50.

Results go to ``docs/results/overload-<time>.json`` (``--out`` to change).

    python -m bench.overload                      # ~2 minutes
    python -m bench.overload --max-queue-wait-ms 0   # count bound only: the design before
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .http_client import run_async
from .images import make_jpegs
from .load import closed_loop, open_loop
from .report import machine_facts, md_table, write_json
from .servers import PY, ROOT, Server, export_models, free_port


def verdicts(capacity: float, over: dict, light: dict, max_wait_ms: float) -> dict:
    """Each target: the figure, its bound, and whether it holds."""
    batch_ms = (over.get("server") or {}).get("inference_ms_per_batch") or 0.0
    refused = over["error_latency_ms"].get("503", {})
    lost = {k: v for k, v in over["errors"].items() if k != "503"}
    lost_light = {k: v for k, v in light["errors"].items() if k not in ("503",)}
    p99_bound = 1.5 * max_wait_ms + batch_ms if max_wait_ms else None
    out = {
        "goodput_share": {"value": round(over["throughput_req_s"] / capacity, 3), "bound": ">= 0.9"},
        "p99_200_ms": {"value": over["latency_ms"]["p99"], "bound": f"<= {p99_bound:.0f}" if p99_bound else None},
        "p99_503_ms": {"value": refused.get("p99"), "bound": "< 50"},
        "sent_equals_answered": {"value": {"scheduled": over["late"]["scheduled"], "answered": over["requests"],
                                           "lost": lost}, "bound": "no loss"},
        "light_p99_over_p50": {"value": _ratio(light["latency_ms"]["p99"], light["latency_ms"]["p50"]),
                               "bound": "<= 5"},
        "light_errors": {"value": light["errors"], "bound": "none"},
    }
    out["goodput_share"]["ok"] = out["goodput_share"]["value"] >= 0.9
    out["p99_200_ms"]["ok"] = bool(p99_bound) and over["latency_ms"]["p99"] is not None and \
        over["latency_ms"]["p99"] <= p99_bound
    out["p99_503_ms"]["ok"] = refused.get("p99") is not None and refused["p99"] < 50
    out["sent_equals_answered"]["ok"] = not lost and over["requests"] == over["late"]["scheduled"]
    out["light_p99_over_p50"]["ok"] = out["light_p99_over_p50"]["value"] is not None and \
        out["light_p99_over_p50"]["value"] <= 5
    out["light_errors"]["ok"] = not lost_light
    return out


def _ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--max-queue-wait-ms", type=float, default=1000.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--light", type=float, default=0.7)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--max-connections", type=int, default=4096)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    export_models(args.models_dir, [args.model])
    images = make_jpegs()
    logs = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    port = free_port()
    argv_server = [PY, "-m", "service", "--port", str(port), "--models-dir", str(args.models_dir),
                   "--models", args.model, "--log-level", "warning", *args.server_arg]
    env = {"ARCHSERVE_MAX_QUEUE_WAIT_MS": str(args.max_queue_wait_ms), "ARCHSERVE_ACCESS_LOG": "false"}
    results: dict = {"machine": machine_facts(), "command": " ".join(
        [Path(PY).name, "-m", "bench.overload", *(argv if argv is not None else sys.argv[1:])]),
        "max_queue_wait_ms": args.max_queue_wait_ms}
    with Server("archserve", argv_server, port, logs / "server.log", env=env) as server:
        server.wait_ready()
        print(f"capacity: closed loop, {args.clients} clients, {args.capacity_seconds:g} s", flush=True)
        capacity = run_async(closed_loop(server.url, args.model, args.clients, args.capacity_seconds,
                                         images=images))
        rate = capacity["throughput_req_s"]
        results["capacity"] = capacity
        print(f"  {rate:.1f} requests/s, p50 {capacity['latency_ms']['p50']} ms", flush=True)
        for phase, factor in (("overload", args.overload), ("light", args.light)):
            time.sleep(2)  # the queue left by the phase before drains
            print(f"{phase}: open loop at {factor:g} x capacity = {rate * factor:.1f}/s, {args.duration:g} s",
                  flush=True)
            report = run_async(open_loop(server.url, args.model, rate * factor, args.duration, images=images,
                                         max_connections=args.max_connections))
            results[phase] = report
            print(f"  200/s {report['throughput_req_s']}, errors {report['errors']}, p50/p99 "
                  f"{report['latency_ms']['p50']}/{report['latency_ms']['p99']} ms, late "
                  f"{report['late']['late']}/{report['late']['scheduled']}", flush=True)
    results["verdicts"] = verdicts(rate, results["overload"], results["light"], args.max_queue_wait_ms)
    rows = [[name, v["value"], v["bound"], "pass" if v["ok"] else "FAIL"] for name, v in results["verdicts"].items()]
    print("\n".join(md_table(["target", "measured", "bound", "result"], rows)))
    out = args.out or ROOT / "docs" / "results" / f"overload-{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    write_json(out, results)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
