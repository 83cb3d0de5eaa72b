"""An asyncio HTTP/1.1 load generator that posts real JPEGs to ``POST /classify/{model}``.

It shares the machine's cores with the server it measures, so it is kept light:
a minimal raw HTTP/1.1 client over ``asyncio.open_connection`` (keep-alive,
request bytes built once, the response read by its status line and
Content-Length), no HTTP library. The images are photo-like JPEGs
(500x375, quality 90) made deterministically at start; a handful of distinct
ones are cycled.

Two modes:

* closed loop (``--concurrency N``): N clients, one keep-alive connection each,
  each sending its next request as soon as the previous one is answered;
* open loop (``--rate R``): requests scheduled at R per second (Poisson or
  uniform arrivals), sent over a pool of at most ``--max-connections``
  connections. A request that cannot be sent on time (no free connection, or
  the generator itself fell behind) is still sent, as soon as it can be, and
  counted as *late*; its latency is measured from the time it was due, so a
  slow server cannot hide queueing behind the generator (no coordinated
  omission).

Both run a warm-up (not recorded), then a measured window of ``--duration``
seconds: throughput and latencies are over the responses that completed in the
window. ``/metrics`` is scraped at the start and the end of the window; the
deltas give server-side figures (mean batch size, server latency quantiles
from the histogram, stage times). A server without ``/metrics`` (the naive
baseline) simply has none.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model resnet50 --concurrency 16 --duration 20
    python -m bench.loadgen --url http://127.0.0.1:8000 --model resnet50 --rate 10 --duration 20 --json out.json

Every loop is bounded in time (warm-up + duration, plus a drain of at most the
request timeout) and in count (``--max-requests``). Only loopback targets are
accepted unless ``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import math
import random
import re
import resource
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------- images


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes, gradients and texture: compresses and decodes like a photo.

    The same recipe as the test suite's generator (tests/images.py), copied so
    the benchmark does not depend on the tests.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_jpegs(count: int = 8, width: int = 500, height: int = 375, quality: int = 90, seed: int = 0) -> list[bytes]:
    """``count`` distinct photo-like JPEGs, the same bytes on every run."""
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photo_like(width, height, seed + i).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------- HTTP/1.1 client


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


def build_request(method: str, path: str, target: Target, body: bytes = b"", content_type: str | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {target.authority}", "User-Agent: archserve-bench"]
    if content_type:
        head.append(f"Content-Type: {content_type}")
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


# ---------------------------------------------------------------------------- Prometheus metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            samples[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return samples


async def scrape(target: Target) -> Samples | None:
    try:
        status, body = await http_get(target, "/metrics")
    except (OSError, asyncio.TimeoutError, ProtocolError, asyncio.IncompleteReadError):
        return None
    if status != 200:
        return None
    return parse_metrics(body.decode("utf-8", "replace"))


def _select(samples: Samples, name: str, model: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name and ("model", model) in labels}


def _total(samples: Samples, name: str, model: str) -> float:
    return sum(_select(samples, name, model).values())


def _buckets(samples: Samples, name: str, model: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in _select(samples, name + "_bucket", model).items():
        le = dict(labels).get("le")
        if le is not None:
            bound = math.inf if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + value
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile on cumulative bucket counts: linear inside the bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        cumulative = buckets[bound]
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def server_figures(before: Samples | None, after: Samples | None, model: str) -> dict | None:
    """Deltas of archserve's metrics over the measured window."""
    if before is None or after is None:
        return None

    def delta(name: str) -> float:
        return _total(after, name, model) - _total(before, name, model)

    def hist_delta(name: str) -> dict[float, float]:
        b, a = _buckets(before, name, model), _buckets(after, name, model)
        return {k: a[k] - b.get(k, 0.0) for k in a}

    def mean_ms(name: str) -> float | None:
        count = delta(name + "_count")
        return 1000.0 * delta(name + "_sum") / count if count > 0 else None

    batches = delta("archserve_batch_size_count")
    images = delta("archserve_batch_size_sum")
    request_buckets = hist_delta("archserve_request_duration_seconds")
    quantiles = {}
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value = histogram_quantile(q, request_buckets)
        quantiles[label] = None if value is None else round(1000.0 * value, 3)
    batch_buckets = hist_delta("archserve_batch_size")
    batch_hist, below = {}, 0.0
    for bound in sorted(batch_buckets):
        count = batch_buckets[bound] - below
        below = batch_buckets[bound]
        if count > 0:
            batch_hist["+Inf" if math.isinf(bound) else f"<={int(bound)}"] = int(round(count))
    codes: dict[str, int] = {}
    for labels, value in _select(after, "archserve_requests_total", model).items():
        previous = (before or {}).get(("archserve_requests_total", labels), 0.0)
        if value - previous > 0:
            codes[dict(labels).get("code", "?")] = int(round(value - previous))
    return {
        "batches": int(round(batches)),
        "images_batched": int(round(images)),
        "mean_batch_size": round(images / batches, 3) if batches > 0 else None,
        "batch_size_histogram": batch_hist,
        "request_latency_ms": {**quantiles, "mean": _round(mean_ms("archserve_request_duration_seconds"))},
        "inference_ms_per_batch": _round(mean_ms("archserve_inference_duration_seconds")),
        "preprocess_ms_per_image": _round(mean_ms("archserve_preprocess_duration_seconds")),
        "queue_wait_ms_per_image": _round(mean_ms("archserve_queue_wait_seconds")),
        "requests_by_code": codes,
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------- load


class Recorder:
    """Responses that completed inside the measured window."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, successful responses
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.window: tuple[float, float] = (math.inf, math.inf)

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    def record(self, status: int | str, latency: float) -> None:
        if status == 200:
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.errors[str(status)] += 1


def latency_summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    arr = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {k: round(float(v), 3) for k, v in
            (("p50", p50), ("p90", p90), ("p99", p99), ("mean", arr.mean()), ("min", arr.min()), ("max", arr.max()))}


def _payloads(target: Target, model: str, images: list[bytes], top_k: int | None) -> list[bytes]:
    path = f"/classify/{model}" + (f"?top_k={top_k}" if top_k else "")
    return [build_request("POST", path, target, body, "image/jpeg") for body in images]


def _check_body(body: bytes) -> None:
    doc = json.loads(body)
    if not (isinstance(doc, dict) and (doc.get("results") or doc.get("predictions"))):
        raise ProtocolError(f"unexpected response body {body[:200]!r}")


async def _one(conn: Connection, payload: bytes, timeout: float) -> tuple[int | str, bytes]:
    try:
        async with asyncio.timeout(timeout):
            return await conn.request(payload)
    except TimeoutError:
        conn.close()
        return "timeout", b""
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, ValueError) as exc:
        conn.close()
        return f"conn:{type(exc).__name__}", b""


def _usage_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _scrape_at(target: Target, when: float) -> tuple[Samples | None, float]:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    samples = await scrape(target)
    return samples, _usage_s()


async def closed_loop(
    url: str,
    model: str,
    concurrency: int,
    duration: float,
    warmup: float = 3.0,
    images: list[bytes] | None = None,
    timeout: float = 30.0,
    max_requests: int = 200_000,
    top_k: int | None = None,
    allow_remote: bool = False,
) -> dict:
    """``concurrency`` clients back to back for ``warmup + duration`` seconds; figures over the last ``duration``."""
    target = parse_url(url, allow_remote)
    images = images or make_jpegs()
    payloads = _payloads(target, model, images, top_k)
    conns = [Connection(target) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    # One request checks that the endpoint answers what we expect before any load.
    status, body = await _one(conns[0], payloads[0], timeout)
    if status != 200:
        for c in conns:
            c.close()
        raise RuntimeError(f"POST /classify/{model} answered {status}: {body[:300]!r}")
    _check_body(body)

    rec = Recorder()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    rec.window = (measure_from, stop_at)
    issued = 0

    async def client(index: int, conn: Connection) -> None:
        nonlocal issued
        k = index
        while issued < max_requests:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            issued += 1
            status, _ = await _one(conn, payloads[k % len(payloads)], timeout)
            k += 1
            done = time.perf_counter()
            if rec.in_window(done):
                rec.record(status, done - sent)
            if not isinstance(status, int):
                await asyncio.sleep(0.01)  # connection trouble: do not spin

    scrapes = asyncio.gather(_scrape_at(target, measure_from), _scrape_at(target, stop_at))
    try:
        await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
        (before, cpu_before), (after, cpu_after) = await scrapes
    finally:
        for c in conns:
            c.close()
    return _report(
        rec, mode="closed", url=url, model=model, duration=duration, warmup=warmup, images=len(images),
        extra={"concurrency": concurrency}, before=before, after=after, cpu_s=cpu_after - cpu_before,
    )


async def open_loop(
    url: str,
    model: str,
    rate: float,
    duration: float,
    warmup: float = 3.0,
    images: list[bytes] | None = None,
    timeout: float = 30.0,
    max_requests: int = 200_000,
    arrivals: str = "poisson",
    max_connections: int = 64,
    late_ms: float = 5.0,
    seed: int = 0,
    top_k: int | None = None,
    allow_remote: bool = False,
) -> dict:
    """Requests due at ``rate`` per second; late ones are sent as soon as possible and counted."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    target = parse_url(url, allow_remote)
    images = images or make_jpegs()
    payloads = _payloads(target, model, images, top_k)
    check = Connection(target)
    status, body = await _one(check, payloads[0], timeout)
    if status != 200:
        check.close()
        raise RuntimeError(f"POST /classify/{model} answered {status}: {body[:300]!r}")
    _check_body(body)

    # The schedule, fixed in advance (seeded), bounded by time and count.
    total = warmup + duration
    offsets: list[float] = []
    rng = random.Random(seed)
    t = 0.0
    while len(offsets) < max_requests:
        t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        if t >= total:
            break
        offsets.append(t)

    idle: deque[Connection] = deque([check])
    slots = asyncio.Semaphore(max_connections)
    rec = Recorder()  # the requests due in the window, answered whenever (drain included)
    sent_latencies: list[float] = []
    completed_in_window = 0
    late = {"late": 0, "max_lateness_ms": 0.0}
    start = time.perf_counter() + 0.05
    measure_from, stop_at = start + warmup, start + total
    scheduled = sum(1 for o in offsets if warmup <= o < total)

    def due_in_window(due: float) -> bool:
        return measure_from <= due < stop_at

    async def fire(due: float, payload: bytes, sent_flag: list[bool]) -> None:
        nonlocal completed_in_window
        async with slots:
            conn = idle.pop() if idle else Connection(target)
            sent = time.perf_counter()
            sent_flag[0] = True
            if due_in_window(due):
                lateness_ms = (sent - due) * 1000.0
                late["late"] += lateness_ms > late_ms
                late["max_lateness_ms"] = max(late["max_lateness_ms"], lateness_ms)
            try:
                status, _ = await _one(conn, payload, timeout)
            except BaseException:  # cancelled at the end of the drain
                conn.close()
                raise
            done = time.perf_counter()
            if conn.is_open:
                idle.append(conn)
        if status == 200 and measure_from <= done < stop_at:
            completed_in_window += 1
        if due_in_window(due):
            rec.record(status, done - due)  # from when it was due: includes any lateness
            if status == 200:
                sent_latencies.append(done - sent)

    tasks: dict[asyncio.Task, tuple[float, list[bool]]] = {}  # not finished -> (when due, [sent yet])
    scrapes = asyncio.gather(_scrape_at(target, measure_from), _scrape_at(target, stop_at))
    try:
        for i, offset in enumerate(offsets):
            due = start + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            flag = [False]
            task = asyncio.ensure_future(fire(due, payloads[i % len(payloads)], flag))
            tasks[task] = (due, flag)
            task.add_done_callback(lambda t: tasks.pop(t, None))
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        (before, cpu_before), (after, cpu_after) = await scrapes
        if tasks:  # drain: at most one request timeout, then give up on the rest
            _, pending = await asyncio.wait(set(tasks), timeout=timeout + 1.0)
            for task in pending:
                due, flag = tasks.get(task, (0.0, [True]))
                if due_in_window(due):
                    rec.errors["unfinished"] += 1  # due in the window, never answered
                    late["late"] += not flag[0]  # and never even sent
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for c in idle:
            c.close()
    report = _report(
        rec, mode="open", url=url, model=model, duration=duration, warmup=warmup, images=len(images),
        extra={"rate": rate, "arrivals": arrivals, "max_connections": max_connections}, before=before, after=after,
        cpu_s=cpu_after - cpu_before,
    )
    # Open loop: requests/errors/latency are over the requests due in the window; throughput is the
    # successful responses that arrived inside it.
    report["throughput_img_s"] = round(completed_in_window / duration, 3)
    report["late"] = {"late": late["late"], "scheduled": scheduled, "threshold_ms": late_ms,
                      "max_lateness_ms": round(late["max_lateness_ms"], 3)}
    report["latency_ms_from_send"] = latency_summary(sent_latencies)
    return report


def _report(rec: Recorder, *, mode, url, model, duration, warmup, images, extra, before, after, cpu_s) -> dict:
    requests = rec.ok + sum(rec.errors.values())
    return {
        "mode": mode,
        "url": url,
        "model": model,
        **extra,
        "duration_s": duration,
        "warmup_s": warmup,
        "distinct_images": images,
        "requests": requests,
        "ok": rec.ok,
        "errors": dict(rec.errors),
        "throughput_img_s": round(rec.ok / duration, 3),
        "latency_ms": latency_summary(rec.latencies),
        "server": server_figures(before, after, model),
        "loadgen_cpu_cores": round(cpu_s / duration, 3),
    }


def run_async(coro):
    """Run on uvloop when it is installed (lighter), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------- CLI


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    shape = f"{r['concurrency']} clients" if r["mode"] == "closed" else f"{r['rate']:g} req/s {r['arrivals']}"
    lines = [
        f"{r['model']} @ {r['url']} ({r['mode']} loop, {shape}, {r['duration_s']:g}s after {r['warmup_s']:g}s warm-up)",
        f"  requests {r['requests']}  ok {r['ok']}  errors {r['errors'] or 'none'}",
        f"  throughput {r['throughput_img_s']:.2f} img/s   loadgen CPU {r['loadgen_cpu_cores']:.2f} cores",
        "  latency ms (client): p50 {p50} p90 {p90} p99 {p99} mean {mean}".format(**lat),
    ]
    if r["mode"] == "open":
        lines.append(f"  late: {r['late']['late']} of {r['late']['scheduled']} sent > {r['late']['threshold_ms']:g} ms "
                     f"after due (max {r['late']['max_lateness_ms']:.1f} ms)")
    s = r.get("server")
    if s:
        sl = s["request_latency_ms"]
        lines.append(f"  server: mean batch {s['mean_batch_size']} over {s['batches']} batches "
                     f"{s['batch_size_histogram']}")
        lines.append(f"  server latency ms (histogram): p50 {sl['p50']} p90 {sl['p90']} p99 {sl['p99']} "
                     f"mean {sl['mean']}")
        lines.append(f"  server stages ms: preprocess/img {s['preprocess_ms_per_image']}  queue wait/img "
                     f"{s['queue_wait_ms_per_image']}  inference/batch {s['inference_ms_per_batch']}")
    else:
        lines.append("  server: no /metrics")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="resnet50")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: concurrent clients (default 16)")
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson", help="open loop arrivals")
    p.add_argument("--max-connections", type=int, default=64, help="open loop: connection pool size")
    p.add_argument("--late-ms", type=float, default=5.0, help="open loop: sent later than this after due = late")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds first (default 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    p.add_argument("--max-requests", type=int, default=200_000, help="upper bound on requests sent")
    p.add_argument("--images", type=int, default=8, help="distinct JPEGs to cycle (default 8)")
    p.add_argument("--top-k", type=int, help="top_k query parameter (default: the server's)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--json", help="write the report to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0:
        print("error: --duration must be in (0, 3600] and --warmup >= 0", file=sys.stderr)
        return 2
    images = make_jpegs(args.images)
    common = dict(url=args.url, model=args.model, duration=args.duration, warmup=args.warmup, images=images,
                  timeout=args.timeout, max_requests=args.max_requests, top_k=args.top_k,
                  allow_remote=args.allow_remote)
    if args.rate is not None:
        coro = open_loop(rate=args.rate, arrivals=args.arrivals, max_connections=args.max_connections,
                         late_ms=args.late_ms, **common)
    else:
        coro = closed_loop(concurrency=args.concurrency or 16, **common)
    try:
        report = run_async(coro)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
