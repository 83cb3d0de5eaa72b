"""A real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time

import httpx
import uvicorn

from service.app import create_app
from service.models.memory import trim_heap
from service.settings import Settings


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
