"""``make bench``: engine-only, archserve end-to-end and the naive server, per model, in one go.

For each model (default resnet50 then resnet18):

1. engine only (``bench.engine_only`` in a subprocess): img/s and ms per batch at
   each batch size, the ceiling;
2. archserve (``python -m service``) and the naive server (``bench.naive_server``),
   both up on free loopback ports, closed loop (``bench.loadgen``): 1 client
   in ``--pair-rounds`` rounds that alternate between the two servers (each
   round a share of ``--duration``, each server's latencies pooled), so the
   machine's drift falls on both alike, then 16 clients on each in turn;
3. the engine again (not with ``--quick``). The targets divide by the mean of
   the two engine runs, which bracket the load points in time, and the table
   shows how far the machine drifted between them.

The steps run for every model, and all of that ``--repeats`` times
(default 3), one repeat after the other. Each target is judged on its median
repeat (``judge``): with three, it passes when it passed in two of them (a
repeat whose step failed counts against it). On a shared 2-core VM one
repeat's e2e / raw ratio moves by a few percent from the machine alone, as much
as some targets' margins (``docs/benchmarks.md`` has the spread); the table
shows every repeat and how many met each target.

Only one server is under load at a time; each is stopped with SIGTERM (killed
if it has not exited after a timeout). The models are exported into ``--models-dir``
first if missing. Everything is written to ``bench/results/<date>-<host>.json``
and summarised as markdown tables with the targets' pass/fail.

    python -m bench.run                 # 3 repeats of 20 s load points: ~14 minutes on 2 cores, more on a busy one
    python -m bench.run --repeats 1     # one repeat: ~5 minutes
    python -m bench.run --quick         # a smoke run of under 2 minutes (one repeat)
    python -m bench.run --duration 30 --models resnet50 --server-arg=--max-queue-delay-ms=2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cpu_meter import CpuMeter
from .http_client import run_async
from .images import make_jpegs
from .load import closed_loop, latency_summary
from .loadgen import format_report
from .noise import NoiseGuard
from .report import dig, machine_facts, write_json
from .servers import PY, ROOT, Server, export_models, free_port
from .summary import judge, markdown, summarise, targets


def machine_info() -> dict:
    import onnxruntime as ort

    return {**machine_facts(), "onnxruntime_providers_available": ort.get_available_providers(),
            "loadavg_start": os.getloadavg()}


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


def measure_point(server: Server, model: str, clients: int, args, images: list[bytes], *,
                  duration: float | None = None, warmup: float | None = None, keep_latencies: bool = False) -> dict:
    """One closed-loop load point against ``server``, with the CPU it cost (per image, by thread group)."""
    meter = CpuMeter(server.proc.pid)
    report = run_async(closed_loop(
        server.url, model, clients, duration or args.duration, warmup=args.warmup if warmup is None else warmup,
        images=images, timeout=args.timeout, keep_latencies=keep_latencies,
    ))
    report["cpu"] = meter.stop()
    per_image_cpu(report)
    return report


def per_image_cpu(report: dict) -> None:
    """CPU cost per image: steadier than img/s on a shared machine."""
    cpu, img_s = report["cpu"], report["throughput_img_s"]
    if not img_s:
        return
    cpu["server_core_ms_per_img"] = round(1000 * cpu["server_cores"] / img_s, 2)
    if "server_threads_cores" in cpu:  # where that CPU went
        cpu["server_threads_core_ms_per_img"] = {k: round(1000 * v / img_s, 2)
                                                 for k, v in cpu["server_threads_cores"].items()}


def alternating(servers: dict[str, Server], model: str, clients: int, args, images: list[bytes]) -> dict:
    """``clients`` against each server in ``args.pair_rounds`` rounds, alternating which goes first, each round
    ``args.duration / rounds`` long: each server's rounds pooled (``pool``). Returns the reports by server,
    and under ``cpu`` the most other work seen in any round (for the noise guard)."""
    rounds = args.pair_rounds
    names = list(servers)
    measured: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            report = measure_point(servers[name], model, clients, args, images, duration=args.duration / rounds,
                                   warmup=args.warmup if i == 0 else min(args.warmup, 1.0), keep_latencies=True)
            measured[name].append(report)
            print(f"  round {i + 1}/{rounds}, {name}: p50 {report['latency_ms']['p50']} ms, "
                  f"{report['ok']} requests", flush=True)
    pooled = {name: pool(reports) for name, reports in measured.items()}
    for name, report in pooled.items():
        print(f"  {name}, {rounds} rounds pooled:\n{format_report(report)}", flush=True)
    return {**pooled, "cpu": {"other_cores": max(r["cpu"]["other_cores"] for r in pooled.values())}}


def pool(reports: list[dict]) -> dict:
    """Several rounds of one load point on one server, as one report: counts summed, latencies pooled, CPU
    averaged (the most other work of any round kept). ``server`` (its /metrics figures) is the last round's;
    ``round_p50_ms`` keeps each round's median."""
    last = reports[-1]
    latencies = [x for r in reports for x in r.pop("latencies_s")]
    duration = sum(r["duration_s"] for r in reports)
    errors: dict[str, int] = {}
    for r in reports:
        for key, count in r["errors"].items():
            errors[key] = errors.get(key, 0) + count
    cpus = [r["cpu"] for r in reports]
    cpu = {key: round(sum(c[key] for c in cpus) / len(cpus), 3) for key in cpus[0]
           if isinstance(cpus[0][key], (int, float)) and all(key in c for c in cpus)}
    cpu["other_cores"] = max(c["other_cores"] for c in cpus)
    if all("server_threads_cores" in c for c in cpus):
        groups = {k for c in cpus for k in c["server_threads_cores"]}
        cpu["server_threads_cores"] = {k: round(sum(c["server_threads_cores"].get(k, 0.0) for c in cpus) / len(cpus), 3)
                                       for k in sorted(groups)}
    images_ok = sum(r["images_ok"] for r in reports)
    report = {**last, "duration_s": duration, "requests": sum(r["requests"] for r in reports),
              "ok": sum(r["ok"] for r in reports), "images_ok": images_ok, "errors": errors,
              "throughput_img_s": round(images_ok / duration, 3),
              "throughput_req_s": round(sum(r["ok"] for r in reports) / duration, 3),
              "latency_ms": latency_summary(latencies), "rounds": len(reports),
              "round_p50_ms": [r["latency_ms"]["p50"] for r in reports], "cpu": cpu}
    for key in ("server_core_ms_per_img", "server_threads_core_ms_per_img"):
        report["cpu"].pop(key, None)
    per_image_cpu(report)
    return report


