"""The engine process against the in-process path and against independent workers (``python -m bench.engine_process``).

Five measurements, one run, each the ratio of two things measured minutes apart on the same machine:

- ``handoff``: a front-end -> engine -> front-end round trip through the null engine (``ARCHSERVE_NULL_ENGINE``)
  against the same model's in-process batcher, 224x224x3 uint8 images, 1 client, at 1, 8 and 32 images per
  request; alternating blocks of requests, medians per request.
- ``front_end``: a null engine behind one front-end under 16 JPEG clients (500x375): the front-end's CPU per
  image, split by thread (event loop: HTTP, body, handoff; decode threads), against this process's own
  single-thread decode of the same JPEGs.
- ``batching``, ``memory``, ``throughput``: resnet18 (and resnet50) at 16 clients with 4 front-ends and an
  engine, with 4 independent workers (``--engine-process off``) and with ``--workers 1``: mean batch at the
  engine, RSS and PSS of the whole process tree, img/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from modelrepo.layout import list_versions
from service.images.preprocess import PreprocessSpec, decode_for
from service.metrics import Metrics
from service.models.served import load_model
from service.settings import Settings
from service.split.client import EngineClient

from .cpu_meter import process_tree, process_tree_threads_cpu_s
from .http_client import run_async
from .images import make_jpegs
from .load import closed_loop
from .report import machine_facts
from .servers import PY, ROOT, Server, export_models, free_port


def _maps_onnxruntime(pid: int) -> bool:
    try:
        return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _memory_mb(pids: list[int]) -> dict:
    """RSS (shared pages counted in each process) and PSS (shared pages split among them) in MB."""
    rss = pss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1), "processes": len(pids)}


def _tree(pid: int) -> list[int]:
    return list(process_tree(pid))  # the server and its worker (engine) processes


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- handoff -------------------------------------------------------------------------------------------------

async def _handoff(models_dir: Path, model: str, socket_path: str, sizes: list[int], rounds: int,
                   per_block: int) -> dict:
    settings = Settings(models_dir=models_dir, models=[model], null_engine=True, device="cpu", warmup=False,
                        engine_socket=socket_path, engine_process="on", poll_interval_s=0)
    metrics = Metrics(CollectorRegistry())
    version = list_versions(models_dir / model)[-1]  # the one the engine serves (the latest)
    local = await asyncio.to_thread(load_model, model, version, settings, metrics)
    await local.batcher.start()
    state = types.SimpleNamespace(ready=False, status="loading", reason="", shutting_down=False,
                                  metrics=metrics, models=None)
    client = EngineClient(state, settings)
    client.start()
    await client.wait_ready(120)
    remote = state.models.get(model)
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for size in sizes:
            arrays = [image.copy() for _ in range(size)]
            order = [("in_process", local), ("engine", remote)]
            for label, served in order if r % 2 == 0 else order[::-1]:
                samples = times.setdefault((label, size), [])
                for _ in range(per_block):
                    started = time.perf_counter()
                    await served.batcher.submit_many(arrays, deadline=time.monotonic() + 30)
                    samples.append(time.perf_counter() - started)
    await client.close()
    await local.batcher.close()
    out = {}
    for size in sizes:
        inproc = statistics.median(times[("in_process", size)]) * 1e6
        engine = statistics.median(times[("engine", size)]) * 1e6
        out[str(size)] = {"in_process_us": round(inproc, 1), "engine_us": round(engine, 1),
                          "added_us": round(engine - inproc, 1),
                          "added_us_per_image": round((engine - inproc) / size, 2),
                          "requests_each": len(times[("engine", size)])}
    return out


def measure_handoff(models_dir: Path, model: str, args, logs: Path) -> dict:
    socket_path = tempfile.mktemp(prefix="archserve-bench-", suffix=".sock")
    env = {"ARCHSERVE_MODELS_DIR": str(models_dir), "ARCHSERVE_MODELS": model, "ARCHSERVE_NULL_ENGINE": "true",
           "ARCHSERVE_DEVICE": "cpu", "ARCHSERVE_POLL_INTERVAL_S": "0", "ARCHSERVE_LOG_LEVEL": "warning"}
    engine = Server("engine", [PY, "-c", f"from service.split import server; server.run({socket_path!r})"],
                    0, logs / "handoff-engine.log", env=env)
    with engine:
        deadline = time.monotonic() + 120
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline or engine.proc.poll() is not None:
                raise RuntimeError(f"the engine did not start: {engine.log_tail()}")
            time.sleep(0.1)
        return run_async(_handoff(models_dir, model, socket_path, [1, 8, 32], args.handoff_rounds,
                                  args.handoff_block))  # uvloop, as in the front-ends (uvicorn's)


# --- servers under load ----------------------------------------------------------------------------------------

def _service(label: str, models_dir: Path, model: str, logs: Path, *argv: str, env: dict | None = None) -> Server:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHSERVE_", "PROMETHEUS_"))}
    server = Server(label, [PY, "-m", "service", "--port", str(port), "--models-dir", str(models_dir),
                            "--models", model, "--log-level", "warning", *argv], port, logs / f"{label}.log",
                    env={**(env or {})})
    server.env = {**clean, **(env or {})}
    return server


def _load_point(server: Server, model: str, args, images: list[bytes]) -> dict:
    """16 clients (``--clients``) on ``server``: img/s, mean batch, the tree's memory, each process's CPU."""
    pids = _tree(server.proc.pid)
    engine = [pid for pid in pids if pid != server.proc.pid and _maps_onnxruntime(pid)]
    cpu0 = {pid: _cpu_s(pid) for pid in pids}
    threads0 = {pid: process_tree_threads_cpu_s(pid) for pid in pids}
    started = time.monotonic()
    report = run_async(closed_loop(server.url, model, args.clients, args.duration, warmup=args.warmup,
                                   images=images, timeout=60))
    wall = time.monotonic() - started
    cpu = {pid: _cpu_s(pid) - cpu0[pid] for pid in pids}
    threads = {pid: {k: v - threads0[pid][k] for k, v in process_tree_threads_cpu_s(pid).items()} for pid in pids}
    memory = _memory_mb(_tree(server.proc.pid))
    img_s = report["throughput_img_s"]
    images_done = img_s * wall if img_s else 0
    # The supervisor's other children (multiprocessing's resource tracker) never run an event loop.
    front_ends = [pid for pid in pids if pid != server.proc.pid and pid not in engine
                  and threads[pid]["event_loop"] > 0]
    if len(pids) == 1:  # one process: the server is its own front-end (and engine)
        front_ends = pids
    out = {
        "img_s": img_s, "p50_ms": report["latency_ms"]["p50"], "errors": report["errors"],
        "mean_batch": report["server"]["mean_batch_size"], "memory": memory,
        "engine_pid_memory": _memory_mb(engine) if engine else None,
        "processes": {"engine": len(engine), "front_ends_or_workers": len(front_ends)},
    }
    if images_done:
        per_image = {k: 0.0 for k in ("event_loop", "decode", "inference", "other")}
        for pid in front_ends:
            for k, v in threads[pid].items():
                per_image[k] += v
        out["front_end_core_ms_per_img"] = round(1000 * sum(cpu[pid] for pid in front_ends) / images_done, 3)
        out["front_end_threads_core_ms_per_img"] = {k: round(1000 * v / images_done, 3) for k, v in per_image.items()}
        if engine:
            out["engine_core_ms_per_img"] = round(1000 * sum(cpu[pid] for pid in engine) / images_done, 3)
    return out


def decode_core_ms(images: list[bytes], repeats: int = 30) -> float:
    """This process's CPU per decode of ``images`` (the server's decode_for: resnet's 256 -> 224)."""
    spec = PreprocessSpec(resize=256, crop=224, interpolation="bilinear", max_pixels=50_000_000)
    for data in images:
        decode_for(data, spec)
    started = time.thread_time()
    for _ in range(repeats):
        for data in images:
            decode_for(data, spec)
    return 1000 * (time.thread_time() - started) / (repeats * len(images))


