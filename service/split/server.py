"""The engine process: the one process per device that holds the models, their batchers and their lifecycle.

Front-end processes (``client``) connect to its Unix socket, pass it their shared-memory arena, and send
images by slot; batches form here across every front-end. The model table and readiness are pushed to every
front-end whenever they change, so a front-end answers 404 or routes an experiment without asking.

Each front-end may have at most its arena's slot count of images here at once; a front-end that stops
reading holds only its own slots. SIGTERM (the supervisor, once the front-ends have drained) finishes what is
queued and exits; SIGINT and SIGHUP are the supervisor's to act on, not this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadRequestError, ClientGoneError, InferenceError, NotFoundError, QueueFullError, ServiceError
from ..experiments.runtime import Experiments
from ..metrics import ExperimentMetrics, Metrics
from ..models.lifecycle import Lifecycle
from ..settings import Settings
from ..state import AppState
from . import protocol as p

log = logging.getLogger("archserve.engine")


@dataclass(eq=False)
class _Connection:
    pid: int
    arena: p.Arena
    protocol: p.FrameProtocol | None = None
    tasks: dict[int, asyncio.Task] = field(default_factory=dict)
    outstanding: int = 0  # images of this front-end in the engine now

    def send(self, message: tuple) -> None:
        self.protocol.send(message)


class EngineServer:
    def __init__(self, settings: Settings, path: Path) -> None:
        self.settings = settings
        self.path = path
        self.state = AppState(
            settings=settings, metrics=Metrics(), experiment_metrics=ExperimentMetrics(),
            experiments=Experiments(None), decode_pool=ThreadPoolExecutor(1),
        )
        self.lifecycle = Lifecycle(self.state)
        self.connections: set[_Connection] = set()
        self._published: tuple | None = None
        self.failed = False  # the models did not load: exit with STARTUP_FAILURE

    # The table every front-end serves from
    def _table(self) -> tuple:
        state = self.state
        models = tuple(
            (m.name, m.version, m.manifest.model_dump_json(), m.describe(self.settings)) for m in state.models
        )
        return (p.TABLE, state.ready, state.status, state.reason, models)

    def publish(self) -> None:
        """Send the table to every front-end if it changed (a new front-end gets it when it connects)."""
        key = (id(self.state.models), self.state.ready, self.state.status, self.state.reason)
        if key == self._published:
            return
        self._published = key
        table = self._table()
        for conn in list(self.connections):
            conn.send(table)

    async def _watch(self) -> None:
        # Loading, hot reload and retirement change the table from their own tasks: one check every 100 ms
        # reaches every front-end without hooking each of them.
        while True:
            self.publish()
            await asyncio.sleep(0.1)

    # Connections
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        for sig in (signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: None)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a predecessor that was killed leaves its socket file
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(256)
        listener.setblocking(False)
        loading = asyncio.create_task(self._load_then_poll())
        watcher = asyncio.create_task(self._watch())
        accepting = asyncio.create_task(self._accept(listener))
        log.info("engine %d listening on %s", os.getpid(), self.path)
        await stop.wait()
        log.info("engine %d draining", os.getpid())
        accepting.cancel()
        listener.close()
        pending = [t for conn in self.connections for t in conn.tasks.values()]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.graceful_shutdown_s)
        loading.cancel()
        watcher.cancel()
        await asyncio.gather(loading, watcher, accepting, return_exceptions=True)
        await self.state.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _load_then_poll(self) -> None:
        await self.state.load()
        if self.state.status == "failed":
            log.error("the engine could not load its models: %s", self.state.reason)
            self.publish()
            await asyncio.sleep(0.5)  # the front-ends read why before the socket closes
            self.failed = True
            self._stop.set()
            return
        await self.lifecycle.run_polling()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            self.state.spawn(self._connection(sock), daemon=True)

    async def _connection(self, sock: socket.socket) -> None:
        try:
            conn = await asyncio.to_thread(self._handshake, sock)
        except (OSError, ValueError) as exc:
            log.warning("a front-end could not connect: %s", exc)
            sock.close()
            return
        sock.setblocking(False)
        lost = asyncio.Event()
        conn.protocol = p.FrameProtocol(lambda message: self._received(conn, message), lost.set)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn.protocol, sock)
        self.connections.add(conn)
        conn.send(self._table())
        log.info("front-end %d connected (%d slots)", conn.pid, conn.arena.count)
        try:
            await lost.wait()
        finally:
            self.connections.discard(conn)
            for task in list(conn.tasks.values()):
                task.cancel()  # nobody is left to answer: its images leave the queues
            if conn.tasks:
                await asyncio.wait(list(conn.tasks.values()), timeout=5)
            conn.protocol.transport.close()
            conn.arena.close()
            log.info("front-end %d disconnected", conn.pid)

    def _received(self, conn: _Connection, message: tuple) -> None:
        kind = message[0]
        if kind == p.INFER:
            self._start(conn, message[1], self._infer(conn, *message[1:]))
        elif kind == p.CANCEL:
            task = conn.tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == p.ADMIN:
            self._start(conn, message[1], self._admin(conn, *message[1:]))
        else:
            log.error("front-end %d sent an unknown message %r; ignored", conn.pid, kind)

    def _handshake(self, sock: socket.socket) -> _Connection:
        sock.settimeout(10)
        data, fds, _, _ = socket.recv_fds(sock, 256, 1)
        sock.settimeout(None)
        if len(fds) != 1 or not data.startswith(p.HELLO):
            for fd in fds:
                os.close(fd)
            raise ValueError("no arena in the hello")
        _, pid, slot_bytes, count = data.decode().split()
        arena = p.Arena(fds[0], int(slot_bytes), int(count))
        return _Connection(int(pid), arena)

    def _start(self, conn: _Connection, request_id: int, coro) -> None:
        task = asyncio.ensure_future(coro)
        conn.tasks[request_id] = task
        task.add_done_callback(lambda _: conn.tasks.pop(request_id, None))

    # Requests
    async def _infer(self, conn: _Connection, request_id: int, name: str, version: int, images: tuple,
                     deadline: float, low: bool) -> None:
        count = len(images[2])
        conn.outstanding += count
        try:
            if conn.outstanding > conn.arena.count:
                raise QueueFullError(
                    f"this front-end already has {conn.outstanding - count} images at the engine, its limit "
                    f"({conn.arena.count}, ARCHSERVE_ENGINE_SLOTS); retry shortly", retry_after_s=1)
            served = self.state.models.get(name, version)
            arrays = conn.arena.views(images)
            logits = await served.batcher.submit_many(arrays, deadline=deadline,
                                                      priority="low" if low else "normal")
            slots = images[2]
            if logits and min(slots) >= 0 and conn.arena.put(slots, logits):  # no data in the frame
                conn.send((p.OK, request_id, None, logits[0].shape, logits[0].dtype.str))
            else:
                out = np.stack(logits) if logits else np.empty((0, 0), np.float32)
                conn.send((p.OK, request_id, out.tobytes(), out.shape, out.dtype.str))
        except asyncio.CancelledError:
            conn.send(p.error_message(request_id, ClientGoneError("cancelled by the front-end")))
        except ServiceError as exc:
            conn.send(p.error_message(request_id, exc))
        except ValueError as exc:  # a slot that does not hold what the message says
            conn.send(p.error_message(request_id, BadRequestError(f"engine handoff: {exc}")))
        except Exception as exc:
            log.exception("inference failed in the engine")
            conn.send(p.error_message(request_id, InferenceError(f"inference failed: {type(exc).__name__}")))
        finally:
            conn.outstanding -= count

    async def _admin(self, conn: _Connection, request_id: int, op: str, arg) -> None:
        try:
            if op == "load":
                await self.lifecycle.load(arg)
                result = sorted(self.state.models.versions(arg))
            elif op == "unload":
                result = await self.lifecycle.unload(arg)
            elif op == "index":
                result = self.lifecycle.index()
            elif op == "stats":  # Triton's statistics: the batchers, hence the counts, are here
                result = await self.lifecycle.statistics()
            elif op == "reload_experiments":  # relayed: every other front-end re-reads the file
                for other in list(self.connections):
                    if other is not conn:
                        other.send((p.RELOAD_EXPERIMENTS,))
                result = len(self.connections) - 1
            else:
                raise NotFoundError(f"no engine operation {op!r}")
            self.publish()  # the new table reaches the asking front-end before its answer
            conn.send((p.ADMIN_OK, request_id, result))
        except asyncio.CancelledError:
            conn.send(p.error_message(request_id, ClientGoneError("cancelled by the front-end")))
        except ServiceError as exc:
            conn.send(p.error_message(request_id, exc))
        except Exception as exc:
            log.exception("engine operation %s failed", op)
            conn.send(p.error_message(request_id, InferenceError(f"{op} failed: {type(exc).__name__}: {exc}")))


def run(path: str) -> None:
    """The engine process's entry point (started by the supervisor, with the server's environment)."""
    settings = Settings()
    from ..logs import configure as configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from ..app import freeze_startup_objects
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    freeze_startup_objects()
    from uvicorn.config import STARTUP_FAILURE

    engine = EngineServer(settings, Path(path))
    try:
        _run_loop(engine.serve())
    except KeyboardInterrupt:
        pass
    sys.exit(STARTUP_FAILURE if engine.failed else 0)


def _run_loop(coro) -> None:
    """On uvloop when installed, as uvicorn runs the front-ends: its socket transports cost less per message."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)