def run_servers(models_dir: Path, model: str, args, images: list[bytes], logs: Path, skip: set[str]) -> dict:
    """archserve and the naive server (those not in ``skip``), both up: the low client count alternating
    between them (one server alone: measured as the high one), then the high count on each in turn."""
    low, high = args.clients
    specs = {
        "archserve": ([PY, "-m", "service", "--port", "{port}", "--models-dir", str(models_dir), "--models", model,
                       *args.server_arg], dict(args.server_env)),
        "naive": ([PY, "-m", "bench.naive_server", "--models-dir", str(models_dir), "--model", model,
                   "--port", "{port}"], {}),
    }
    results: dict[str, dict] = {}
    servers: dict[str, Server] = {}
    with contextlib.ExitStack() as stack:
        for name, (argv, env) in specs.items():
            if name in skip:
                continue
            port = free_port()
            argv = [str(port) if a == "{port}" else a for a in argv]
            server = stack.enter_context(Server(f"{name} {model}", argv, port, logs / f"{name}-{model}.log", env))
            ready_s = server.wait_ready()
            print(f"{name} {model} ready in {ready_s:.1f}s on port {port}", flush=True)
            servers[name] = server
            results[name] = {"argv": argv[1:], "ready_s": round(ready_s, 2)}
            if name == "archserve":
                results[name].update(env=env, model_info=server.get_json(f"/models/{model}"))
        if len(servers) == 2:
            paired = args.guard.measure(f"{low} client(s), alternating",
                                        lambda: alternating(servers, model, low, args, images))
            for name in servers:
                results[name][f"c{low}"] = {**paired[name], "attempts": paired["attempts"]}
        for name, server in servers.items():
            for clients in ([high] if len(servers) == 2 else [low, high]):
                def point(server=server, clients=clients) -> dict:
                    report = measure_point(server, model, clients, args, images)
                    print(format_report(report), flush=True)
                    print(f"  cpu cores: {report['cpu']}", flush=True)
                    return report

                print(f"  {name}:", flush=True)
                results[name][f"c{clients}"] = args.guard.measure(f"{clients} client(s) on {name}", point)
    return results


