"""Real servers for the tests: a uvicorn server in a thread of the test process, or ``python -m service`` with
its worker (and engine) processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.models.memory import trim_heap
from service.settings import Settings
from tests.images import jpeg


def cuda_runs(version_dir) -> bool:
    """Whether a session asking for CUDA gets it on this machine (the CUDA provider can be listed and still
    fail to load, as on a machine without a GPU)."""
    from modelrepo.manifest import load_manifest
    from service.models.engine import CUDA, EngineConfig, OnnxEngine

    return OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="auto")).provider == CUDA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, port: int, ready_path: str = "/health/ready", timeout: float = 120.0):
    """Serve the ASGI ``app`` with uvicorn on ``127.0.0.1:port`` in a thread; yields its URL once ``ready_path``
    answers 200, and stops it on leaving."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url, ready_path, timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def running_server(wait_ready: bool = True, **settings):
    """An app of ``Settings(**settings)`` served on a free port: ``(url, app)``.

    Tests pass ``warmup=False`` unless they check the warm-up, or a deadline a cold first batch could miss: the
    warm-up runs every batch size up to ``max_batch_size`` (32 by default) on each CPU lane of every model,
    which takes longer than most tests and grows with the model (inception_v3 in the experiment servers)."""
    port = free_port()
    # The queue's time bound refuses what would wait over a second, which depends on this machine's speed and
    # load (a shared CI machine: seconds per batch): tests that check it set it; the others keep the count bound.
    settings.setdefault("max_queue_wait_ms", 0)
    settings.setdefault("grpc_port", 0)  # no gRPC unless a test asks: 8001 may be taken, and tests run side by side
    app = create_app(Settings(host="127.0.0.1", port=port, **settings))
    try:
        with serving(app, port, "/health/ready" if wait_ready else "/health/live") as url:
            yield url, app
    finally:
        del app
        # A stopped server's app sits in reference cycles (its routes, its state), and its models (onnxruntime
        # sessions, GBs for the experiment models) with it: without this they wait for a full collection, which
        # came only every few servers, and the test process reached 16-19 GB in test_experiments.py on a 24 GB
        # machine. (A version retired while the server runs is freed at once: test_model_lifecycle.py.)
        gc.collect()
        trim_heap()  # glibc keeps the freed heap for reuse otherwise, per thread arena


def wait_until(url: str, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url + path, timeout=5)
            if last.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}{path} not 200 within {timeout}s (last: {last and last.text})")


def until(condition, failure, timeout: float = 20, interval: float = 0.02) -> None:
    """Wait for ``condition()``, checking every ``interval`` s; after ``timeout`` s (by default under the 30 s
    request deadline), fail with ``failure()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure()
        time.sleep(interval)


@contextlib.contextmanager
def engine_held(served):
    """Every batch of ``served`` (``run``, and ``run_alone`` for a lone batch on a CPU lane engine) waits until
    the yielded event is set (it is, on leaving), so requests stay queued behind the ones it holds however fast
    this machine is. On leaving, the engine runs as before (a shared server's later tests see no gate)."""
    gate = threading.Event()
    engine = served.engine
    for method in ("run", "run_alone"):
        real = getattr(engine, method)
        setattr(engine, method, lambda batch, real=real: (gate.wait(60), real(batch))[1])
    try:
        yield gate
    finally:
        gate.set()
        for method in ("run", "run_alone"):
            delattr(engine, method)  # the instance attribute goes; the class's method shows through again


def counter(url: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == str(v) for k, v in labels.items()):
                total += s.value
    return total


# For the servers below whose workers' warm-up plays no part (see running_server).
COLD = {"ARCHSERVE_WARMUP": "false"}


def start_service(repo, port: int, *extra: str, log=None, env=None) -> subprocess.Popen:
    """``python -m service`` in its own process group (so its workers can be killed with it), logging to ``log``."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ARCHSERVE_", "PROMETHEUS_"))}, **(env or {})}
    # Each worker warms every batch size up to the largest before it is ready: 32 would make each start seconds
    # longer, and these tests start many workers. An explicit --max-batch-size comes later and wins.
    env.setdefault("ARCHSERVE_MAX_BATCH_SIZE", "4")
    env.setdefault("ARCHSERVE_MAX_QUEUE_WAIT_MS", "0")  # as in running_server: only the tests of the bound set it
    env.setdefault("ARCHSERVE_GRPC_PORT", "0")  # as in running_server; --grpc-port in ``extra`` wins
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--models-dir", str(repo), "--log-level", "warning",
         *extra],
        env=env, stdout=open(log, "w") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextlib.contextmanager
def service_tree(repo, tmp_path, *extra: str, env=None):
    """A server with several workers: (process, url, log path); stopped with SIGTERM, killed if it hangs."""
    port, log = free_port(), tmp_path / "service.log"
    proc = start_service(repo, port, *extra, log=log, env=env)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its workers too, whatever happened
        proc.wait(timeout=10)


def worker_pids(url: str) -> set[str]:
    """The worker processes whose model info is in a scrape: one per loaded worker."""
    for attempt in range(3):  # a worker being replaced can close a fresh connection unanswered
        try:
            text = httpx.get(f"{url}/metrics", timeout=30).text
            break
        except httpx.TransportError:
            if attempt == 2:
                raise
    return {s.labels["pid"] for family in text_string_to_metric_families(text)
            if family.name == "archserve_model_info" for s in family.samples}


def wait_for_pids(url: str, count: int, timeout: float = 120) -> set[str]:
    deadline = time.monotonic() + timeout
    while len(pids := worker_pids(url)) < count and time.monotonic() < deadline:  # one may still be loading
        time.sleep(0.2)
    return pids


def live_pids(url: str, tries: int = 12) -> set[int]:
    """The worker (front-end) pids that /health/live names over ``tries`` new connections."""
    pids = set()
    for _ in range(tries):
        with contextlib.suppress(httpx.TransportError), httpx.Client() as client:
            pids.add(client.get(f"{url}/health/live", timeout=10).json()["pid"])
    return pids


def front_end_pids(url: str, count: int, timeout: float = 60) -> set[int]:
    """Every worker's pid, as /health/live says: new connections land on whichever worker accepts first."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < count and time.monotonic() < deadline:
        pids |= live_pids(url, 1)
    assert len(pids) == count, pids
    return pids


def first_answer(url: str, path: str, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url + path, timeout=timeout)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def traffic_until(url: str, done, timeout: float, clients: int = 4) -> tuple[list[int], int]:
    """``clients`` clients classifying back to back until ``done()`` (checked between rounds): the status codes,
    and how many connection resets were retried."""
    data, codes, resets = jpeg(), [], 0

    async def one(client: httpx.AsyncClient) -> int:
        nonlocal resets
        for _ in range(3):
            try:
                return (await client.post(f"{url}/classify/resnet18", content=data)).status_code
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError):
                resets += 1
        raise AssertionError("three connection resets in a row")

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < deadline:
            codes += await asyncio.gather(*(one(client) for _ in range(clients)))
            if await asyncio.to_thread(done):
                break
    return codes, resets
