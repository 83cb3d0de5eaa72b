"""What a batch size's first run costs on a session that has run one batch of 1 (``python -m bench.first_run``).

The server warms each model up before serving it. On CUDA every new shape costs a cuDNN search, so every batch
size is warmed; on the CPU only one batch of 1 is, on the finding this script measures: there, a new size's
first run costs no more than its next. For each of ``--rounds`` fresh sessions of the server's own
``OnnxEngine``: one batch of 1, then each size in ``--batch-sizes`` run three times in a row; the first run's ms
against the median of the next two.

    python -m bench.first_run --model resnet18 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from modelrepo.manifest import load_manifest
from service.models.engine import EngineConfig, OnnxEngine

from .engine_only import version_dir
from .report import machine_facts


def first_runs(path: Path, device: str, sizes: list[int], rounds: int) -> dict:
    manifest = load_manifest(path)
    _, height, width, channels = manifest.input.shape
    out: dict = {size: {"first_ms": [], "next_ms": []} for size in sizes}
    provider = None
    for _ in range(rounds):
        engine = OnnxEngine(path, manifest, EngineConfig(device=device))
        provider = engine.provider
        engine.run(np.zeros((1, height, width, channels), np.uint8))
        for size in sizes:
            batch = np.zeros((size, height, width, channels), np.uint8)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                engine.run(batch)
                times.append((time.perf_counter() - started) * 1000.0)
            out[size]["first_ms"].append(round(times[0], 2))
            out[size]["next_ms"].append(round(statistics.median(times[1:]), 2))
    for point in out.values():
        point["first_over_next"] = round(statistics.median(point["first_ms"]) / statistics.median(point["next_ms"]), 3)
    return {"provider": provider, "sizes": {str(k): v for k, v in out.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench/models"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="cpu")
    parser.add_argument("--batch-sizes", default="4,32,8,16,2", help="in this order, after a batch of 1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    result = {"machine": machine_facts(), "model": args.model,
              **first_runs(version_dir(args.models_dir, args.model), args.device, sizes, args.rounds)}
    for size, point in result["sizes"].items():
        print(f"batch {size:>3}: first {point['first_ms']} ms, next {point['next_ms']} ms, "
              f"first/next {point['first_over_next']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
