"""The HTTP connection: uvicorn's httptools protocol with the limits a public server needs.

uvicorn (with httptools) bounds neither the request head nor the time to send it: one connection sending
a 100 MB header makes httptools grow its buffer by concatenation, stalling the event loop for seconds.
This protocol, given to uvicorn as ``http=``, keeps httptools' parser and adds:

- **Head limits.** Request line and headers above ``max_header_bytes``, or more than ``max_header_count``
  headers, are answered 431 and the connection closed. The bytes are counted as they arrive, so an
  oversized head is refused after at most one read past the limit, never buffered whole.
- **Head timeout** (slowloris). A connection has ``header_timeout_s`` from its first byte of a request (or
  from connecting) to finish that request's head; then it gets a 408 and is closed.
- **Lingering close.** A response sent before the request body was read (a 404, a 413) says
  ``Connection: close``; the connection then stops writing and reads and discards what the client is still
  sending, so the client can finish and read the answer instead of getting a reset.
- **Shutdown that answers.** When the graceful-shutdown period is about to end, every request whose
  response has not started is cancelled and answered 503 ``shutting_down`` with ``Retry-After``, before
  uvicorn would cancel it into a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("archserve.http")

# A lingering connection is closed once the client stops sending for this long, or after LINGER_MAX_S.
LINGER_IDLE_S = 2.0
LINGER_MAX_S = 10.0
# Slack for the request line's method and version, which httptools reports apart from the URL.
_REQUEST_LINE_SLACK = 32


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    header_timeout_s: float = 10.0


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and re-raises it wrapped."""


def _error(status: int, reason: str, message: str, code: str, extra: tuple[bytes, ...] = ()) -> bytes:
    body = json.dumps({"error": message, "code": code}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _LingeringTransport:
    """The connection's transport, whose ``close()`` lingers while the request body is still arriving."""

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedHttpToolsProtocol") -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._protocol.lingering:
            return
        if self._protocol.body_pending() and self._transport.can_write_eof() and not self._transport.is_closing():
            self._protocol.start_lingering()
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "archserve_limits", None) or ConnectionLimits()
        self.lingering = False
        self._in_head = True  # between a message's start (or the connection's) and the end of its headers
        self._head_bytes = 0
        self._head_count = 0
        self._began_in_chunk = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_until = 0.0
        self._raw_transport: asyncio.Transport | None = None

    # Connection
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        super().connection_made(_LingeringTransport(transport, self))
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._linger_timer_reset()
            return  # the answer is sent; what the client still sends is read only to be dropped
        self._unset_keepalive_if_required()
        self._began_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge) or isinstance(exc.__cause__, _HeadTooLarge):
                self._refuse_head(str(exc.__context__ or exc.__cause__))
                return
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        # A chunk wholly inside a head counts whole; one where a message began may hold an earlier message's
        # tail, so it is left to the exact count at the end of the head.
        if self._in_head and not self._began_in_chunk:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head(f"the request head exceeds {self.limits.max_header_bytes} bytes")

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _refuse_head(self, why: str) -> None:
        log.warning("431 to %s: %s", _peer(self.client), why)
        self._send_and_close(_error(431, "Request Header Fields Too Large", why, "headers_too_large"), linger=True)

    def _send_and_close(self, data: bytes, linger: bool) -> None:
        self._cancel_timers()
        self._in_head = False
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if linger and self._raw_transport.can_write_eof():
            self.start_lingering()
        else:
            self._raw_transport.close()

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._began_in_chunk = True, True
        self._head_bytes = self._head_count = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        if self._head_count > self.limits.max_header_count:
            raise _HeadTooLarge(f"the request has more than {self.limits.max_header_count} headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + _REQUEST_LINE_SLACK + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            raise _HeadTooLarge(f"the request head exceeds {self.limits.max_header_bytes} bytes")
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    # Head timeout
    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its own deadline applies
        if self._head_bytes or getattr(self, "url", b"") or self.headers:
            why = f"the request head did not arrive within {self.limits.header_timeout_s:g} s"
            log.warning("408 to %s: %s", _peer(self.client), why)
            self._send_and_close(_error(408, "Request Timeout", why, "header_timeout"), linger=False)
        else:
            self._raw_transport.close()  # connected and sent nothing

    # Lingering close
    def body_pending(self) -> bool:
        return self.cycle is not None and self.cycle.more_body and not self._in_head

    def start_lingering(self) -> None:
        self.lingering = True
        self._cancel_timers()
        self._linger_until = self.loop.time() + LINGER_MAX_S
        self._raw_transport.write_eof()  # the answer is flushed, then FIN: the client reads it
        self._raw_transport.resume_reading()
        self._linger_timer_reset()

    def _linger_timer_reset(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        delay = min(LINGER_IDLE_S, self._linger_until - self.loop.time())
        self._linger_timer = self.loop.call_later(max(0.0, delay), self._raw_transport.close)

    def eof_received(self) -> bool | None:
        if self.lingering:
            self._raw_transport.close()
        return None

    # Requests
    def _start_asgi_task(self, cycle: RequestResponseCycle, app) -> None:
        super()._start_asgi_task(cycle, _Guarded(app, cycle, self))

    def shutdown(self) -> None:
        _arm_shutdown_answers(self)
        super().shutdown()


class _Guarded:
    """The app, for one request: ``Connection: close`` on an answer sent before the body was read, and a 503
    instead of uvicorn's 500 when the request is cancelled at the end of a graceful shutdown."""

    def __init__(self, app, cycle: RequestResponseCycle, protocol: GuardedHttpToolsProtocol) -> None:
        self.app, self.cycle, self.protocol = app, cycle, protocol

    async def __call__(self, scope, receive, send) -> None:
        cycle = self.cycle
        cycle.archserve_task = asyncio.current_task()

        async def guarded_send(message) -> None:
            if message["type"] == "http.response.start" and self.protocol.body_pending():
                message = dict(message, headers=[*message.get("headers", ()), (b"connection", b"close")])
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except asyncio.CancelledError:
            if not _shutting_down.get(self.protocol.server_state, False):
                raise
            asyncio.current_task().uncancel()
            if cycle.response_started or cycle.disconnected:
                self.protocol.transport.close()
                return
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]})
            body = json.dumps({"error": "the server shut down before this request finished; retry on another "
                                        "replica", "code": "shutting_down"}).encode()
            await send({"type": "http.response.body", "body": body})


# server_state -> True once its shutdown began; one timer per server answers every unfinished request.
_shutting_down: dict = {}


def _arm_shutdown_answers(protocol: GuardedHttpToolsProtocol) -> None:
    state = protocol.server_state
    if state in _shutting_down:
        return
    _shutting_down[state] = True
    grace = protocol.config.timeout_graceful_shutdown
    if grace is None:
        return  # no grace limit: uvicorn waits for every request
    # uvicorn cancels at grace + 0.1 s; answer a little before, so each task has time to write its 503.
    protocol.loop.call_later(max(0.0, grace - min(0.25, grace / 4)), _answer_unfinished, state)


def _answer_unfinished(state) -> None:
    cancelled = 0
    for connection in list(state.connections):
        cycle = getattr(connection, "cycle", None)
        task = getattr(cycle, "archserve_task", None)
        if cycle is not None and task is not None and not cycle.response_started and not task.done():
            task.cancel(msg="graceful shutdown period over")
            cancelled += 1
        for queued, _app in list(getattr(connection, "pipeline", ())):
            queued.keep_alive = False
    if cancelled:
        log.warning("graceful shutdown period over: %d unfinished request(s) answered 503", cancelled)


def _peer(client) -> str:
    return "%s:%d" % client if client else "a client"
