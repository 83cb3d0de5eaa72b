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
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .http_client import Target, run_async
from .images import make_jpegs
from .prom import scrape
from .run import PY, ROOT, CpuMeter, Server, _get, free_port, git_state

STEPS = ("facts", "export", "decode", "engine", "sessions", "serve")
DEFAULT_MODELS = ("resnet50", "resnet34", "se_resnet50", "googlenet", "inception_v3")
SERVED_MODEL = "resnet50"
BATCH_SIZES = (1, 8, 32, 128)
CUDA = "CUDAExecutionProvider"

# Targets of the GPU issue, for one H200; engine references from the team's own
# measurement on that machine type (random-init torchvision models, fp16, uint8 NHWC).
TARGET_ENGINE_RN50_B128 = 9000.0
TARGET_V2_E2E = 7000.0
TARGET_JPEG_OF_DECODE = 0.90
TARGET_P50_1_CLIENT_MS = 5.0
REFERENCE_ENGINE_B128 = {"resnet50": 9600.0, "se_resnet50": 4900.0, "inception_v3": 6000.0, "googlenet": 16400.0,
                         "resnet34": 17700.0}
WITHIN_OF_REFERENCE = 0.80


# ---------------------------------------------------------------------------- results


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
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- facts


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
        "host": platform.node(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "providers_available": ort.get_available_providers(),
        "gpus": gpu_facts(),
        "device": device,
        **{"git_" + k: v for k, v in git_state().items()},
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    return info


def wants_cuda(device: str) -> bool:
    import onnxruntime as ort

    return device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())


# ---------------------------------------------------------------------------- export


