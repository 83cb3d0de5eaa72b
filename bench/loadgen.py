"""An asyncio HTTP/1.1 load generator for archserve: JPEGs to ``POST /classify/{model}``, or pixels to the v2 endpoint.

It shares the machine's cores with the server it measures, so it is kept light:
a minimal raw HTTP/1.1 client (``bench.http_client``), request bytes built once
per distinct payload (``bench.workloads``), the loops in ``bench.load``, the
server's ``/metrics`` deltas in ``bench.prom``, the JPEGs from ``bench.images``.
This module is the command line.

Two protocols (``--protocol``):

* ``classify`` (default): photo-like JPEGs (``--size``, default 500x375,
  quality 90) made deterministically at start, a handful of distinct ones
  cycled, each as the raw body of ``POST /classify/{model}``; with
  ``--batch B`` > 1, B of them per request as multipart/form-data (field
  ``image``);
* ``v2``: the Open Inference Protocol (KServe v2) with Triton's binary tensor
  data and classification extensions: ``POST /v2/models/{model}/infer`` with a
  UINT8 ``[B, H, W, 3]`` tensor (preprocessed pixels at the model's crop size,
  read once from ``GET /v2/models/{model}``; a few distinct random arrays,
  seeded) after the JSON header, top-5 answered as JSON strings. No decoding
  on the server: what the batcher and the engine alone cost over HTTP.

Throughput counts images (successful requests x images per request);
latencies are per request.

Two modes:

* closed loop (``--concurrency N``): N clients, one keep-alive connection each,
  each sending its next request as soon as the previous one is answered;
* open loop (``--rate R``): requests scheduled at R per second (Poisson or
  uniform arrivals), sent over a pool of at most ``--max-connections``
  connections. A request that cannot be sent on time (no free connection, or
  the generator itself fell behind) is still sent, as soon as it can be, and
  counted as *late*; its latency is measured from the time it was due, so a
  slow server cannot hide queueing behind the generator (no coordinated
  omission).

Both run a warm-up (not recorded), then a measured window of ``--duration``
seconds: throughput and latencies are over the responses that completed in the
window. ``/metrics`` is scraped at the start and the end of the window; the
deltas give server-side figures (mean batch size, server latency quantiles
from the histogram, stage times). A server without ``/metrics`` (the naive
baseline) simply has none.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model resnet50 --concurrency 16 --duration 20
    python -m bench.loadgen --url http://127.0.0.1:8000 --model resnet50 --rate 10 --duration 20 --json out.json
    python -m bench.loadgen --model resnet50 --size 4032x3024 --concurrency 4
    python -m bench.loadgen --model resnet50 --protocol v2 --batch 8 --concurrency 4

Every loop is bounded in time (warm-up + duration, plus a drain of at most the
request timeout) and in count (``--max-requests``). Only loopback targets are
accepted unless ``--allow-remote`` is given.
"""


from __future__ import annotations

import argparse
import json
import sys

