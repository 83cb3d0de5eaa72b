"""The GPU run: archserve on the CUDA provider, against the engine and decode ceilings of the same machine.

One script for the GPU machine (it also runs on a CPU, with the CPU provider,
so it can be tested anywhere). Steps, each optional (``--steps``):

``facts``   the GPU (nvidia-smi), onnxruntime and its providers, cores.
``export``  the models (default resnet50, resnet34, se_resnet50, googlenet,
            inception_v3) into ``--models-dir`` if missing: fp16 for CUDA,
            fp32 for the CPU.
``decode``  the CPU decode ceiling: ``service.images.preprocess.decode_image`` (what
            the server runs) on the load generator's JPEGs, in one process and
            in one process per core, at 500x375 and at phone size (4032x3024),
            with ``--serve-model``'s resize and crop.
``engine``  ``bench.engine_only`` (the server's own ``OnnxEngine``) per model at
            batch 1, 8, 32, 128; on CUDA also ResNet-50 with the input
            already on the GPU (IO binding): the ceiling without the host copy.
``sessions`` the server's access patterns (one thread at a fixed batch
            size, two threads at once, shapes alternating between two padded
            sizes, the first run of each size in a new thread) on one session
            with the server's CUDA options, with single options changed, and
            on one session per size (the server's CUDA default): what makes a
            batch slow inside the server.
``serve``   ``python -m service`` on ResNet-50 (``--require-gpu`` on CUDA,
            batches up to 128), checks that the model reports the provider
            and precision expected (CUDA + fp16 on a GPU), then drives it with
            ``bench.loadgen``: 500x375 JPEGs at 1 client (latency) and many
            (throughput), phone-sized JPEGs, and preprocessed uint8 tensors
            over the v2 binary protocol. Once with one worker process and once
            with several (``--workers``), since one Python process cannot
            decode or parse thousands of requests a second; ``--compare-env``
            adds one-worker servers with other settings. GPU memory is read
            before each server starts and once all its workers are ready.

Results go to ``--out`` as ``gpu-results.json`` (every report; updated after
each step, so a run cut short keeps what it measured) and ``gpu-results.md``
(the summary table with the targets). Every step and every server is bounded
in time; ``--budget-s`` stops starting new load points once spent.

    python -m bench.gpu --out bench/results/gpu                      # everything
    python -m bench.gpu --steps engine,serve --models resnet50 --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .cpu_meter import CpuMeter
from .gpu_ceilings import (CUDA, decode_ceiling, engine_on_device_input, engine_runs, preprocessing_of,
                           session_patterns, wants_cuda)
from .gpu_report import SERVED_MODEL, markdown, summarise
from .http_client import Target, run_async
from .prom import scrape
from .report import log, machine_facts, write_json
from .servers import PY, ROOT, Server, export_models, free_port

STEPS = ("facts", "export", "decode", "engine", "sessions", "serve")
DEFAULT_MODELS = ("resnet50", "resnet34", "se_resnet50", "googlenet", "inception_v3")
BATCH_SIZES = (1, 8, 32, 128)


class Results:
    """The results file, rewritten after every step."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu-results.json"
        self.data: dict = {}
        if self.path.exists():  # steps may run in separate invocations on the same machine
            with contextlib.suppress(ValueError):
                self.data = json.loads(self.path.read_text())

    def put(self, key: str, value) -> None:
        self.data[key] = value
        write_json(self.path, self.data)


# ---------------------------------------------------------------------------- facts and export


def _query_gpus(fields: str, *extra: str, units: bool = True) -> list[dict[str, str]]:
    """``nvidia-smi --query-gpu=fields`` as one dict per GPU; [] without nvidia-smi or when it fails."""
    if not shutil.which("nvidia-smi"):
        return []
    csv = "csv,noheader" if units else "csv,noheader,nounits"
    try:
        text = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", f"--format={csv}", *extra],
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = fields.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in text.strip().splitlines() if line]


def gpu_facts() -> list[dict]:
    return _query_gpus("name,driver_version,memory.total,clocks.max.sm,power.limit")


def gpu_memory_used_mib(device_id: int = 0) -> int | None:
    """GPU memory in use on ``device_id`` (all processes), in MiB; None without nvidia-smi or that GPU."""
    rows = _query_gpus("memory.used", f"--id={device_id}", units=False)
    try:
        return int(rows[0]["memory.used"])
    except (IndexError, KeyError, ValueError):
        return None