def export_models(models_dir: Path, names: list[str], precision: str, parity_samples: int) -> dict:
    from modelrepo.layout import list_versions

    missing = [n for n in names if not list_versions(models_dir / n)]
    if not missing:
        return {"exported": [], "already_there": names}
    log(f"exporting {', '.join(missing)} ({precision}) into {models_dir}")
    started = time.monotonic()
    proc = subprocess.run(
        [PY, "-m", "export", "--models", ",".join(missing), "--out", str(models_dir), "--precision", precision,
         "--parity-samples", str(parity_samples)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export failed with exit code {proc.returncode}")
    return {"exported": missing, "seconds": round(time.monotonic() - started, 1)}


# ---------------------------------------------------------------------------- decode ceiling


def _decode_worker(args: tuple) -> int:
    images, seconds, resize, crop, interpolation = args
    from service.images.preprocess import PreprocessSpec, decode_image

    spec = PreprocessSpec(resize=resize, crop=crop, interpolation=interpolation, max_pixels=200_000_000)
    decode_image(images[0], spec)  # warm
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        decode_image(images[count % len(images)], spec)
        count += 1
    return count


def preprocessing_of(models_dir: Path, name: str) -> tuple[int, int, str]:
    """The served model's resize, crop and filter (ResNet's 256, 224, bilinear if it is not exported yet)."""
    from modelrepo.manifest import load_manifest

    from .engine_only import version_dir

    try:
        p = load_manifest(version_dir(models_dir, name)).preprocessing
    except (Exception, SystemExit):
        return 256, 224, "bilinear"
    return p.resize, p.crop, p.interpolation


def decode_ceiling(sizes: list[tuple[int, int]], seconds: float, processes: int,
                   spec: tuple[int, int, str] = (256, 224, "bilinear")) -> dict:
    """img/s of the server's own decode+resize+crop (``spec``: resize, crop, filter), in 1 process and in
    ``processes`` processes."""
    out = {}
    ctx = multiprocessing.get_context("fork")
    for width, height in sizes:
        images = make_jpegs(4, width, height)
        row = {"size": f"{width}x{height}", "jpeg_bytes": sum(map(len, images)) // len(images)}
        for label, n in (("one_process", 1), ("all_cores", processes)):
            with ctx.Pool(n) as pool:
                started = time.perf_counter()
                counts = pool.map(_decode_worker, [(images, seconds, *spec)] * n)
                wall = time.perf_counter() - started
            row[label] = {"processes": n, "img_s": round(sum(counts) / seconds, 1), "wall_s": round(wall, 2)}
        log(f"decode {row['size']}: {row['one_process']['img_s']} img/s in 1 process, "
            f"{row['all_cores']['img_s']} img/s in {processes}")
        out[row["size"]] = row
    return out


# ---------------------------------------------------------------------------- engine


def engine_runs(models_dir: Path, names: list[str], batch_sizes: list[int], device: str, device_id: int,
                budget_s: float) -> dict:
    from .engine_only import bench_engine, format_report, version_dir

    out = {}
    for name in names:
        try:
            # One stretch per batch size (no rounds): device time is scarce, and the GPU targets are judged on
            # one batch size each, not on a best-of-several.
            report = bench_engine(version_dir(models_dir, name), batch_sizes, device=device, device_id=device_id,
                                  budget_s=budget_s, max_runs=200, min_runs=5)
        except (Exception, SystemExit) as exc:  # one model's failure must not lose the others
            log(f"engine {name} failed: {exc}")
            out[name] = {"error": str(exc)}
            continue
        print(format_report(report), flush=True)
        out[name] = report
    return out


def engine_on_device_input(models_dir: Path, name: str, batch: int, device_id: int, budget_s: float) -> dict:
    """ResNet-50 with input and output bound on the GPU: the engine without host copies (CUDA only)."""
    import numpy as np
    import onnxruntime as ort

    from modelrepo.manifest import load_manifest
    from service.models.engine import EngineConfig, OnnxEngine

    from .engine_only import time_batch, version_dir

    path = version_dir(models_dir, name)
    manifest = load_manifest(path)
    engine = OnnxEngine(path, manifest, EngineConfig(device="cuda", device_id=device_id))
    if engine.provider != CUDA:
        return {"error": f"the session runs on {engine.provider}, not CUDA"}
    _, h, w, c = manifest.input.shape
    host = np.random.default_rng(0).integers(0, 256, (batch, h, w, c), dtype=np.uint8)
    on_device = ort.OrtValue.ortvalue_from_numpy(host, "cuda", device_id)
    binding = engine.session.io_binding()
    binding.bind_ortvalue_input(manifest.input.name, on_device)
    binding.bind_output(manifest.output.name, "cuda", device_id)
    class Bound:  # bench.engine_only's timing loop, running the bound input instead of a host batch
        @staticmethod
        def run(_batch) -> None:
            engine.session.run_with_iobinding(binding)

    times = time_batch(Bound, host, min_runs=5, max_runs=500, budget_s=budget_s, warmup_runs=3)
    median = statistics.median(times)
    return {"model": name, "batch_size": batch, "precision": engine.precision, "runs": len(times),
            "ms_per_batch": round(1000 * median, 3), "img_s": round(batch / median, 1)}


def session_patterns(models_dir: Path, name: str, batch: int, device: str, device_id: int, seconds: float) -> dict:
    """img/s of one session: 1 thread, 2 threads on the same session, alternating batch sizes; per option set."""
    import threading

    import numpy as np

    from modelrepo.manifest import load_manifest
    from service.models.engine import EngineConfig, OnnxEngine

    from .engine_only import version_dir

    path = version_dir(models_dir, name)
    manifest = load_manifest(path)
    cuda = wants_cuda(device)
    precision = "fp16" if cuda and "fp16" in manifest.files else ("fp32" if "fp32" in manifest.files else "fp16")
    variants = {"server options": {}}
    if cuda:
        variants.update({
            "cuDNN heuristic search": {"cudnn_conv_algo_search": "HEURISTIC"},
            "cuDNN default algorithm": {"cudnn_conv_algo_search": "DEFAULT"},
            "prefer_nhwc off": {"prefer_nhwc": "0"},
        })
    _, h, w, c = manifest.input.shape
    sizes_run = (batch, 2 * batch)
    inputs = {b: np.zeros((b, h, w, c), np.uint8) for b in sizes_run}
    feed = manifest.input.name
    out: dict = {"model": name, "batch": batch, "precision": precision, "variants": {}}

    def open_session(extra: dict):  # as the server opens it, with single CUDA options changed
        return OnnxEngine.open_session(path / manifest.files[precision].path, cuda, EngineConfig(device_id=device_id),
                                       cuda_extra=extra)

    # (label, options, one session per batch size?)
    runs = [(label, extra, False) for label, extra in variants.items()]
    runs.append(("server options, one session per batch size (the server's CUDA default)", {}, True))
    for label, extra, per_size in runs:
        try:
            shared = open_session(extra)
            sessions = {size: (open_session(extra) if per_size and size != batch else shared) for size in sizes_run}
        except Exception as exc:
            out["variants"][label] = {"error": str(exc)[:500]}
            continue
        for size, x in inputs.items():
            for _ in range(2):
                sessions[size].run(None, {feed: x})

        def loop(sizes: list[int], counter: list[int], until: float) -> None:
            i = 0
            while time.perf_counter() < until:
                size = sizes[i % len(sizes)]
                sessions[size].run(None, {feed: inputs[size]})
                counter[0] += size
                i += 1

        row = {"provider": shared.get_providers()[0], "options": extra, "session_per_size": per_size}
        for pattern, threads, sizes in (("1 thread", 1, [batch]), ("2 threads", 2, [batch]),
                                        ("alternating sizes", 1, list(sizes_run))):
            counters = [[0] for _ in range(threads)]
            started = time.perf_counter()
            until = started + seconds
            workers = [threading.Thread(target=loop, args=(sizes, counter, until)) for counter in counters]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            row[pattern] = round(sum(c[0] for c in counters) / (time.perf_counter() - started), 1)
        first: dict[str, float] = {}

        def fresh_thread() -> None:  # a thread that never ran these sessions: its first run at each size
            for size, x in inputs.items():
                started = time.perf_counter()
                sessions[size].run(None, {feed: x})
                first[f"b{size}"] = round(1000 * (time.perf_counter() - started), 2)

        t = threading.Thread(target=fresh_thread)
        t.start()
        t.join()
        row["first run in a new thread, ms"] = first
        log(f"session {name} b{batch} [{label}]: {row}")
        out["variants"][label] = row
    return out


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
         "env": {"ARCHSERVE_DECODE_THREADS": str(args.decode_threads_per_worker)}},
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
                    result["workers_loaded"] = wait_for_workers(server, config["workers"], args.ready_timeout)
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


# ---------------------------------------------------------------------------- summary


def _batch_row(engine: dict, size: int) -> dict | None:
    return next((b for b in engine.get("batches", []) if b["batch_size"] == size), None)


def summarise(data: dict, args) -> dict:
    engine = data.get("engine", {})
    serve = data.get("serve", {})
    decode = data.get("decode", {})
    multi = f"w{args.workers}"
    rows = []

    def row(name, measured, target, unit, note="", lower_is_better=False):
        met = None if measured is None or target is None else (
            measured <= target if lower_is_better else measured >= target)
        rows.append({"target": name, "measured": measured, "goal": target, "unit": unit, "met": met, "note": note,
                     "lower_is_better": lower_is_better})

    rn50 = _batch_row(engine.get(SERVED_MODEL, {}), 128)
    row("engine ResNet-50 fp16, batch 128, input from host", rn50 and rn50["img_s"], TARGET_ENGINE_RN50_B128, "img/s")
    row(f"engine ResNet-50, batch {_get(data, 'engine_device_input', 'batch_size') or 128}, input already on the GPU",
        _get(data, "engine_device_input", "img_s"), None, "img/s", "reference 11.8k at batch 128")
    v2 = [_get(serve, c, p, "throughput_img_s") for c in serve for p in (serve.get(c) or {})
          if isinstance(serve.get(c), dict) and p.startswith("v2-")]
    v2 = [v for v in v2 if v is not None]
    row("e2e ResNet-50, uint8 tensors over v2 binary (best config)", max(v2) if v2 else None, TARGET_V2_E2E, "img/s")
    ceiling = _get(decode, "500x375", "all_cores", "img_s")
    jpeg = [_get(serve, c, p, "throughput_img_s") for c in serve for p in (serve.get(c) or {})
            if isinstance(serve.get(c), dict) and p.startswith("jpeg-") and p != "jpeg-c1"]
    jpeg = [v for v in jpeg if v is not None]
    best_jpeg = max(jpeg) if jpeg else None
    row("e2e ResNet-50, 500x375 JPEG clients, CPU decode (best config)", best_jpeg,
        None if ceiling is None else round(TARGET_JPEG_OF_DECODE * ceiling, 1), "img/s",
        f"90% of the decode ceiling measured here ({ceiling} img/s)" if ceiling else "no decode ceiling measured")
    p50_server = _get(serve, "w1", "jpeg-c1", "server", "request_latency_ms", "p50")
    p50_client = _get(serve, "w1", "jpeg-c1", "latency_ms", "p50")
    row("p50 at 1 client, 500x375 JPEG, ResNet-50 (server side; client side in note)", p50_server,
        TARGET_P50_1_CLIENT_MS, "ms", f"client p50 {p50_client} ms over loopback", lower_is_better=True)
    phone = _get(serve, multi, f"phone-c{args.phone_clients}", "throughput_img_s")
    row("e2e phone photos 4032x3024, CPU decode with draft scaling", phone, None, "img/s",
        f"decode ceiling here {_get(decode, '4032x3024', 'all_cores', 'img_s')} img/s")
    row("e2e with GPU decoding (nvImageCodec)", None, 8000.0, "img/s", "not built: see docs/benchmarks.md")
    for name, reference in REFERENCE_ENGINE_B128.items():
        if name == SERVED_MODEL:
            continue
        b128 = _batch_row(engine.get(name, {}), 128)
        row(f"engine {name}, batch 128 (reference {reference:.0f})", b128 and b128["img_s"],
            round(WITHIN_OF_REFERENCE * reference, 1), "img/s", "within 20% of the reference")
    return {"rows": rows}


def markdown(data: dict) -> str:
    f = data.get("facts", {})
    gpus = ", ".join(g.get("name", "?") for g in f.get("gpus", [])) or "no GPU"
    lines = [f"# archserve GPU run, {f.get('date', '?')}", "",
             f"{gpus}; {f.get('cores')} cores; onnxruntime {f.get('onnxruntime')} "
             f"({', '.join(f.get('providers_available', []))}); git {str(f.get('git_commit', ''))[:10]}", "",
             "| target | measured | goal | met |", "|---|---|---|---|"]
    for r in data.get("summary", {}).get("rows", []):
        measured = "—" if r["measured"] is None else f"{r['measured']:,} {r['unit']}"
        goal = "—" if r["goal"] is None else f"{'≤' if r.get('lower_is_better') else '≥'} {r['goal']:,} {r['unit']}"
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['target']}{note} | {measured} | {goal} | {met} |")
    sizes = sorted({b["batch_size"] for e in data.get("engine", {}).values() for b in e.get("batches", [])})
    lines += ["", "Engine, img/s by batch size (batch 1: ms per batch):", "", "| model | provider | precision | "
              + " | ".join(f"b{b}" for b in sizes) + " |", "|---|---|---|" + "---|" * len(sizes)]
    for name, e in data.get("engine", {}).items():
        if "batches" not in e:
            lines.append(f"| {name} | error: {e.get('error', '?')[:80]} |")
            continue
        cells = []
        for b in sizes:
            r = _batch_row(e, b)
            cells.append("—" if r is None else (f"{r['ms_per_batch']:.2f} ms" if b == 1 else f"{r['img_s']:,.0f}"))
        lines.append(f"| {name} | {e['provider']} | {e['precision']} | " + " | ".join(cells) + " |")
    sessions = data.get("sessions") or {}
    if sessions.get("variants"):
        lines += ["", f"Sessions of {sessions['model']} ({sessions['precision']}), batch {sessions['batch']}, img/s:", "",
                  "| options | 1 thread | 2 threads on the session | alternating batch sizes | "
                  "first run per size in a new thread |", "|---|---|---|---|---|"]
        for label, row in sessions["variants"].items():
            if "error" in row:
                lines.append(f"| {label} | error: {row['error'][:80]} | | |")
            else:
                first = ", ".join(f"{k} {v} ms" for k, v in row["first run in a new thread, ms"].items())
                lines.append(f"| {label} | {row['1 thread']:,} | {row['2 threads']:,} | {row['alternating sizes']:,} | "
                             f"{first} |")
    lines += ["", "Serving, per load point:", "", "| server | point | img/s | p50 ms | p99 ms | "
              "server p50 ms | mean batch | errors |", "|---|---|---|---|---|---|---|---|"]
    for config, result in data.get("serve", {}).items():
        if not isinstance(result, dict):
            continue
        for point, r in result.items():
            if not isinstance(r, dict) or not (point.startswith(("jpeg", "v2", "phone"))):
                continue
            if "throughput_img_s" not in r:
                lines.append(f"| {config} | {point} | {r.get('error') or r.get('skipped')} | | | | | |")
                continue
            lat, server = r.get("latency_ms", {}), r.get("server") or {}
            lines.append(f"| {config} | {point} | {r['throughput_img_s']:,} | {lat.get('p50')} | {lat.get('p99')} | "
                         f"{(server.get('request_latency_ms') or {}).get('p50')} | {server.get('mean_batch_size')} | "
                         f"{r.get('errors') or 0} |")
    servers = {k: v for k, v in data.get("serve", {}).items() if isinstance(v, dict) and "ready_s" in v}
    if servers:
        lines += ["", "Servers:", "", "| server | provider | sessions per model | ready s | GPU memory MiB: before, ready |",
                  "|---|---|---|---|---|"]
        for config, result in servers.items():
            lines.append(f"| {config} | {result.get('provider')} {result.get('precision')} | "
                         f"{(result.get('batching') or {}).get('sessions')} | {result['ready_s']} | "
                         f"{result.get('gpu_memory_before_mib')}, {result.get('gpu_memory_used_mib')} |")
    return "\n".join(lines) + "\n"


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
        args.duration, args.warmup, args.engine_budget_s, args.decode_s = 2.0, 0.5, 0.3, 1.0
        args.clients, args.clients_multi, args.phone_clients, args.v2_clients, args.v2_clients_multi = 4, 4, 2, 2, 2
        args.v2_batch, args.workers, args.sessions_batch = 4, min(args.workers, 2), 2
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
        results.put("export", export_models(models_dir, needed, precision, args.parity_samples))
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
