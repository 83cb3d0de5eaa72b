"""``inference.GRPCInferenceService``: each RPC reads its message and shapes its answer; inference goes through
``serving.serve``, the data plane REST's routes use (readiness, model or experiment, deadline, batcher, metrics).
ModelInfer takes an experiment's name as ``/classify`` does (one of its variants answers; the response's
``experiment`` and ``variant`` parameters say which); the client's X-User-Id-style sticky key is call metadata.

Errors are the data plane's, with the same messages, mapped to gRPC's status codes (``STATUS``). A request too
large is RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: grpc itself answers RESOURCE_EXHAUSTED to a message over the
receive limit (``server.py`` sets it to the REST body limit), so a client sees one code for "too large" whichever
layer refused it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from ..errors import NotFoundError, ServiceError
from ..logs import ACCESS_LOGGER, CURRENT, new_request_log
from ..serving import Call, lookup, serve
from ..state import AppState
from ..v2.metadata import model_io, model_metadata, server_metadata
from . import codec, messages

log = logging.getLogger("archserve.grpc")
_access = logging.getLogger(ACCESS_LOGGER)

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,  # an image format we do not decode: the request's fault
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,  # overloaded, shutting down, not ready: retry (elsewhere, or later)
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# What the gRPC service implements of the protocol's extensions: not REST's binary_tensor_data (raw contents are
# gRPC's own), and of model_repository only the index.
EXTENSIONS = ("classification", "model_repository")
# Our deadline ends this much before the client's, so that our 504 (and its count in the metrics) comes before
# grpc cancels the call at the client's deadline, which would count as a client gone (499).
DEADLINE_MARGIN_S = 0.01


class _Headers(dict):
    """Call metadata as ``serve`` reads request headers: by name, in any case (gRPC's keys are lower-case)."""

    def get(self, key: str, default=None):
        return super().get(key.lower(), default)


class CallRequest:
    """A gRPC call shaped as ``serving.serve`` reads a request: the app, the metadata as headers, the client's
    deadline, and ``receive``, which answers a disconnect once the client has cancelled."""

    __slots__ = ("app", "headers", "deadline", "_gone")

    def __init__(self, app, context: grpc.aio.ServicerContext) -> None:
        self.app = app
        # Binary metadata (keys ending -bin) are bytes: never a request id or a sticky key.
        self.headers = _Headers((k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str))
        remaining = context.time_remaining()  # None: the client set no deadline
        self.deadline = None if remaining is None else time.monotonic() + remaining - DEADLINE_MARGIN_S
        self._gone = asyncio.Event()

    def cancelled(self) -> None:
        """grpc cancelled the call: the client cancelled it, or its deadline came."""
        if self.deadline is None or time.monotonic() < self.deadline:
            self._gone.set()  # the client hung up: as an HTTP disconnect, the work stops and counts 499
        # Else our deadline has passed: the data plane ends the request with its 504 at once.

    async def receive(self) -> dict:
        await self._gone.wait()
        return {"type": "http.disconnect"}


@dataclass(frozen=True)
class Reply:
    """``run``'s answer, as ``serve`` reads a response: a status code (the metrics' label) and the message."""

    message: object
    status_code: int = 200


def _rpc(method):
    """Map what an RPC raises to a gRPC status: a ``ServiceError`` to its code and message (its headers, the
    request id and Retry-After, as trailing metadata); anything else to INTERNAL, logged, as REST's 500. Each
    call has a request id and an access line, as an HTTP request has (``service.logs``)."""

    @functools.wraps(method)
    async def handler(self, message, context: grpc.aio.ServicerContext):
        header = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
        entry = new_request_log(header if isinstance(header, str) else None)
        token = CURRENT.set(entry)  # the data plane's task (created in this context) sees it and names the model
        started, status = time.monotonic(), 200
        try:
            return await method(self, message, context)
        except ServiceError as exc:
            status = exc.status_code
            trailing = tuple((key.lower(), value) for key, value in exc.headers.items())
            await context.abort(STATUS.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message, trailing)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            status = 499  # the client cancelled, or its deadline came
            raise
        except Exception as exc:
            status = 500
            log.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            if self.state.settings.access_log:
                ms = (time.monotonic() - started) * 1000
                code = STATUS.get(status, grpc.StatusCode.OK if status == 200 else grpc.StatusCode.INTERNAL)
                _access.info('%s "gRPC %s" %s %.1f ms', context.peer(), method.__name__, code.name, ms,
                             extra={"status": status, "duration_ms": round(ms, 3)})  # status: REST's equivalent
            CURRENT.reset(token)

    return handler


class InferenceService:
    """The RPCs, for the app of this process (its state, its lifecycle for the repository index)."""

    def __init__(self, app) -> None:
        self.app = app
        self._running: set[asyncio.Task] = set()  # inference shielded from grpc's cancel, until it has ended

    @property
    def state(self) -> AppState:
        return self.app.state.archserve

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers a generated ``*_pb2_grpc`` module's ``add_..._to_server`` would register."""
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, name), request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in messages.METHODS.items()
        }
        return grpc.method_handlers_generic_handler(messages.SERVICE, handlers)

    # ------------------------------------------------------------------------- health and metadata

    @_rpc
    async def ServerLive(self, message, context):
        return messages.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, message, context):
        state = self.state
        return messages.ServerReadyResponse(ready=state.ready and not state.shutting_down)

    @_rpc
    async def ModelReady(self, message, context):
        # As Triton: not ready (never an error) while the server is not, or for a model or version not served.
        state = self.state
        if not state.ready or state.shutting_down:
            return messages.ModelReadyResponse(ready=False)
        try:
            lookup(state, message.name, message.version or None)
        except NotFoundError:
            return messages.ModelReadyResponse(ready=False)
        return messages.ModelReadyResponse(ready=True)

    @_rpc
    async def ServerMetadata(self, message, context):
        return messages.ServerMetadataResponse(**server_metadata(self.app.version, EXTENSIONS))

    @_rpc
    async def ModelMetadata(self, message, context):
        state = self.state
        served = lookup(state, message.name, message.version or None)  # 404 with what is served; 503 loading
        return messages.ModelMetadataResponse(**model_metadata(served, state.models.versions(message.name)))

    @_rpc
    async def RepositoryIndex(self, message, context):
        # One repository here, whatever repository_name says. What anyone may see of it, as REST without the
        # admin token: paths and load errors quote paths and library internals.
        entries = await self.app.state.lifecycle.repository_index()
        models = [
            {key: entry[key] for key in ("name", "version", "state") if key in entry}
            for entry in entries if not message.ready or entry.get("state") == "READY"
        ]
        return messages.RepositoryIndexResponse(models=models)

    # ------------------------------------------------------------------------- inference

    @_rpc
    async def ModelInfer(self, message, context):
        settings = self.state.settings

        async def read(call: Call):
            return codec.parse_infer_request(
                message, model_io(call.served), settings.max_images_per_request, settings.max_body_bytes
            )

        async def run(call: Call, parsed) -> Reply:
            served, image = call.served, parsed.input
            if image.pixels is not None:  # N views of the message's bytes: the batch is the only copy
                logits = np.stack(await call.infer(list(image.pixels)))
            else:
                name = image.name
                logits = np.stack(await call.decode_and_infer(image.encoded, lambda i: f"input {name!r} element {i}"))
            parameters = trailing = None
            if call.route is not None:  # an experiment: say which variant answered, as /classify does
                parameters = {"experiment": call.route.experiment.name, "variant": call.route.variant.name}
                trailing = (("x-variant", call.route.variant.name),)
            context.set_trailing_metadata((("x-request-id", call.echo_id),) + (trailing or ()))
            return Reply(codec.encode_infer_response(
                parsed, model_io(served), served.name, str(served.version), parsed.id or call.request_id, logits,
                parameters,
            ))

        reply = await self._serve(context, message.model_name, message.model_version or None, read, run)
        return reply.message

    async def _serve(self, context, name: str, version: str | None, read: Callable[[Call], Awaitable],
                     run: Callable[[Call, object], Awaitable[Reply]]) -> Reply:
        """``serve`` in a task of its own: grpc cancels the handler when the client cancels or its deadline
        comes, and that must reach ``serve`` as a disconnect does (the work stops, 499 or 504 is counted), not
        as a cancellation from outside, which would skip all that."""
        request = CallRequest(self.app, context)
        task = asyncio.ensure_future(serve(request, name, version, read, run, experiments=True))
        self._running.add(task)
        task.add_done_callback(self._ended)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            request.cancelled()
            raise

    def _ended(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: raised to the handler already, or nobody is left to answer
