"""Engine-only benchmark: the server's own onnxruntime engine, no HTTP, no decoding, no batching queue.

Runs ``service.models.engine.OnnxEngine`` (the class the server uses, with its session
options and provider choice: the fp16 file on CUDA when onnxruntime has the
CUDA provider and it loads, the fp32 file on the CPU otherwise) on uint8 NHWC
input at the model's crop size, for each batch size: a warm-up, then timed runs
until ``--min-runs`` are done and ``--budget-s`` is spent (at most
``--max-runs``). Reports the median milliseconds per batch and the images per
second that gives. This is the ceiling the server's end-to-end throughput is
compared with.

The timing is split into ``--rounds`` rounds that each visit every batch size
(in reverse order every other round), and a batch size's median is over the
runs of all rounds. On a shared machine the speed drifts over seconds; timed in
one stretch per size, the sizes that happened to run in a fast stretch look
best, and the best of six such noisy figures overstates the engine (a max is
biased upwards). Spread over the rounds, every size sees the same drift.
``round_img_s`` keeps each round's figure, to show the spread.

    python -m bench.engine_only --models-dir bench/models --model resnet50 --batch-sizes 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo.layout import list_versions
from modelrepo.manifest import load_manifest
from service.models.engine import EngineConfig, OnnxEngine

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def version_dir(models_dir: Path, model: str, version: int | None = None) -> Path:
    versions = list_versions(models_dir / model)
    if not versions:
        raise SystemExit(f"error: no versions of {model!r} in {models_dir}/; export it first")
    if version is not None and version not in versions:
        raise SystemExit(f"error: {model} has no version {version}; versions: {versions}")
    return models_dir / model / str(version if version is not None else versions[-1])


def time_batch(engine: OnnxEngine, batch: np.ndarray, *, min_runs: int, max_runs: int, budget_s: float,
               warmup_runs: int) -> list[float]:
    """Seconds per run: ``warmup_runs`` untimed, then at least ``min_runs``, until ``budget_s`` or ``max_runs``."""
    for _ in range(warmup_runs):
        engine.run(batch)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        started = time.perf_counter()
        engine.run(batch)
        times.append(time.perf_counter() - started)
    return times


def measure(engine, batch_sizes: list[int], shape: tuple[int, int, int], *, min_runs: int, max_runs: int,
            budget_s: float, warmup_runs: int, rounds: int = 1, seed: int = 0) -> list[dict]:
    """One row per batch size: ``engine.run`` timed over ``rounds`` rounds that each visit every size
    (reversed every other round), ``min_runs``/``max_runs``/``budget_s`` split between the rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rng = np.random.default_rng(seed)
    batches = {size: rng.integers(0, 256, (size, *shape), dtype=np.uint8) for size in batch_sizes}
    times: dict[int, list[float]] = {size: [] for size in batch_sizes}
    per_round: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for index in range(rounds):
        for size in batch_sizes if index % 2 == 0 else batch_sizes[::-1]:
            # The first round warms each size up; later ones run one untimed batch after the change of size.
            timed = time_batch(engine, batches[size], min_runs=math.ceil(min_runs / rounds),
                               max_runs=max(1, math.ceil(max_runs / rounds)), budget_s=budget_s / rounds,
                               warmup_runs=warmup_runs if index == 0 else min(warmup_runs, 1))
            times[size].extend(timed)
            per_round[size].append(round(size / statistics.median(timed), 3))
    results = []
    for size in batch_sizes:
        median = statistics.median(times[size])
        results.append({
            "batch_size": size,
            "runs": len(times[size]),
            "ms_per_batch": round(1000 * median, 3),
            "ms_per_batch_min": round(1000 * min(times[size]), 3),
            "ms_per_image": round(1000 * median / size, 3),
            "img_s": round(size / median, 3),
            "round_img_s": per_round[size],
        })
    return results


def bench_engine(
    path: Path,
    batch_sizes: list[int],
    *,
    device: str = "auto",
    device_id: int = 0,
    intra_op_threads: int = 0,
    min_runs: int = 3,
    max_runs: int = 50,
    budget_s: float = 3.0,
    warmup_runs: int = 2,
    rounds: int = 1,
    seed: int = 0,
) -> dict:
    manifest = load_manifest(path)
    loaded = time.perf_counter()
    engine = OnnxEngine(path, manifest, EngineConfig(device=device, device_id=device_id, intra_op_threads=intra_op_threads))
    load_s = time.perf_counter() - loaded
    _, height, width, channels = manifest.input.shape
    results = measure(engine, batch_sizes, (height, width, channels), min_runs=min_runs, max_runs=max_runs,
                      budget_s=budget_s, warmup_runs=warmup_runs, rounds=rounds, seed=seed)
    best = max(results, key=lambda r: r["img_s"])
    return {
        "model": manifest.name,
        "version": manifest.version,
        "path": str(path),
        "input": [height, width, channels],
        "gflops": manifest.complexity.gflops,
        "provider": engine.provider,
        "precision": engine.precision,
        "intra_op_threads": intra_op_threads,
        "onnxruntime": ort.__version__,
        "session_load_s": round(load_s, 3),
        "rounds": rounds,
        "batches": results,
        "best": {"batch_size": best["batch_size"], "img_s": best["img_s"]},
    }


def at_batch(report: dict, size: float) -> dict:
    """The measured row whose batch size is nearest ``size`` (ties: the larger)."""
    return min(report["batches"], key=lambda r: (abs(r["batch_size"] - size), -r["batch_size"]))


def format_report(r: dict) -> str:
    lines = [f"{r['model']} v{r['version']} on {r['provider']} ({r['precision']}), input {r['input']}, "
             f"onnxruntime {r['onnxruntime']}, intra-op threads {r['intra_op_threads'] or 'default'}",
             "  batch   ms/batch   ms/img     img/s   runs   img/s per round"]
    for b in r["batches"]:
        rounds = " ".join(f"{x:.1f}" for x in b.get("round_img_s", []))
        lines.append(f"  {b['batch_size']:>5} {b['ms_per_batch']:>10.2f} {b['ms_per_image']:>8.2f} "
                     f"{b['img_s']:>9.2f} {b['runs']:>6}   {rounds}")
    lines.append(f"  best: {r['best']['img_s']:.2f} img/s at batch {r['best']['batch_size']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.engine_only", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path("bench/models"))
    p.add_argument("--model", default="resnet50")
    p.add_argument("--version", type=int)
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=os.environ.get("ARCHSERVE_DEVICE", "auto"))
    p.add_argument("--intra-op-threads", type=int, default=int(os.environ.get("ARCHSERVE_INTRA_OP_THREADS", "0")),
                   help="onnxruntime threads (default: ARCHSERVE_INTRA_OP_THREADS, else onnxruntime's default)")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument("--max-runs", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="timed seconds per batch size, over all rounds (after min-runs)")
    p.add_argument("--rounds", type=int, default=3,
                   help="visit every batch size this many times, alternating the order (default 3)")
    p.add_argument("--warmup-runs", type=int, default=2)
    p.add_argument("--json", help="write the report to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > 1024:
        print("error: --batch-sizes must be integers in 1..1024", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    report = bench_engine(
        version_dir(args.models_dir, args.model, args.version), sizes, device=args.device,
        intra_op_threads=args.intra_op_threads, min_runs=args.min_runs, max_runs=max(args.max_runs, args.min_runs),
        budget_s=args.budget_s, warmup_runs=args.warmup_runs, rounds=args.rounds,
    )
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
