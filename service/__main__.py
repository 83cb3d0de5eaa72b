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
    import threading

    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's worker supervisor (uvicorn >= 0.54), with SIGTERM and SIGINT that also end a rolling restart.

        uvicorn queues signals and handles them between its checks; a rolling restart (SIGHUP) holds that loop
        for as long as the new workers take to load, up to ``worker_start_timeout_s`` each, and a SIGTERM would
        wait all that time. Here it also sets ``should_exit`` at once, which the restart checks while it waits.
        """

        def __init__(self, config, sockets) -> None:
            super().__init__(config, sockets=sockets)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._stop)

        def _stop(self, sig, frame) -> None:
            self.signal_queue.append(sig)  # uvicorn's own handling (log, stop) when its loop gets to it
            # From another thread: this handler may interrupt this very thread inside should_exit's lock.
            threading.Thread(target=self.should_exit.set, daemon=True).start()

        def startup_failed(self) -> bool:
            """Whether a worker exited before it served (it could not load): uvicorn then stops the server."""
            from uvicorn.config import STARTUP_FAILURE

            return any(process.exitcode == STARTUP_FAILURE for process in self.processes)

    return Supervisor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="archserve: batched image classification")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--models-dir", help="model repository (default models)")
    parser.add_argument("--models", help="models to serve: NAME or NAME@VERSION, comma-separated (default all)")
    parser.add_argument("--workers", type=int, help="HTTP worker processes (default 1)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="execution device (default auto)")
    parser.add_argument("--require-gpu", action="store_true", default=None, help="not ready unless on CUDA")
    parser.add_argument("--max-batch-size", type=int, help="largest batch (default 32)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="wait this long to fill a batch (default 0)")
    parser.add_argument("--log-level", help="debug, info, warning, error (default info)")
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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"
    )
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One scrape must show every worker: prometheus-client's multiprocess mode.
        metrics_dir = tempfile.mkdtemp(prefix="archserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    import uvicorn

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
        access_log=settings.access_log,
    )
    try:
        if settings.workers == 1:
            DrainingServer(uvicorn.Config("service.app:create_app", **options)).run()
        else:
            # Each worker loads before it takes requests (service.app), so a rolling restart (SIGHUP) must
            # wait for a worker as long as loading may take, not uvicorn's default 5 s. What uvicorn.run does
            # for several workers, with our supervisor, which also says whether a worker failed to start.
            config = uvicorn.Config("service.app:create_app", workers=settings.workers,
                                    timeout_worker_healthcheck=settings.worker_start_timeout_s, **options)
            supervisor = _supervisor_class()(config, sockets=[config.bind_socket()])
            supervisor.run()
            if supervisor.startup_failed():
                print("error: a worker could not load its models (its log above says why); the server stopped",
                      file=sys.stderr)
                return 1
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