def facts(device: str) -> dict:
    import onnxruntime as ort

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **machine_facts(),
        "onnxruntime_file": ort.__file__,
        "providers_available": ort.get_available_providers(),
        "gpus": gpu_facts(),
        "device": device,
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    return info


def export_step(models_dir: Path, names: list[str], precision: str, parity_samples: int) -> dict:
    started = time.monotonic()
    exported = export_models(models_dir, names, "--precision", precision, "--parity-samples", str(parity_samples))
    if not exported:
        return {"exported": [], "already_there": names}
    return {"exported": exported, "seconds": round(time.monotonic() - started, 1)}


# ---------------------------------------------------------------------------- serving


def loadgen_point(url: str, model: str, out: Path, label: str, *, concurrency: int, duration: float, warmup: float,
                  extra: list[str]) -> dict:
    path = out / f"loadgen-{label}.json"
    cmd = [PY, "-m", "bench.loadgen", "--url", url, "--model", model, "--concurrency", str(concurrency),
           "--duration", str(duration), "--warmup", str(warmup), "--json", str(path), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 120)
    if proc.returncode != 0 or not path.exists():
        return {"error": f"loadgen exited {proc.returncode}: {proc.stderr[-2000:]}"}
    report = json.loads(path.read_text())
    report["argv"] = cmd[2:]
    return report


def _summary(report: dict) -> str:
    if "error" in report:
        return f"error: {report['error'][:300]}"
    lat = report.get("latency_ms", {})
    server = report.get("server") or {}
    return (f"{report.get('throughput_img_s')} img/s, p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
            f"errors {report.get('errors')}, mean batch {server.get('mean_batch_size')}, "
            f"server p50 {(server.get('request_latency_ms') or {}).get('p50')} ms")


def loaded_workers(server: Server) -> int:
    """How many worker processes have loaded their models: the distinct ``pid`` labels of ``archserve_model_info``
    in one scrape (a worker sets its model info once loaded; multiprocess mode merges every live worker)."""
    samples = None
    with contextlib.suppress(Exception):  # a scrape that fails counts as none loaded; the caller retries
        samples = run_async(scrape(Target("127.0.0.1", server.port)))
    return len({dict(labels).get("pid") for name, labels in samples or {} if name == "archserve_model_info"})


def wait_for_workers(server: Server, workers: int, timeout: float = 120.0) -> int:
    """Wait until every worker has loaded (or ``timeout``); return how many had."""
    deadline, loaded = time.monotonic() + timeout, 0
    while (loaded := loaded_workers(server)) < workers and time.monotonic() < deadline:
        time.sleep(0.25)
    if loaded < workers:
        log(f"only {loaded} of {workers} workers loaded within {timeout:g}s")
    return loaded


def model_info(server: Server, model: str) -> dict:
    """``GET /models/{model}`` once the server is ready. A worker of a multi-worker server loads before it takes
    connections (``service.app``), so whichever worker answers has its sessions loaded and warmed up."""
    return server.get_json(f"/models/{model}") or {}


