"""A guardrail at work: an experiment whose challenger is labelled correct less often gets paused, with evidence.

Exports two models (random weights; ``--models-dir`` to reuse a repository),
serves them as an experiment with an accuracy guardrail (``action: pause``),
sends requests from ``--clients`` clients and, for each answer, simulated
feedback: the true label is the top-1 class with probability
``--control-accuracy`` for the control and ``--challenger-accuracy`` for the
challenger. It stops once the guardrail has decided, checks that no request
failed and that new requests no longer reach the paused variant, and prints the
report's verdict and the guardrail's evidence. About a minute on 2 cores
(most of it the exports); exit status 0 when the challenger was paused.

    python -m bench.guardrail_demo
    python -m bench.guardrail_demo --models-dir bench/models --challenger resnet50 --min-images 300
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .images import make_jpegs
from .servers import PY, Server, export_models, free_port

EXPERIMENT = "guardrail-demo"


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:  # an error answer is a result to count, not a crash
        return exc.code, {}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def experiment_yaml(control: str, challenger: str, min_images: int, max_drop: float) -> str:
    return (
        f"experiments:\n  - name: {EXPERIMENT}\n    variants:\n"
        f"      - {{name: control, model: {control}}}\n"
        f"      - {{name: challenger, model: {challenger}}}\n"
        f"    guardrails:\n      min_images: {min_images}\n      accuracy: {{max_drop: {max_drop}}}\n"
        f"      action: pause\n      interval_s: 1\n"
    )


def drive(url: str, accuracy: dict[str, float], clients: int, timeout: float, seed: int) -> tuple[dict, dict]:
    """Requests and feedback until the report shows a guardrail decision: (status code counts, report)."""
    images = make_jpegs()
    codes: dict[int, int] = {}
    lock, stop = threading.Lock(), threading.Event()

    def client(n: int) -> None:
        rng = random.Random(seed + n)  # each client its own stream: the run is repeatable
        i = n
        while not stop.is_set():
            status, body = _post(f"{url}/classify/{EXPERIMENT}", images[i % len(images)], "image/jpeg")
            i += clients
            with lock:
                codes[status] = codes.get(status, 0) + 1
            if status != 200:
                continue
            top1 = body["results"][0]["predictions"][0]["index"]
            right = rng.random() < accuracy[body["variant"]]
            label = top1 if right else (top1 + 1 + rng.randrange(998)) % 1000  # any other class
            _post(f"{url}/feedback", json.dumps({"request_id": body["request_id"], "label": label}).encode(),
                  "application/json")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            report = _get(f"{url}/experiments/{EXPERIMENT}/report")
            if report["guardrails"]["decisions"] or time.monotonic() > deadline:
                break
            n = {v["name"]: v["n_images"] for v in report["variants"]}
            print(f"  images so far: {n}", flush=True)
            time.sleep(2.0)
        time.sleep(1.0)  # traffic goes on while the pause takes effect: it must cost no request
    finally:
        stop.set()
        for t in threads:
            t.join(70)
    return codes, _get(f"{url}/experiments/{EXPERIMENT}/report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guardrail_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None, help="default: a temporary export")
    parser.add_argument("--control", default="resnet18")
    parser.add_argument("--challenger", default="googlenet")
    parser.add_argument("--control-accuracy", type=float, default=0.8)
    parser.add_argument("--challenger-accuracy", type=float, default=0.5)
    parser.add_argument("--min-images", type=int, default=100)
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds of traffic before giving up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="guardrail-demo-"))
    try:
        models = args.models_dir or work / "export"
        # fp32 only: the fp16 file and its parity check would double the export time for nothing shown here.
        export_models(models, [args.control, args.challenger], "--precision", "fp32")
        (work / "experiments.yaml").write_text(
            experiment_yaml(args.control, args.challenger, args.min_images, args.max_drop))
        port = free_port()
        env = {"ARCHSERVE_EXPERIMENTS_FILE": str(work / "experiments.yaml"), "ARCHSERVE_STORE_PATH": str(work / "s.db"),
               "ARCHSERVE_WARMUP": "false", "ARCHSERVE_ACCESS_LOG": "false", "ARCHSERVE_GRPC_PORT": "0",
               "ARCHSERVE_POLL_INTERVAL_S": "0"}
        argv_server = [PY, "-m", "service", "--port", str(port), "--models-dir", str(models),
                       "--models", f"{args.control},{args.challenger}", "--log-level", "warning"]
        with Server("archserve", argv_server, port, work / "server.log", env=env) as server:
            server.wait_ready()
            print(f"serving {args.control} (control, labelled right {args.control_accuracy:.0%}) against "
                  f"{args.challenger} (challenger, {args.challenger_accuracy:.0%}) at {server.url}", flush=True)
            codes, report = drive(server.url, {"control": args.control_accuracy,
                                               "challenger": args.challenger_accuracy},
                                  args.clients, args.timeout, args.seed)
            after = [_post(f"{server.url}/classify/{EXPERIMENT}", make_jpegs()[0], "image/jpeg")[1].get("variant")
                     for _ in range(20)]
            print(f"answers while driving: {codes}")
            print(f"verdict: {report['verdict']} ({report['verdict_kind']})")
            for v in report["variants"]:
                acc = v["top1_accuracy"]
                print(f"  {v['name']}: {v['n_images']} images, top-1 accuracy "
                      f"{acc['rate'] if acc['rate'] is not None else float('nan'):.3f} on {acc['n']} labelled")
            decisions = report["guardrails"]["decisions"]
            for d in decisions:
                when = time.strftime("%H:%M:%S UTC", time.gmtime(d["decided_at"]))
                print(f"guardrail {d['guardrail']}: {d['variant']} {d['action']} at {when}")
                for k, val in sorted(d["evidence"].items()):
                    print(f"    {k}: {val:.4g}" if isinstance(val, float) else f"    {k}: {val}")
            print(f"20 requests after the decision were served by: {sorted(set(after))}")
            paused = any(d["variant"] == "challenger" and d["action"] == "pause" for d in decisions)
            ok = paused and set(codes) == {200} and "challenger" not in after
            if not ok:
                print(f"FAILED: paused={paused}; server log:\n{server.log_tail()}", file=sys.stderr)
            return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
