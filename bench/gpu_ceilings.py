"""The GPU machine's ceilings, what the server is compared with: CPU decoding, the engine, one session's patterns.

Each runs the server's own code (``decode_image``, ``OnnxEngine`` and its
session options) without the server around it.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from pathlib import Path

from .images import make_jpegs
from .report import log

CUDA = "CUDAExecutionProvider"


def wants_cuda(device: str) -> bool:
    import onnxruntime as ort

    return device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())


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
