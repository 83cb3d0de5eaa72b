"""A minimal HTTP/1.1 client over ``asyncio.open_connection``, for loopback benchmarks.

It shares the machine's cores with the server it measures, so it is kept
light: keep-alive, request bytes built once by the caller, the response read by
its status line and Content-Length (or chunks), no HTTP library.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The server's response could not be parsed as HTTP/1.1."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


def parse_url(url: str, allow_remote: bool = False) -> Target:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise SystemExit(f"error: only http:// URLs are supported, got {url!r}")
    host = parts.hostname or "127.0.0.1"
    if not allow_remote:
        loopback = host == "localhost"
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if not loopback:
            raise SystemExit(f"error: {host} is not a loopback address; pass --allow-remote to load another host")
    return Target(host, parts.port or 80)


def build_request(
    method: str, path: str, target: Target, body: bytes = b"", content_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {target.authority}", "User-Agent: archserve-bench"]
    if content_type:
        head.append(f"Content-Type: {content_type}")
    head.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    if body or method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @property
    def is_open(self) -> bool:
        return self.writer is not None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """Send prebuilt request bytes; return (status, body). Reconnects first if needed.

        A kept-alive connection the server closed while idle (uvicorn's
        keep-alive timeout) is reopened and the request sent again, once.
        """
        if self.reader is not None and self.reader.at_eof():
            self.close()
        reused = self.writer is not None
        try:
            return await self._exchange(payload)
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
        return await self._exchange(payload)

    async def _exchange(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(payload)
            if len(payload) > 65536:
                await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, length, chunked, close = _parse_head(head)
            if chunked:
                body = await _read_chunked(self.reader)
            elif length is not None:
                body = await self.reader.readexactly(length) if length else b""
            else:  # no length: the body runs to the end of the connection
                body = await self.reader.read()
                close = True
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, body


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    lines = head.split(b"\r\n")
    status_line = lines[0]
    if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
        raise ProtocolError(f"bad status line {status_line[:60]!r}")
    status = int(status_line[9:12])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def http_get(target: Target, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = Connection(target)
    try:
        async with asyncio.timeout(timeout):
            return await conn.request(build_request("GET", path, target))
    finally:
        conn.close()


def run_async(coro):
    """Run on uvloop when it is installed (lighter), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