def run_point(label: str, models_dir: Path, model: str, logs: Path, args, images, *argv, env=None) -> dict:
    with _service(label, models_dir, model, logs, *argv, env=env) as server:
        server.wait_ready()
        point = _load_point(server, model, args, images)
    print(f"  {label}: {json.dumps(point)}", flush=True)
    return point


def alternate_throughput(models_dir: Path, model: str, logs: Path, args, images) -> dict:
    """4 front-ends + engine against ``--workers 1``, both up, in ``--alternate-rounds`` rounds that alternate
    which goes first: the machine's drift over minutes falls on both alike, where one point each cannot tell
    a difference of a few percent from it."""
    rounds, seconds = args.alternate_rounds, args.alternate_seconds
    img: dict[str, list[float]] = {"front_ends_4": [], "workers_1": []}
    with _service(f"{model}-alt-split4", models_dir, model, logs, "--workers", "4") as split, \
            _service(f"{model}-alt-w1", models_dir, model, logs, "--workers", "1") as single:
        split.wait_ready()
        single.wait_ready()
        order = [("front_ends_4", split), ("workers_1", single)]
        for r in range(rounds):
            for label, server in order if r % 2 == 0 else order[::-1]:
                report = run_async(closed_loop(server.url, model, args.clients, seconds,
                                               warmup=args.warmup if r == 0 else 1.0, images=images, timeout=60))
                img[label].append(report["throughput_img_s"])
    out = {label: {"rounds_img_s": v, "mean_img_s": round(statistics.mean(v), 2)} for label, v in img.items()}
    out["ratio"] = round(out["front_ends_4"]["mean_img_s"] / out["workers_1"]["mean_img_s"], 4)
    print(f"  {model} alternating: {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_process", description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--light-clients", type=int, default=4,
                        help="also compare batching at this many clients (0: not)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--handoff-rounds", type=int, default=10)
    parser.add_argument("--handoff-block", type=int, default=200)
    parser.add_argument("--alternate-rounds", type=int, default=6)
    parser.add_argument("--alternate-seconds", type=float, default=8.0)
    parser.add_argument("--skip", default="", help="comma-separated: handoff, front_end, servers, alternate")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    skip = set(filter(None, args.skip.split(",")))
    export_models(args.models_dir, models)
    logs = Path(tempfile.mkdtemp(prefix="bench-engine-process-"))
    images = make_jpegs()
    results: dict = {"machine": machine_facts(), "command": " ".join([Path(PY).name, "-m", "bench.engine_process",
                                                                     *(argv if argv is not None else sys.argv[1:])])}
    first = models[0]
    if "handoff" not in skip:
        print("handoff (null engine, 1 client, 224x224x3 uint8)", flush=True)
        results["handoff"] = measure_handoff(args.models_dir, first, args, logs)
        print(f"  {json.dumps(results['handoff'])}", flush=True)
    if "front_end" not in skip:
        print(f"front-end cost (null engine, 1 front-end, {args.clients} JPEG clients)", flush=True)
        point = run_point("front-end", args.models_dir, first, logs, args, images, "--workers", "1",
                          "--engine-process", "on", env={"ARCHSERVE_NULL_ENGINE": "true"})
        decode = decode_core_ms(images)
        point["decode_core_ms_this_process"] = round(decode, 3)
        point["front_end_minus_decode_core_ms"] = round(point["front_end_core_ms_per_img"] - decode, 3)
        results["front_end"] = point
        # The same work in one process (the batcher called directly): what the handoff adds to a front-end.
        inproc = run_point("in-process", args.models_dir, first, logs, args, images, "--workers", "1",
                           env={"ARCHSERVE_NULL_ENGINE": "true"})
        results["front_end_in_process"] = inproc
    if "servers" not in skip:
        results["servers"] = {}
        for model in models:
            print(f"{model}: 4 front-ends + engine, 4 independent workers, 1 worker; {args.clients} clients",
                  flush=True)
            by = results["servers"][model] = {}
            by["front_ends_4"] = run_point(f"{model}-split4", args.models_dir, model, logs, args, images,
                                           "--workers", "4")
            by["workers_4"] = run_point(f"{model}-off4", args.models_dir, model, logs, args, images,
                                        "--workers", "4", "--engine-process", "off")
            by["workers_1"] = run_point(f"{model}-w1", args.models_dir, model, logs, args, images, "--workers", "1")
        if args.light_clients:
            # At 16 clients on 2 cores each independent worker's batches fill behind its slow runs; at a
            # load where each worker sees about one client, batching across front-ends is what forms a batch.
            model, few = models[0], argparse.Namespace(**{**vars(args), "clients": args.light_clients})
            print(f"{model}: {few.clients} clients, 4 front-ends + engine against 4 independent workers", flush=True)
            by = results["servers"][f"{model}@{few.clients}"] = {}
            by["front_ends_4"] = run_point(f"{model}-split4-c{few.clients}", args.models_dir, model, logs, few,
                                           images, "--workers", "4")
            by["workers_4"] = run_point(f"{model}-off4-c{few.clients}", args.models_dir, model, logs, few, images,
                                        "--workers", "4", "--engine-process", "off")
    if "alternate" not in skip:
        results["alternate"] = {}
        for model in models:
            print(f"{model}: 4 front-ends + engine against 1 worker, alternating, {args.clients} clients", flush=True)
            results["alternate"][model] = alternate_throughput(args.models_dir, model, logs, args, images)
    out = args.out or ROOT / "docs" / "results" / f"engine-process-{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