# ---------------------------------------------------------------------------- main


def run_model(model: str, models_dir: Path, args, images: list[bytes], logs: Path, tmp: Path, skip: set[str]) -> dict:
    """One model's steps, in order: the engine, both servers, the engine again. A failing step is recorded
    under ``failures`` (and its figures as None) and the others still run."""
    r: dict = {}
    servers = [name for name in ("archserve", "naive") if name not in skip]
    steps = (("engine", lambda: {"engine": args.guard.measure("the engine run",
                                                              lambda: run_engine(models_dir, model, args, tmp))}),
             ("servers", lambda: run_servers(models_dir, model, args, images, logs, skip)),
             # The engine once more: the machine's drift during the run, and a ceiling from both ends.
             ("engine_after", lambda: {"engine_after": args.guard.measure(
                 "the engine run", lambda: run_engine(models_dir, model, args, tmp))}))
    for name, step in steps:
        if (name in skip or (name == "servers" and not servers)
                or (name == "engine_after" and (r.get("engine") is None or args.quick))):
            continue
        print(f"--- {model}: {name}", flush=True)
        quiet = args.guard.settle()
        try:
            for key, figures in step().items():
                r[key] = {**figures, "settle": quiet}
        except Exception as exc:  # one failing step must not lose the others' figures
            print(f"  {name} failed: {exc}", flush=True)
            for key in servers if name == "servers" else [name]:
                r[key] = None
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
    p.add_argument("--pair-rounds", type=int, help="rounds of the low client count, alternating between archserve "
                   "and the naive server, each --duration / rounds long (default 4; --quick 2)")
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
    if args.pair_rounds is not None and args.pair_rounds < 1:
        print("error: --pair-rounds must be at least 1", file=sys.stderr)
        return 2
    args.pair_rounds = args.pair_rounds or (2 if args.quick else 4)
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

    export_models(models_dir, models)
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
                write_json(result_path, results)  # the repeats so far, if a later one dies

    # Every model's row of every repeat (by model, then repeat), then each target judged on its median repeat.
    rows = [{**row, "repeat": rep["repeat"]} if args.repeats > 1 else row
            for m in models for rep in results["repeats"] for row in rep["summary"] if row["model"] == m]
    checks = judge([rep["targets"] for rep in results["repeats"]])
    machine["loadavg_end"] = os.getloadavg()
    machine["provider"] = next((dig(rep["models"][m], "engine", "provider") for rep in results["repeats"]
                                for m in models if dig(rep["models"][m], "engine", "provider")), None)
    results.update(summary=rows, targets=checks, elapsed_s=round(time.monotonic() - started, 1))
    table = markdown(rows, checks, low, high)
    results["table"] = table
    write_json(result_path, results)
    print(f"\n{table}\n")
    print(f"provider {machine['provider']}; load average {machine['loadavg_start'][0]:.2f} at start, "
          f"{machine['loadavg_end'][0]:.2f} at end; {results['elapsed_s']:.0f}s in all")
    print(f"results: {result_path.relative_to(ROOT) if result_path.is_relative_to(ROOT) else result_path}")
    print(f"server logs: {logs.relative_to(ROOT) if logs.is_relative_to(ROOT) else logs}")
    return 1 if any(r.get("failures") for rep in results["repeats"] for r in rep["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
