"""``python -m service``: start the server.

Every option is also an environment variable with the ``ARCHSERVE_`` prefix
(``--port 9000`` == ``ARCHSERVE_PORT=9000``); options given here win.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from pydantic import ValidationError


def _draining_server_class():
    import uvicorn

    from .state import begin_shutdown_everywhere

    class DrainingServer(uvicorn.Server):
        """On SIGTERM, turn not ready (503 to new requests) before uvicorn drains and exits."""

        def handle_exit(self, sig, frame) -> None:
            begin_shutdown_everywhere()
            super().handle_exit(sig, frame)

    return DrainingServer


def _supervisor_class():
    import queue
    import threading

    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import Process

    log = logging.getLogger("uvicorn.error")

    class Supervisor(Multiprocess):
        """uvicorn's worker supervisor (uvicorn >= 0.54), with two changes.

        - SIGTERM and SIGINT also end a rolling restart. uvicorn queues signals and handles them between its
          checks; a restart (SIGHUP) holds that loop for as long as the new workers take to load, up to
          ``worker_start_timeout_s`` each, and a SIGTERM would wait all that time. Here a thread sets
          ``should_exit`` at once, which the restart checks while it waits.
        - A worker that cannot start stops the server only at the first start. Once every first worker has
          served, one started to replace a worker that died and cannot load (the newest version on disk is
          broken, the GPU is full) is started again after 2, 4, 8 ... 60 s, while the others serve on, instead
          of taking them down.
        """

        def __init__(self, config, sockets, engine: "EngineProcess | None" = None) -> None:
            super().__init__(config, sockets=sockets)
            self.engine = engine
            self.served = False  # every worker of the first start has been ready
            self._retry: dict[int, tuple[float, object]] = {}  # slot -> (when to start it again, its failed process)
            self._failures: dict[int, int] = {}  # slot -> failed starts in a row
            self._ready: set = set()  # worker processes seen ready
            self._first_seen: dict = {}  # worker process -> when this loop first saw it
            self._stops: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._stopper, daemon=True).start()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._stop)

        def _stop(self, sig, frame) -> None:
            self._stops.put_nowait(sig)  # reentrant: safe in a signal handler, unlike taking should_exit's lock

        def _stopper(self) -> None:
            sig = self._stops.get()
            log.info("Received %s, exiting.", signal.Signals(sig).name)
            self.should_exit.set()

        def keep_subprocess_alive(self) -> None:
            """uvicorn's, but for what a worker that could not start (exit code STARTUP_FAILURE) does: before the
            server has served, it stops the server; after, its slot is started again with a growing delay."""
            if self.should_exit.is_set():
                return
            now = time.monotonic()
            if self.engine is not None and not self.engine.keep_alive(now, self.served):
                self.should_exit.set()  # the engine could not load at the first start: nothing can serve
                return
            live = set(self.processes)  # forget processes replaced since (a restart, a dead worker)
            self._ready &= live
            self._first_seen = {p: t for p, t in self._first_seen.items() if p in live}
            for idx, process in enumerate(self.processes):
                if idx in self._retry:
                    when, failed = self._retry[idx]
                    if failed is process and now < when:
                        continue  # waiting to try this slot again
                    del self._retry[idx]
                    if failed is process:
                        self._start(idx)
                    continue  # else a rolling restart filled the slot meanwhile
                if self._alive(process, now):
                    if idx in self._failures and process in self._ready:
                        del self._failures[idx]
                    continue
                process.kill()  # hung, or already gone
                process.join()
                if process.exitcode == STARTUP_FAILURE and not self.served:
                    log.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
                    self.should_exit.set()
                    return
                if self.should_exit.is_set():
                    return
                if process.exitcode == STARTUP_FAILURE:
                    failures = self._failures[idx] = self._failures.get(idx, 0) + 1
                    delay = min(60.0, 2.0**failures)
                    log.error("Child process [%s] could not start; the other workers serve on; trying again in "
                              "%.0f s", process.pid, delay)
                    self._retry[idx] = (now + delay, process)
                    continue
                log.info("Child process [%s] died", process.pid)
                self._start(idx)
            # Readiness comes from _alive's pings: one ping per worker and check, not three.
            if not self.served and all(process in self._ready for process in self.processes):
                self.served = True
                log.info("All %d workers are ready; from now on a worker that cannot start leaves the others "
                         "serving", len(self.processes))

        def _alive(self, process, now: float) -> bool:
            """Whether a worker lives. uvicorn pings it and waits up to ``timeout_worker_healthcheck`` for the
            answer, which here is the start timeout (minutes: rolling restarts wait that long for a worker to
            load). A worker that died while a ping was in flight then held this loop for all that time (its
            pipe never reads EOF: this process holds both ends). So: a worker seen ready gets uvicorn's usual
            5 s health check; one still loading is alive while its process is, up to the start timeout."""
            if not process.process.is_alive():  # exited (reaped here): no ping to wait on
                return False
            if process in self._ready:
                return process.ping(timeout=5.0)
            if process.is_ready(timeout=0.5):
                self._ready.add(process)
                return True
            started = self._first_seen.setdefault(process, now)
            return now - started < self.config.timeout_worker_healthcheck

        def _start(self, idx: int) -> None:
            self.processes[idx] = Process(self.config, self.sockets)
            self.processes[idx].start()

        def startup_failed(self) -> bool:
            """Whether the server stopped because a worker (or the engine) of its first start could not start."""
            return not self.served and (
                any(process.exitcode == STARTUP_FAILURE for process in self.processes)
                or (self.engine is not None and self.engine.failed_to_start))

    return Supervisor


class EngineProcess:
    """The engine process of a server with front-ends (``service.split``): started before them, restarted if it
    dies, stopped after them (they drain their requests through it)."""

    def __init__(self, socket_path: str) -> None:
        import multiprocessing

        self.socket_path = socket_path
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state of this one
        self.process = None
        self.failed_to_start = False
        self._failures = 0  # failed starts in a row
        self._retry_at: float | None = None  # when to start again after a failed start
        self.log = logging.getLogger("uvicorn.error")

    def start(self) -> None:
        from .split import server

        self.process = self._context.Process(target=server.run, args=(self.socket_path,), name="archserve-engine")
        self.process.start()
        self.log.info("Started engine process [%s]", self.process.pid)

    def keep_alive(self, now: float, served: bool) -> bool:
        """Restart the engine if it died; False if it could not load before the server ever served."""
        from uvicorn.config import STARTUP_FAILURE

        if self.process.is_alive():
            return True
        if self.process.exitcode == STARTUP_FAILURE and not served:
            self.log.error("The engine process [%s] could not load the models, stopping.", self.process.pid)
            self.failed_to_start = True
            return False
        if self._retry_at is None:
            if self.process.exitcode == STARTUP_FAILURE:  # cannot load now (a broken version): wait, then again
                self._failures += 1
                delay = min(60.0, 2.0**self._failures)
                self._retry_at = now + delay
                self.log.error("The engine process [%s] could not load the models; the front-ends answer 503; "
                               "trying again in %.0f s", self.process.pid, delay)
                return True
            self._failures = 0
            self.log.error("The engine process [%s] exited (code %s); starting another; the front-ends answer 503 "
                           "until it is ready", self.process.pid, self.process.exitcode)
        elif now < self._retry_at:
            return True
        self._retry_at = None
        self.start()
        return True

    def stop(self, timeout: float) -> None:
        if self.process is None or not self.process.is_alive():
            return
        self.process.terminate()  # SIGTERM: finish what is queued, then exit
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="archserve: batched image classification")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--grpc-port", type=int, help="KServe v2 / Triton gRPC port (default 8001; 0: no gRPC)")
    parser.add_argument("--models-dir", help="model repository (default models)")
    parser.add_argument("--models", help="models to serve: NAME or NAME@VERSION, comma-separated (default all)")
    parser.add_argument("--workers", type=int, help="HTTP worker processes (default 1)")
    parser.add_argument("--engine-process", choices=["auto", "on", "off"],
                        help="one engine process holds the models, fed by every worker (default auto: with workers > 1)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="execution device (default auto)")
    parser.add_argument("--require-gpu", action="store_true", default=None, help="not ready unless on CUDA")
    parser.add_argument("--max-batch-size", type=int, help="largest batch (default 32)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="wait this long to fill a batch (default 0)")
    parser.add_argument("--log-level", help="debug, info, warning, error, critical (default info)")
    parser.add_argument("--log-format", help="text or json: one JSON object per line (default text)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in vars(args).items():
        if value is not None:
            os.environ[f"ARCHSERVE_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)

    from .settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    from .logs import config as log_config, configure as configure_logging

    configure_logging(settings.log_level, settings.log_format)
    metrics_dir = None
    if (settings.workers > 1 or settings.split) and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One scrape must show every worker: prometheus-client's multiprocess mode.
        metrics_dir = tempfile.mkdtemp(prefix="archserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if settings.workers > 1 or settings.split:
        os.environ["ARCHSERVE_SUPERVISOR_PID"] = str(os.getpid())  # the root of the tree whose process_* we report

    import uvicorn

    from .http.connection import ConnectionLimits

    DrainingServer = _draining_server_class()
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the
    # signal; a drained shutdown is a success, so that re-raise exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    options = dict(
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
        proxy_headers=False,
        log_config=log_config(settings.log_level, settings.log_format),  # each worker: our format, not uvicorn's
        access_log=False,  # ours (service.logs) has the request id and the duration; settings.access_log turns it off
        http="service.http.connection:GuardedHttpToolsProtocol",  # httptools, with head limits (431, 408)
    )
    limits = ConnectionLimits(settings.max_header_bytes, settings.max_header_count, settings.header_timeout_s)
    from .grpc.server import warn_if_taken

    warn_if_taken(settings.host, settings.grpc_port)  # before the workers bind it, each with SO_REUSEPORT
    engine = None
    engine_dir = None
    if settings.split:
        # One engine process holds the models; the workers are front-ends that reach it on this socket.
        engine_dir = tempfile.mkdtemp(prefix="archserve-engine-")  # mode 0700: only this user can connect
        os.environ["ARCHSERVE_ENGINE_SOCKET"] = os.path.join(engine_dir, "engine.sock")
        engine = EngineProcess(os.environ["ARCHSERVE_ENGINE_SOCKET"])
    try:
        if engine is not None:
            engine.start()
        if settings.workers == 1 and engine is None:
            config = uvicorn.Config("service.app:create_app", **options)
            config.archserve_limits = limits
            DrainingServer(config).run()
        else:
            # Each worker loads before it takes requests (service.app), so a rolling restart (SIGHUP) must
            # wait for a worker as long as loading may take, not uvicorn's default 5 s. What uvicorn.run does
            # for several workers, with our supervisor, which also says whether a worker failed to start.
            config = uvicorn.Config("service.app:create_app", workers=settings.workers,
                                    timeout_worker_healthcheck=settings.worker_start_timeout_s, **options)
            config.archserve_limits = limits  # pickled with the config into every worker
            supervisor = _supervisor_class()(config, sockets=[config.bind_socket()], engine=engine)
            supervisor.run()
            if engine is not None:
                engine.stop(settings.graceful_shutdown_s + 5)  # after the front-ends: they drained through it
            if supervisor.startup_failed():
                print("error: a worker or the engine could not start (a model that does not load, a bad file or "
                      "setting: its log above says why); the server stopped", file=sys.stderr)
                return 1
    finally:
        if engine is not None:
            engine.stop(5)
        if engine_dir:
            shutil.rmtree(engine_dir, ignore_errors=True)
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