from .http_client import run_async
from .images import make_jpegs, parse_size
from .load import closed_loop, open_loop
from .workloads import PROTOCOLS


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    shape = f"{r['concurrency']} clients" if r["mode"] == "closed" else f"{r['rate']:g} req/s {r['arrivals']}"
    per_request = r.get("images_per_request", 1)
    what = "JPEG" if r.get("protocol", "classify") == "classify" else "UINT8 pixels"
    if r.get("protocol") == "classify" and per_request > 1:
        what += ", multipart"
    lines = [
        f"{r['model']} @ {r['url']} ({r['mode']} loop, {shape}, {r['duration_s']:g}s after {r['warmup_s']:g}s warm-up)",
        f"  protocol {r.get('protocol', 'classify')}: {per_request} image(s) per request, {r.get('size', '?')} "
        f"{what}",
        f"  requests {r['requests']}  ok {r['ok']} ({r.get('images_ok', r['ok'])} images)  "
        f"errors {r['errors'] or 'none'}",
        f"  throughput {r['throughput_img_s']:.2f} img/s ({r.get('throughput_req_s', r['throughput_img_s']):.2f} "
        f"req/s)   loadgen CPU {r['loadgen_cpu_cores']:.2f} cores",
        "  latency ms (client): p50 {p50} p90 {p90} p99 {p99} mean {mean}".format(**lat),
    ]
    if r["mode"] == "open":
        lines.append(f"  late: {r['late']['late']} of {r['late']['scheduled']} sent > {r['late']['threshold_ms']:g} ms "
                     f"after due (max {r['late']['max_lateness_ms']:.1f} ms)")
    s = r.get("server")
    if s:
        sl = s["request_latency_ms"]
        lines.append(f"  server: mean batch {s['mean_batch_size']} over {s['batches']} batches "
                     f"({s.get('alone_batches', 0)} alone) {s['batch_size_histogram']}")
        lines.append(f"  server latency ms (histogram): p50 {sl['p50']} p90 {sl['p90']} p99 {sl['p99']} "
                     f"mean {sl['mean']}")
        lines.append(f"  server stages ms: preprocess/img {s['preprocess_ms_per_image']}  queue wait/img "
                     f"{s['queue_wait_ms_per_image']}  inference/batch {s['inference_ms_per_batch']}")
    else:
        lines.append("  server: no /metrics")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="resnet50")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: concurrent clients (default 16)")
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson", help="open loop arrivals")
    p.add_argument("--max-connections", type=int, default=64, help="open loop: connection pool size")
    p.add_argument("--late-ms", type=float, default=5.0, help="open loop: sent later than this after due = late")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds first (default 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    p.add_argument("--max-requests", type=int, default=200_000, help="upper bound on requests sent")
    p.add_argument("--protocol", choices=PROTOCOLS, default="classify",
                   help="classify: JPEGs to POST /classify/{model} (default); v2: preprocessed UINT8 [B,H,W,3] "
                        "pixels at the model's crop size to POST /v2/models/{model}/infer (binary tensor data)")
    p.add_argument("--batch", type=int, default=1,
                   help="images per request (default 1): v2's batch dimension; classify sends B > 1 JPEGs as "
                        "multipart/form-data")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help="size of the generated JPEGs (default 500x375; e.g. 4032x3024); classify only")
    p.add_argument("--images", type=int, default=8, help="distinct JPEGs (or v2 arrays) to cycle (default 8)")
    p.add_argument("--top-k", type=int, help="top_k query parameter (default: the server's); v2: the "
                                                "classification extension's k (default 5)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--json", help="write the report to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0:
        print("error: --duration must be in (0, 3600] and --warmup >= 0", file=sys.stderr)
        return 2
    problem = None
    if args.batch < 1:
        problem = f"--batch must be >= 1, got {args.batch}"
    elif args.images < 1:
        problem = f"--images must be >= 1, got {args.images}"
    elif args.concurrency is not None and args.concurrency < 1:
        problem = f"--concurrency must be >= 1, got {args.concurrency}"
    elif args.protocol == "v2" and args.size is not None:
        problem = "--size is for --protocol classify; v2 sends pixels at the model's crop size (from its metadata)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    images = None
    if args.protocol == "classify":
        width, height = args.size or (500, 375)
        images = make_jpegs(args.images, width, height)
    common = dict(url=args.url, model=args.model, duration=args.duration, warmup=args.warmup, images=images,
                  timeout=args.timeout, max_requests=args.max_requests, top_k=args.top_k,
                  allow_remote=args.allow_remote, protocol=args.protocol, batch=args.batch, distinct=args.images)
    if args.rate is not None:
        coro = open_loop(rate=args.rate, arrivals=args.arrivals, max_connections=args.max_connections,
                         late_ms=args.late_ms, **common)
    else:
        coro = closed_loop(concurrency=args.concurrency or 16, **common)
    try:
        report = run_async(coro)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
