"""The data plane: what every inference request goes through, once, whatever its protocol.

A route parses its protocol and shapes its response; ``serve`` owns everything
between: readiness, the model (or an experiment's variant), the in-flight
count, the deadline, decoding in the pool, submitting to the model's batcher,
the client's disconnect and the request metrics. The engine process plugs in
here: a route never touches a batcher.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from modelrepo.layout import is_version_name

from .errors import (
    ClientGoneError, DeadlineExceededError, NotFoundError, ServiceError, ServiceUnavailableError, ShuttingDownError,
)
from .experiments import ab
from .images.preprocess import decode_for
from .logs import CURRENT, new_request_log
from .metrics import UNKNOWN_MODEL
from .models.served import ServedModel
from .state import AppState

T = TypeVar("T")


@dataclass(eq=False)
class Call:
    """One inference request on its way through: what a route's handlers may use."""

    state: AppState
    served: ServedModel
    route: ab.Route | None  # set when the name was an experiment
    deadline: float
    request_id: str  # ours, unique: feedback keys on it
    client_id: str | None  # the caller's X-Request-ID, echoed for tracing
    images: int = 0
    _shadow_inputs: list[tuple] = field(default_factory=list, repr=False)

    @property
    def echo_id(self) -> str:
        return self.client_id or self.request_id

    async def decode(self, images: Sequence[bytes], element: Callable[[int], str] | None = None) -> list[np.ndarray]:
        """Decode in the pool, once for the model and every shadow, then check the deadline.

        ``element(i)`` names image ``i`` in error messages (the v2 input and its element).
        """
        loop = asyncio.get_running_loop()
        pool = self.state.decode_pool
        if len(images) == 1:  # the usual request: no gather future around the one decode
            decoded = [await loop.run_in_executor(pool, self._decode, 0, images[0], element)]
        else:
            decoded = await asyncio.gather(
                *(loop.run_in_executor(pool, self._decode, i, data, element) for i, data in enumerate(images))
            )
        self._check_deadline()
        self._shadow_inputs = [d[1:] for d in decoded]
        return [d[0] for d in decoded]

    async def decode_and_infer(self, images: Sequence[bytes], element: Callable[[int], str] | None = None,
                               ) -> list[np.ndarray]:
        """``infer(decode(images))``; a lone image for an idle model, outside any experiment, is decoded in
        the model's batch thread and run there at once: one hand-off between threads instead of two."""
        batcher = self.served.batcher
        if len(images) != 1 or self.route is not None or not batcher.can_run_now:
            return await self.infer(await self.decode(images, element))
        data = images[0]

        def prepare() -> np.ndarray:
            array = self._decode(0, data, element)[0]
            self._check_deadline()
            return array

        logits = await batcher.run_now(prepare, deadline=self.deadline)
        self.images = 1
        return [logits]

    @functools.cached_property
    def _specs(self) -> tuple:
        """The model's preprocessing, then each shadow's: one decode serves them all."""
        shadows = self.route.shadows if self.route else ()
        return (self.served.preprocess, *(model.preprocess for _, model in shadows))

    def _decode(self, index: int, data: bytes, element: Callable[[int], str] | None) -> list[np.ndarray]:
        served = self.served
        started = time.monotonic()
        try:
            return decode_for(data, *self._specs)
        except ServiceError as exc:
            if element is None:
                raise
            raise type(exc)(f"{element(index)}: {exc.message}") from exc  # keeps the status (400, 413, 415)
        finally:
            served.metrics.preprocess.observe(time.monotonic() - started)

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlineExceededError(
                f"the request's deadline of {self.state.settings.request_timeout_s:g}s passed while decoding; "
                "retry, or send smaller images"
            )

    async def infer(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Each array joins the model's batch as its own item; logits, one row per array.

        For an experiment, the primary predictions are logged before the answer (so feedback finds them) and
        the shadows start, on the images ``decode`` prepared for them.
        """
        submitted = time.monotonic()
        logits = await self.served.batcher.submit_many(arrays, deadline=self.deadline)
        self.images = len(arrays)
        if self.route is not None:
            shadow_arrays = [[inputs[i] for inputs in self._shadow_inputs] for i in range(len(self.route.shadows))]
            await ab.record_and_shadow(
                self.state, self.route, self.request_id, logits, time.monotonic() - submitted, shadow_arrays
            )
        return logits


async def serve(
    request: Request,
    name: str,
    version: int | str | None,
    read: Callable[[Call], Awaitable[T]],
    run: Callable[[Call, T], Awaitable[Response]],
    *,
    experiments: bool = False,
) -> Response:
    """Serve one inference request: ``read`` takes the body (limits, parsing), ``run`` infers and answers.

    ``run`` is cancelled if the client disconnects (its images leave the queue; the answer is 499). With
    ``experiments``, ``name`` may also be an experiment, served by one of its variants. ``request`` is a Starlette
    request, or a gRPC call shaped like one (``service.grpc.service.CallRequest``: ``app``, ``headers``,
    ``receive``), whose own ``deadline`` (``time.monotonic()``) bounds the request's when it is sooner.
    """
    state: AppState = request.app.state.archserve
    arrived = time.monotonic()
    # The request's log context (service.logs, opened by the HTTP middleware or the gRPC handler) has already
    # read the caller's X-Request-ID; its lines carry the model from here on.
    entry = CURRENT.get() or new_request_log(request.headers.get("x-request-id"))
    client_id = entry.request_id if entry.given else None
    request_id = uuid.uuid4().hex if entry.given else entry.request_id  # ours is unique: feedback keys on it
    labels = (UNKNOWN_MODEL, "")
    code = 500
    call: Call | None = None
    in_flight = None
    try:
        require_ready(state)
        route = _route(state, request, name, version, experiments)
        served = route.served if route else _lookup(state, name, version)
        # A gRPC client's deadline (grpc-timeout) when sooner than ours: no use working once it stops waiting.
        deadline = min(arrived + state.settings.request_timeout_s, getattr(request, "deadline", None) or math.inf)
        call = Call(state, served, route, deadline, request_id, client_id)
        labels = (served.name, str(served.version))
        entry.model, entry.version = labels
        in_flight = served.metrics.in_flight
        in_flight.inc()
        payload = await read(call)
        served.batcher.check_admission()  # overloaded: 503 now, before the decode is spent on it
        response = await until_disconnected(request, run(call, payload))
        code = response.status_code
        if code == 200:
            served.metrics.images.inc(call.images)
        return response
    except ServiceError as exc:
        code = exc.status_code
        if code == ClientGoneError.status_code:
            return Response(status_code=code)  # nobody reads it; nothing of the request is left in the queue
        exc.headers.setdefault("X-Request-ID", client_id or request_id)
        raise
    finally:
        if in_flight is not None:
            in_flight.dec()
        elapsed = time.monotonic() - arrived
        metrics = state.metrics
        metrics.requests.labels(*labels, str(code)).inc()
        if call is not None:
            call.served.metrics.latency.observe(elapsed)
            if call.route is not None:
                ab.observe_request(state.experiment_metrics, call.route, code, elapsed)
        else:
            metrics.request_latency.labels(*labels).observe(elapsed)


def require_ready(state: AppState) -> None:
    if state.shutting_down:
        raise ShuttingDownError("the server is shutting down; retry on another replica", retry_after_s=1)
    if not state.ready:
        raise ServiceUnavailableError(f"the server is not ready: {state.reason}", retry_after_s=5)


def lookup(state: AppState, name: str, version: int | str | None = None) -> ServedModel:
    """A served model version. Until the server is ready a missing one is 503 with the reason, not 404: it may
    well exist once the models have loaded. A version given as text must be a canonical positive integer."""
    try:
        return _lookup(state, name, version)
    except NotFoundError:
        if not state.ready:
            require_ready(state)
        raise


def _lookup(state: AppState, name: str, version: int | str | None) -> ServedModel:
    if isinstance(version, str):
        if not is_version_name(version):  # the repository's own rule for version folders
            state.models.get(name)  # an unknown model says so first
            served = ", ".join(map(str, sorted(state.models.versions(name))))
            raise NotFoundError(
                f"model {name!r} has no version {version!r}: versions are positive integers; served versions: "
                f"{served}"
            )
        version = int(version)
    return state.models.get(name, version)


def _route(state: AppState, request: Request, name: str, version, experiments: bool) -> ab.Route | None:
    experiment = state.experiments.current.get(name) if experiments else None
    if experiment is None:
        return None
    if version is not None:
        raise NotFoundError(f"{name!r} is an experiment, which has no versions; POST /classify/{name}")
    key = request.headers.get(experiment.sticky_key) if experiment.sticky_key else None
    if experiment.bandit is not None:  # a background refresh of the posteriors when one is due, never a wait
        experiment.bandit.maybe_refresh(state.store, state.spawn, time.monotonic())
    return ab.route(state.models, experiment, key)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ``ClientGoneError``.

    The watcher cancels ``work`` from a done-callback rather than racing the two with ``asyncio.wait`` (a waiter
    future, a set and four callbacks per request on the event loop). Work that finished first wins; once the
    client is gone the request ends in ``ClientGoneError`` whatever the cancelled work did.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
    watcher = loop.create_task(_wait_for_disconnect(request))
    gone = False

    def on_watcher_done(finished: asyncio.Task) -> None:
        nonlocal gone
        if not finished.cancelled():  # disconnected (or receive failed): the client is gone either way
            gone = task.cancel()

    watcher.add_done_callback(on_watcher_done)
    try:
        try:
            result = await task
        except (Exception, asyncio.CancelledError):
            # Cancelled because this request itself is being cancelled (shutdown): not a disconnect.
            if gone and not asyncio.current_task().cancelling():
                raise ClientGoneError("the client disconnected") from None
            raise
        if gone:  # the work swallowed its cancellation
            raise ClientGoneError("the client disconnected")
        return result
    finally:
        watcher.remove_done_callback(on_watcher_done)
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # Called once the body has been read, so the next message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