def serve_runs(models_dir: Path, out: Path, args, cuda: bool, deadline: float) -> dict:
    """ResNet-50 behind ``python -m service`` in each server configuration, with its load points."""
    configs = [
        {"label": "w1", "workers": 1, "env": {}},
        {"label": f"w{args.workers}", "workers": args.workers,
         "env": {"ARCHSERVE_DECODE_THREADS": str(args.decode_threads_per_worker),
                 "ARCHSERVE_ENGINE_PROCESS": args.engine_process}},
    ]
    if args.workers <= 1:
        configs = configs[:1]
    for spec in args.compare_env:  # more one-worker servers, each with its own settings
        configs.append({"label": spec["label"], "workers": 1, "env": spec["env"]})
    d, w = args.duration, args.warmup
    jpeg = ["--protocol", "classify"]
    points_by_config = {
        "w1": [
            ("jpeg-c1", 1, jpeg),
            (f"jpeg-c{args.clients}", args.clients, jpeg),
            (f"v2-b{args.v2_batch}-c{args.v2_clients}", args.v2_clients,
             ["--protocol", "v2", "--batch", str(args.v2_batch)]),
        ],
        "multi": [
            (f"jpeg-c{args.clients_multi}", args.clients_multi, jpeg),
            (f"phone-c{args.phone_clients}", args.phone_clients, [*jpeg, "--size", "4032x3024"]),
            (f"v2-b{args.v2_batch}-c{args.v2_clients_multi}", args.v2_clients_multi,
             ["--protocol", "v2", "--batch", str(args.v2_batch)]),
        ],
    }
    results = {}
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for config in configs:
        if time.monotonic() > deadline:
            results[config["label"]] = {"skipped": "the time budget was spent"}
            continue
        port = free_port()
        idle_mib = gpu_memory_used_mib(args.device_id)
        argv = [PY, "-m", "service", "--port", str(port), "--models-dir", str(models_dir), "--models", args.serve_model,
                "--max-batch-size", str(args.max_batch_size), "--workers", str(config["workers"]),
                "--log-level", "warning", "--device", args.device]
        if cuda:
            argv.append("--require-gpu")
        env = {"ARCHSERVE_ACCESS_LOG": "false", "ARCHSERVE_POLL_INTERVAL_S": "0", "ARCHSERVE_MAX_QUEUE_SIZE": "4096",
               "ARCHSERVE_DEVICE_ID": str(args.device_id), **config["env"]}
        result: dict = {"argv": argv[1:], "env": env, "gpu_memory_before_mib": idle_mib}
        results[config["label"]] = result
        log(f"starting archserve {config['label']}: {' '.join(argv[1:])}")
        try:
            with Server(f"archserve {config['label']}", argv, port, logs / f"archserve-{config['label']}.log",
                        env) as server:
                result["ready_s"] = round(server.wait_ready(timeout=args.ready_timeout), 1)
                info = model_info(server, args.serve_model)
                if config["workers"] > 1:
                    # With an engine process it alone holds the models (and reports them); else every worker.
                    holders = 1 if config["env"].get("ARCHSERVE_ENGINE_PROCESS") != "off" else config["workers"]
                    result["workers_loaded"] = wait_for_workers(server, holders, args.ready_timeout)
                # What the loaded, warmed-up sessions of every worker hold (the server is alone on the GPU).
                result["gpu_memory_used_mib"] = gpu_memory_used_mib(args.device_id)
                version = (info.get("versions") or [{}])[-1]
                result["provider"], result["precision"] = version.get("provider"), version.get("precision")
                result["batching"] = version.get("batching")
                log(f"ready in {result['ready_s']}s: {result['provider']} {result['precision']} "
                    f"{result['batching']}")
                expected = (CUDA, "fp16") if cuda else ("CPUExecutionProvider", "fp32")
                result["provider_check"] = "ok" if (result["provider"], result["precision"]) == expected else (
                    f"expected {expected}, got {(result['provider'], result['precision'])}")
                if result["provider_check"] != "ok":
                    log(f"provider check FAILED: {result['provider_check']}")
                    continue
                points = points_by_config["w1" if config["workers"] == 1 else "multi"]
                for label, clients, extra in points:
                    if time.monotonic() > deadline:
                        result[label] = {"skipped": "the time budget was spent"}
                        continue
                    meter = CpuMeter(server.proc.pid)  # the server with its worker processes, apart from the rest
                    report = loadgen_point(server.url, args.serve_model, out, f"{config['label']}-{label}",
                                           concurrency=clients, duration=d, warmup=w, extra=extra)
                    report["machine_cpu"] = meter.stop()
                    result[label] = report
                    log(f"{config['label']} {label}: {_summary(report)}")
        except Exception as exc:
            result["error"] = str(exc)[-3000:]
            log(f"archserve {config['label']} failed: {result['error']}")
    return results


# ---------------------------------------------------------------------------- main


