"""A front-end's side of the engine process: its models as the engine publishes them, and the handoff.

A front-end holds no onnxruntime session. Its model table is the engine's (pushed on every change), each model
a ``RemoteModel`` whose ``batcher`` is a ``RemoteBatcher``: the same ``submit_many`` as the in-process
``Batcher``, so the data plane (``service.serving``) does not know which path it is on.

Faults: if the connection drops (the engine died), every request in it fails with 503 at once, the front-end
turns not ready with the reason, and it reconnects by itself, with the same arena, to whichever engine the
supervisor starts next. A request whose deadline passes while the engine holds it fails with 504 here even if
the engine never answers; its slots stay taken until the engine does answer (or goes), so the engine never
reads a slot that is being rewritten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelrepo.manifest import Manifest

from ..errors import BadRequestError, DeadlineExceededError, QueueFullError, ServiceUnavailableError
from ..images.preprocess import PreprocessSpec
from ..metrics import ModelMetrics
from ..models.served import ModelTable
from ..settings import Settings
from . import protocol as p

log = logging.getLogger("archserve.frontend")
_GRACE_S = 0.5  # past its deadline, a request waits this long for the engine's own 504 before failing here


class RemoteBatcher:
    """``submit_many`` of one model version in the engine process."""

    can_run_now = False  # the in-process shortcut (decode in the batch thread) does not apply

    def __init__(self, client: "EngineClient", name: str, version: int) -> None:
        self._client, self._name, self._version = client, name, version

    async def submit_many(self, items: list[np.ndarray], *, deadline: float | None = None,
                          priority: str = "normal") -> list[np.ndarray]:
        if deadline is None:
            deadline = time.monotonic() + self._client.settings.request_timeout_s
        return await self._client.infer(self._name, self._version, items, deadline, priority == "low")

    def check_admission(self, count: int = 1) -> None:
        """Admission is the engine's: its batcher refuses a full or too slow queue when the images arrive."""

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Nothing to close here: the engine owns the batcher."""


@dataclass(eq=False)
class RemoteModel:
    """A model version served by the engine: what the front-end needs to decode, route and answer."""

    name: str
    version: int
    manifest: Manifest
    manifest_json: str = field(repr=False)
    described: dict = field(repr=False)
    preprocess: PreprocessSpec
    labels: np.ndarray = field(repr=False)
    metrics: ModelMetrics = field(repr=False)
    batcher: RemoteBatcher = field(repr=False)

    def describe(self, settings: Settings) -> dict:
        return self.described


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future
    slots: list[int]
    timer: Any = None


class EngineClient:
    def __init__(self, state, settings: Settings) -> None:
        self.state = state
        self.settings = settings
        if settings.engine_socket is None:
            raise RuntimeError("this front-end has no engine process to feed: `python -m service` starts one and sets "
                               "ARCHSERVE_ENGINE_SOCKET; or set ARCHSERVE_ENGINE_PROCESS=off")
        self.path = str(settings.engine_socket)
        self.arena = p.Arena.create(settings.engine_slot_bytes, settings.engine_slot_count())
        # A stack: the slots in use are the most recently used, so only as many pages as images in flight at
        # the busiest moment are ever touched (in this process and, mapped, in the engine).
        self._free = list(range(self.arena.count - 1, -1, -1))
        self._pending: dict[int, _Pending] = {}
        self._ids = 0
        self._protocol: p.FrameProtocol | None = None
        self._models: dict[tuple[str, int], RemoteModel] = {}
        self._task: asyncio.Task | None = None
        self._table_seen = asyncio.Event()
        self.on_reload_experiments = None  # set by the app: re-read the experiments file

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    # Connection
    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_ready(self, timeout: float) -> None:
        """Until the engine says its models are loaded; raise if it says they failed or time runs out."""
        deadline = time.monotonic() + timeout
        while not self.state.ready:
            if self.state.status == "failed":
                raise RuntimeError(f"the engine could not load the models: {self.state.reason}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the engine was not ready within {timeout:g} s: {self.state.reason}")
            self._table_seen.clear()
            try:
                await asyncio.wait_for(self._table_seen.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.arena.close()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            lost = asyncio.Event()
            try:
                await self._connect(lost.set)
            except OSError as exc:
                self._not_ready(f"the engine process is not reachable ({exc.strerror or exc}); it may be starting")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            try:
                await lost.wait()
                log.warning("front-end %d lost the engine process; reconnecting", os.getpid())
            finally:
                self._lost()

    async def _connect(self, on_lost) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.path)
            hello = b"%s %d %d %d" % (p.HELLO, os.getpid(), self.arena.slot_bytes, self.arena.count)
            socket.send_fds(sock, [hello], [self.arena.fd])  # the arena, once per connection
            protocol = p.FrameProtocol(self._dispatch, on_lost)
            await loop.create_unix_connection(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._protocol = protocol

    def _lost(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            self._free.extend(entry.slots)  # that engine is gone, or has cancelled what it held
            if entry.timer is not None:
                entry.timer.cancel()
            if not entry.future.done():
                entry.future.set_exception(ServiceUnavailableError(
                    "the engine process went away while it held this request (it is being restarted); retry",
                    retry_after_s=1))
        self._not_ready("the engine process went away; waiting for it to restart")

    def _not_ready(self, reason: str) -> None:
        state = self.state
        if state.status == "failed":
            return  # the engine said why before it went (wait_ready raises on it); the next table replaces it
        state.status, state.ready, state.reason = "loading", False, reason
        state.metrics.ready.set(0)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == p.OK or kind == p.ADMIN_OK or kind == p.ERROR:
            entry = self._pending.pop(message[1], None)
            if entry is None:
                return
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.future.done():  # failed here already (deadline, disconnect): only its slots were waiting
                self._free.extend(entry.slots)
                return
            if kind == p.OK:
                _, _, data, shape, dtype = message
                if data is None:  # in the slots, read before they are free again
                    rows = self.arena.take(entry.slots, shape, dtype)
                else:
                    rows = list(np.frombuffer(data, dtype).reshape(shape))
                self._free.extend(entry.slots)
                entry.future.set_result(rows)
                return
            self._free.extend(entry.slots)
            if kind == p.ADMIN_OK:
                entry.future.set_result(message[2])
            else:
                entry.future.set_exception(p.rebuild_error(*message[2:]))
        elif kind == p.TABLE:
            self._apply_table(*message[1:])
        elif kind == p.RELOAD_EXPERIMENTS and self.on_reload_experiments is not None:
            self.on_reload_experiments()

    def _apply_table(self, ready: bool, status: str, reason: str, models: tuple) -> None:
        state = self.state
        known, table = self._models, {}
        for name, version, manifest_json, described in models:
            model = known.get((name, version))
            if model is None or model.manifest_json != manifest_json:
                model = self._remote_model(name, version, manifest_json, described)
            model.described = described
            table[(name, version)] = model
        self._models = table
        state.models = ModelTable(list(table.values()))
        state.status, state.reason = status, reason
        state.ready = ready and not state.shutting_down
        state.metrics.ready.set(1 if state.ready else 0)
        self._table_seen.set()

    def _remote_model(self, name: str, version: int, manifest_json: str, described: dict) -> RemoteModel:
        manifest = Manifest.model_validate_json(manifest_json)
        pre = manifest.preprocessing
        return RemoteModel(
            name=name, version=version, manifest=manifest, manifest_json=manifest_json, described=described,
            preprocess=PreprocessSpec(resize=pre.resize, crop=pre.crop, interpolation=pre.interpolation,
                                      max_pixels=self.settings.max_image_pixels),
            labels=np.asarray(manifest.labels, dtype=object),
            metrics=ModelMetrics.of(self.state.metrics, name, str(version)),
            batcher=RemoteBatcher(self, name, version),
        )

    # Requests
    def _send(self, message: tuple, slots: list[int]) -> tuple[int, _Pending]:
        protocol = self._protocol
        if protocol is None:
            self._free.extend(slots)
            raise ServiceUnavailableError(
                "the engine process is not reachable (it is being restarted); retry", retry_after_s=1)
        self._ids += 1
        request_id = self._ids
        entry = _Pending(asyncio.get_running_loop().create_future(), slots)
        self._pending[request_id] = entry
        protocol.send((message[0], request_id, *message[1:]))
        return request_id, entry

    async def infer(self, name: str, version: int, arrays: list[np.ndarray], deadline: float,
                    low: bool) -> list[np.ndarray]:
        if not arrays:
            return []
        arena = self.arena
        shape, dtype = arrays[0].shape, arrays[0].dtype
        if any(a.shape != shape or a.dtype != dtype for a in arrays):
            raise BadRequestError("every image of one request must have the model's one input shape")
        fits = arrays[0].nbytes <= arena.slot_bytes
        if fits and len(arrays) > len(self._free):
            raise QueueFullError(
                f"this front-end process already has {arena.count - len(self._free)} images at the engine, its "
                f"limit (ARCHSERVE_ENGINE_SLOTS={arena.count}); retry shortly", retry_after_s=1)
        if fits:
            slots = [self._free.pop() for _ in arrays]
            for slot, array in zip(slots, arrays):
                arena.write(slot, array)
            images = (shape, dtype.str, tuple(slots), ())
        else:  # larger than a slot: inline on the socket (one copy more)
            slots = []
            images = (shape, dtype.str, (-1,) * len(arrays), tuple(a.tobytes() for a in arrays))
        request_id, entry = self._send((p.INFER, name, version, images, deadline, low), slots)
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_at(deadline + _GRACE_S, self._expire, request_id)
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._cancel(request_id)  # the client left: its images leave the engine's queue
            raise

    def _expire(self, request_id: int) -> None:
        entry = self._pending.get(request_id)
        if entry is not None and not entry.future.done():
            entry.future.set_exception(DeadlineExceededError(
                "the request's deadline passed while the engine process held it (it did not answer)"))
            self._cancel(request_id)

    def _cancel(self, request_id: int) -> None:
        if request_id in self._pending and self._protocol is not None:
            self._protocol.send((p.CANCEL, request_id))

    async def admin(self, op: str, arg: Any = None, timeout: float = 600.0) -> Any:
        """An operation on the engine's models (load, unload, index, stats, reload_experiments): done once, for all."""
        request_id, entry = self._send((p.ADMIN, op, arg), [])
        try:
            return await asyncio.wait_for(entry.future, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise ServiceUnavailableError(f"the engine did not finish {op} within {timeout:g} s", retry_after_s=5)


class RemoteLifecycle:
    """The admin endpoints' lifecycle with an engine process: load, unload and the index happen there, once."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self.state = client.state

    async def load(self, name: str) -> None:
        await self.client.admin("load", name)

    async def unload(self, name: str) -> list[int]:
        return await self.client.admin("unload", name)

    async def repository_index(self) -> list[dict]:
        return await self.client.admin("index", timeout=30.0)

    async def statistics(self) -> list[dict]:
        """The engine's: its batchers count every front-end's requests."""
        return await self.client.admin("stats", timeout=10.0)

    async def run_polling(self) -> None:
        """The engine polls the repository; nothing to do here."""

