"""One log format for every process and logger (ours and uvicorn's), text or JSON, and the request's id in
every line about a request.

``RequestLogMiddleware`` opens a ``RequestLog`` for each HTTP request (its id is the caller's valid
``X-Request-ID`` or a new one, echoed in the response header), keeps it in a context variable for the
request's task, and writes the access log line when the response ends. The data plane fills in the model
and version on the same object; ``RequestFilter`` copies them onto every record logged meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

LEVELS = ("critical", "error", "warning", "info", "debug")
FORMATS = ("text", "json")
ACCESS_LOGGER = "archserve.access"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # echoed in a header and in logs: no spaces, no newlines
_FIELDS = ("request_id", "model", "version", "status", "duration_ms")


@dataclass(eq=False)
class RequestLog:
    """What the logs say about one request; the data plane sets ``model`` and ``version`` once it knows them."""

    request_id: str
    given: bool  # the id is the caller's X-Request-ID (else ours)
    model: str | None = None
    version: str | None = None


CURRENT: ContextVar[RequestLog | None] = ContextVar("archserve_request", default=None)


def client_request_id(value: str | None) -> str | None:
    return value if value and _VALID_ID.match(value) else None


def new_request_log(header: str | None) -> RequestLog:
    """A request's log context: the caller's X-Request-ID when valid, else a new id of ours."""
    given = client_request_id(header)
    return RequestLog(given or uuid.uuid4().hex, given is not None)


class RequestLogMiddleware:
    """Pure ASGI (no task of its own), so the context variable is the request task's and every line the
    request's handlers log carries its id."""

    def __init__(self, app, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled  # the access log line; the id and the header are always there
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope.get("headers") or () if k == b"x-request-id"), None)  # lower-case in ASGI
        entry = new_request_log(header.decode("latin-1") if header is not None else None)
        token = CURRENT.set(entry)
        started = time.monotonic()
        status = 500  # what the client gets if the app fails before it answers (the server's error handler)

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if not any(k.lower() == b"x-request-id" for k, _ in message.get("headers", ())):
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", entry.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                ms = (time.monotonic() - started) * 1000
                self.log.info('%s "%s %s" %d %.1f ms', _peer(scope), scope.get("method", ""), scope.get("path", ""),
                              status, ms, extra={"status": status, "duration_ms": round(ms, 3)})
            CURRENT.reset(token)


def _peer(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class RequestFilter(logging.Filter):
    """Puts the current request's id, model and version on a record (unless the record already has them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        entry = CURRENT.get()
        if entry is not None:
            for name in ("request_id", "model", "version"):
                if getattr(record, name, None) is None:
                    setattr(record, name, getattr(entry, name))
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            return line
        model = getattr(record, "model", None)
        where = f" model={model} version={getattr(record, 'version', None)}" if model else ""
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [request_id={request_id}{where}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what a log pipeline (Loki, Elasticsearch, Cloud Logging) indexes."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)  # one string: still one line of JSON
        return json.dumps(out, default=str)


JsonFormatter.converter = time.gmtime  # the "Z" above: UTC
TextFormatter.converter = time.localtime


def config(level: str, fmt: str) -> dict:
    """``logging.config.dictConfig`` for every process: uvicorn applies it in each worker it starts
    (``log_config``), the supervisor and the engine process call ``configure``."""
    formatter = "service.logs.JsonFormatter" if fmt == "json" else "service.logs.TextFormatter"
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request": {"()": "service.logs.RequestFilter"}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {"stderr": {"()": "service.logs.stderr_handler", "json": fmt == "json",
                                "formatter": "default", "filters": ["request"]}},
        "root": {"handlers": ["stderr"], "level": level},
        # uvicorn's loggers keep no handlers of their own: one stream, one format. Its access log is off
        # (ours, archserve.access, has the request id and the duration).
        "loggers": {name: {"handlers": [], "propagate": True, "level": level}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", ACCESS_LOGGER)},
    }


_ORT_LEVELS = {"E": logging.ERROR, "W": logging.WARNING, "I": logging.INFO, "V": logging.DEBUG, "F": logging.CRITICAL}
_NATIVE = re.compile(r"^(?:\x1b\[[0-9;]*m)?(?:\S+ \S+ )?\[([EWIVF]):(\w+)[^\]]*\] ?(.*?)(?:\x1b\[m)?$")
_captured: list = []  # the stream on the real stderr, once this process's fd 2 is a pipe to the reader


def stderr_handler(json: bool = False) -> logging.Handler:
    """A handler on stderr. With JSON, what native code writes to fd 2 directly (onnxruntime's C++ logger,
    CUDA) would break one object per line: fd 2 becomes a pipe whose lines a thread logs as records, and
    the handler writes to the real stderr. Lines that are already JSON (a child process's, which inherits
    the pipe as its fd 2) pass through unchanged."""
    if not json:
        return logging.StreamHandler(sys.stderr)
    if not _captured:
        real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        _captured.append(real)
        threading.Thread(target=_relay, args=(read, real), name="archserve-stderr", daemon=True).start()
    return logging.StreamHandler(_captured[0])


def _relay(fd: int, real) -> None:
    with os.fdopen(fd, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if line.startswith("{"):
                real.write(line + "\n")  # a child process's record
            elif line.strip():
                match = _NATIVE.match(line)
                if match:  # onnxruntime's "[W:onnxruntime:Default, file.cc:12 fn] message"
                    logging.getLogger(match.group(2)).log(_ORT_LEVELS[match.group(1)], match.group(3))
                else:
                    logging.getLogger("stderr").warning(line)


def configure(level: str, fmt: str) -> None:
    import logging.config

    logging.config.dictConfig(config(level, fmt))