def env_spec(text: str) -> dict:
    """``LABEL:KEY=VALUE,KEY=VALUE`` -> {"label": LABEL, "env": {KEY: VALUE}} (an argparse type)."""
    label, sep, pairs = text.partition(":")
    env = {}
    for pair in filter(None, pairs.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{pair!r} is not KEY=VALUE")
        env[key.strip()] = value.strip()
    if not sep or not label.strip() or not env:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE]")
    label = label.strip()
    if not re.fullmatch(r"[\w.-]+", label) or re.fullmatch(r"w\d+", label):
        raise argparse.ArgumentTypeError(
            f"label {label!r}: use letters, digits, '.', '_' or '-', and not w<N> (the servers bench.gpu always runs)")
    return {"label": label, "env": env}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu"), help="results folder")
    p.add_argument("--models-dir", type=Path, default=Path("bench/models-gpu"))
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="models for export and engine")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--engine-budget-s", type=float, default=1.5, help="timed seconds per engine batch size")
    p.add_argument("--decode-s", type=float, default=4.0, help="seconds per decode-ceiling measurement")
    p.add_argument("--parity-samples", type=int, default=20)
    p.add_argument("--sessions-batch", type=int, default=32, help="batch size of the sessions step")
    p.add_argument("--serve-model", default=SERVED_MODEL, help="the model behind the server")
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=8, help="worker processes of the second server (1: skip it)")
    p.add_argument("--engine-process", choices=["auto", "off"], default="auto",
                   help="the second server's: one engine process for its workers (auto), or models in each (off)")
    p.add_argument("--decode-threads-per-worker", type=int, default=2)
    p.add_argument("--clients", type=int, default=64, help="JPEG clients against one worker")
    p.add_argument("--clients-multi", type=int, default=256, help="JPEG clients against several workers")
    p.add_argument("--phone-clients", type=int, default=32)
    p.add_argument("--v2-batch", type=int, default=32, help="images per v2 request")
    p.add_argument("--v2-clients", type=int, default=8)
    p.add_argument("--v2-clients-multi", type=int, default=32)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per load point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--ready-timeout", type=float, default=240.0)
    p.add_argument("--compare-env", type=env_spec, action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="also run the one-worker load points against a server with these environment variables "
                        "(repeatable), e.g. one-session:ARCHSERVE_SESSION_PER_BATCH_SIZE=never")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new load point starts after this")
    p.add_argument("--quick", action="store_true", help="tiny everything: a check that the script works")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = [spec["label"] for spec in args.compare_env]
    if len(set(labels)) != len(labels):
        parser.error(f"--compare-env labels must differ; got {', '.join(labels)}")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise SystemExit(f"error: unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    if args.quick:
        args.duration, args.warmup, args.engine_budget_s, args.decode_s = 1.0, 0.3, 0.3, 1.0
        args.clients, args.clients_multi, args.phone_clients, args.v2_clients, args.v2_clients_multi = 4, 4, 2, 2, 2
        args.v2_batch, args.workers, args.sessions_batch = 4, min(args.workers, 2), 2
        # A server warms every batch size up to its largest on each lane: 128 would take most of the run.
        args.max_batch_size = min(args.max_batch_size, 8)
    deadline = time.monotonic() + args.budget_s
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    models_dir = args.models_dir.resolve()
    out = args.out.resolve()
    results = Results(out)
    cuda = wants_cuda(args.device)
    log(f"bench.gpu: steps {steps}, device {args.device} (CUDA: {cuda}), models {models}, out {out}")

    if "facts" in steps:
        results.put("facts", facts(args.device))
        log(json.dumps(results.data["facts"]))
    if "export" in steps:
        precision = "fp16" if cuda else "fp32"
        needed = sorted(set(models) | {args.serve_model})
        results.put("export", export_step(models_dir, needed, precision, args.parity_samples))
    if "decode" in steps:
        sizes = [(500, 375), (4032, 3024)]
        results.put("decode", decode_ceiling(sizes, args.decode_s, os.cpu_count() or 1,
                                             preprocessing_of(models_dir, args.serve_model)))
    if "engine" in steps:
        results.put("engine", engine_runs(models_dir, models, batch_sizes, args.device, args.device_id,
                                          args.engine_budget_s))
        if cuda and SERVED_MODEL in models:
            try:
                report = engine_on_device_input(models_dir, SERVED_MODEL, max(batch_sizes), args.device_id,
                                                args.engine_budget_s)
            except Exception as exc:
                report = {"error": str(exc)}
            log(f"engine {SERVED_MODEL} with input on the GPU: {report}")
            results.put("engine_device_input", report)
    if "sessions" in steps:
        try:
            report = session_patterns(models_dir, args.serve_model, args.sessions_batch, args.device, args.device_id,
                                      args.engine_budget_s)
        except (Exception, SystemExit) as exc:
            report = {"error": str(exc)}
        results.put("sessions", report)
    if "serve" in steps:
        results.put("serve", serve_runs(models_dir, out, args, cuda, deadline))
    results.put("summary", summarise(results.data, args))
    (out / "gpu-results.md").write_text(markdown(results.data))
    print(markdown(results.data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
