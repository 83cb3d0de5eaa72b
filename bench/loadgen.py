"""An asyncio HTTP/1.1 load generator for archserve: JPEGs to ``POST /classify/{model}``, or pixels to the v2 endpoint.

It shares the machine's cores with the server it measures, so it is kept light:
a minimal raw HTTP/1.1 client over ``asyncio.open_connection`` (keep-alive,
request bytes built once per distinct payload, the response read by its status
line and Content-Length), no HTTP library.

Two protocols (``--protocol``):

* ``classify`` (default): photo-like JPEGs (``--size``, default 500x375,
  quality 90) made deterministically at start, a handful of distinct ones
  cycled, each as the raw body of ``POST /classify/{model}``; with
  ``--batch B`` > 1, B of them per request as multipart/form-data (field
  ``image``);
* ``v2``: the Open Inference Protocol (KServe v2) with Triton's binary tensor
  data and classification extensions: ``POST /v2/models/{model}/infer`` with a
  UINT8 ``[B, H, W, 3]`` tensor (preprocessed pixels at the model's crop size,
  read once from ``GET /v2/models/{model}``; a few distinct random arrays,
  seeded) after the JSON header, top-5 answered as JSON strings. No decoding
  on the server: what the batcher and the engine alone cost over HTTP.

Throughput counts images (successful requests x images per request);
latencies are per request.

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
    python -m bench.loadgen --model resnet50 --size 4032x3024 --concurrency 4
    python -m bench.loadgen --model resnet50 --protocol v2 --batch 8 --concurrency 4

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
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------- images


_NOISE_TILE = 1024  # the noise is drawn for at most this many rows and columns, then repeated
_MAX_PIXELS = 50_000_000  # --size bound: the client shares the machine with the server


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes, gradients and texture: compresses and decodes like a photo.

    The same recipe as the test suite's generator (tests/images.py), copied so
    the benchmark does not depend on the tests, and the same pixels up to
    1024x1024. Larger images (a 4032x3024 phone photo) are rendered in bands,
    and their Gaussian noise is one 1024x1024 tile repeated: drawing it per
    pixel is most of the cost, and a repeat every 1024 pixels changes neither
    the JPEG's size nor its decoding cost (JPEG codes each 8x8 block on its
    own). About 0.5 s for a 12-megapixel image (JPEG included) instead of 2.5 s.
    """
    rng = np.random.default_rng(seed)  # drawn in the same order as tests/images.py
    waves = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        waves.append((fx, fy, phase))
    discs = []
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        discs.append((cx, cy, r, rng.uniform(0, 255, 3)))
    tile_h, tile_w = min(height, _NOISE_TILE), min(width, _NOISE_TILE)
    noise = rng.normal(0, 12, (tile_h, tile_w, 3))
    xx = np.arange(width, dtype=np.float32)[None, :]
    out = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, tile_h):  # one band of rows at a time: bounded memory
        y1 = min(height, y0 + tile_h)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        img = np.empty((y1 - y0, width, 3), np.float32)
        for c, (fx, fy, phase) in enumerate(waves):
            img[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
        for cx, cy, r, colour in discs:  # each disc only within its bounding box
            xa, xb = max(0, int(cx - r) - 1), min(width, int(cx + r) + 2)
            ya, yb = max(y0, int(cy - r) - 1), min(y1, int(cy + r) + 2)
            if xa < xb and ya < yb:
                mask = (xx[:, xa:xb] - cx) ** 2 + (yy[ya - y0:yb - y0] - cy) ** 2 < r * r
                img[ya - y0:yb - y0, xa:xb][mask] = colour
        for x0 in range(0, width, tile_w):
            x1 = min(width, x0 + tile_w)
            img[:, x0:x1] += noise[:y1 - y0, :x1 - x0]
        out[y0:y1] = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def make_jpegs(count: int = 8, width: int = 500, height: int = 375, quality: int = 90, seed: int = 0) -> list[bytes]:
    """``count`` distinct photo-like JPEGs, the same bytes on every run."""
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photo_like(width, height, seed + i).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (e.g. ``4032x3024``) as ``(width, height)``; ``argparse`` type for ``--size``."""
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT in pixels, e.g. 4032x3024; got {text!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if not (1 <= width <= 65_500 and 1 <= height <= 65_500):  # JPEG's limit on each side
        raise argparse.ArgumentTypeError(f"each side must be 1 to 65500 pixels; got {text!r}")
    if width * height > _MAX_PIXELS:
        raise argparse.ArgumentTypeError(
            f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the {_MAX_PIXELS / 1e6:.0f} allowed"
        )
    return width, height


def random_pixels(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct uint8 ``[H, W, 3]`` arrays, the same on every run (v2 pixel inputs)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


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
        "alone_batches": int(round(delta("archserve_alone_batches_total"))),
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


# ---------------------------------------------------------------------------- workloads

PROTOCOLS = ("classify", "v2")
V2_HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
MULTIPART_FIELD = "image"  # /classify takes any file field; its documentation names this one


@dataclass(frozen=True)
class Workload:
    """What the requests carry: prebuilt request bytes (cycled), and how to check the first answer."""

    protocol: str
    path: str
    payloads: list[bytes]
    images_per_request: int
    size: str  # "WxH" of each image sent: the JPEGs', or the v2 tensor's (the model's crop size)
    distinct_images: int
    check: Callable[[bytes], None]  # raises ProtocolError when the body is not the expected answer


def _groups(count: int, batch: int) -> list[list[int]]:
    """``batch`` indices per request, cycling ``count`` distinct items; as many requests as there are different ones."""
    return [[(j * batch + i) % count for i in range(batch)] for j in range(count // math.gcd(count, batch))]


def _image_size(data: bytes) -> str:
    try:
        width, height = Image.open(io.BytesIO(data)).size  # the header only
    except Exception:
        return "?"
    return f"{width}x{height}"


def _multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    out = []
    for filename, data in parts:
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{MULTIPART_FIELD}"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode("latin-1") + data + b"\r\n"
        )
    out.append(f"--{boundary}--\r\n".encode("latin-1"))
    return b"".join(out)


def _boundary(images: list[bytes]) -> str:
    for n in range(1000):
        boundary = f"archserve-bench-boundary-{n:03d}"
        if not any(boundary.encode() in data for data in images):
            return boundary
    raise ValueError("no multipart boundary found that the images do not contain")


def classify_workload(
    target: Target, model: str, images: list[bytes], batch: int = 1, top_k: int | None = None
) -> Workload:
    """``POST /classify/{model}``: one JPEG as the raw body, or ``batch`` > 1 of them as multipart/form-data."""
    if not images:
        raise ValueError("no images to send")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    path = f"/classify/{model}" + (f"?top_k={top_k}" if top_k else "")
    if batch == 1:
        payloads = [build_request("POST", path, target, body, "image/jpeg") for body in images]
    else:
        boundary = _boundary(images)
        content_type = f"multipart/form-data; boundary={boundary}"
        payloads = [
            build_request("POST", path, target, _multipart([(f"img{k}.jpg", images[k]) for k in group], boundary),
                          content_type)
            for group in _groups(len(images), batch)
        ]

    def check(body: bytes) -> None:
        doc = _json(body)
        if not (isinstance(doc, dict) and (doc.get("results") or doc.get("predictions"))):
            raise ProtocolError(f"unexpected response body {body[:200]!r}")
        if batch > 1 and len(doc.get("results") or []) != batch:
            raise ProtocolError(f"{batch} images sent but {len(doc.get('results') or [])} results: {body[:200]!r}")

    return Workload("classify", path, payloads, batch, _image_size(images[0]), len(images), check)


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        raise ProtocolError(f"the response is not JSON: {body[:200]!r}") from None


def _error_text(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return repr(body[:300])
    if isinstance(doc, dict) and isinstance(doc.get("error") or doc.get("detail"), str):
        return doc.get("error") or doc.get("detail")
    return repr(body[:300])


async def v2_model_io(target: Target, model: str, timeout: float = 10.0) -> dict:
    """The model's input name, crop size and output name, from ``GET /v2`` and ``GET /v2/models/{model}``.

    Raises RuntimeError, saying what is missing, when the server does not speak the Open
    Inference Protocol with the binary tensor data and classification extensions, or does not
    serve ``model`` with one UINT8 ``[N, H, W, 3]`` input.
    """
    status, body = await http_get(target, "/v2", timeout)
    if status != 200:
        raise RuntimeError(
            f"the server at {target.authority} has no Open Inference Protocol (KServe v2) endpoint: GET /v2 "
            f"answered {status}; use --protocol classify"
        )
    server = _json(body)
    extensions = server.get("extensions") if isinstance(server, dict) else None
    if isinstance(extensions, list):
        missing = [e for e in ("binary_tensor_data", "classification") if e not in extensions]
        if missing:
            raise RuntimeError(
                f"the server's v2 endpoint lacks the {' and '.join(missing)} extension(s) --protocol v2 uses "
                f"(it lists {extensions})"
            )
    path = f"/v2/models/{model}"
    status, body = await http_get(target, path, timeout)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {_error_text(body)}")
    doc = _json(body)
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(outputs, list) and outputs):
        raise RuntimeError(f"GET {path}: expected one input and an output in the metadata, got {body[:300]!r}")
    shape, datatype = inputs[0].get("shape"), inputs[0].get("datatype")
    if not (datatype == "UINT8" and isinstance(shape, list) and len(shape) == 4 and shape[3] == 3
            and all(isinstance(d, int) and d > 0 for d in shape[1:3])):
        raise RuntimeError(
            f"model {model!r} takes {datatype} {shape}; --protocol v2 sends UINT8 pixels [B, H, W, 3]"
        )
    return {"input": inputs[0]["name"], "height": shape[1], "width": shape[2], "output": outputs[0]["name"],
            "batch_dim": shape[0]}


def v2_workload(
    target: Target, model: str, io_: dict, batch: int = 1, distinct: int = 8, top_k: int | None = None
) -> Workload:
    """``POST /v2/models/{model}/infer``: a UINT8 ``[batch, H, W, 3]`` tensor as binary data, top-k back as JSON.

    ``io_`` is :func:`v2_model_io`'s answer. The classification extension answers
    ``[batch, k]`` strings ``"<logit>:<index>:<label>"`` in the response JSON
    (not binary: the request asks for no binary output).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if distinct < 1:
        raise ValueError(f"distinct must be >= 1, got {distinct}")
    fixed = io_.get("batch_dim", -1)
    if isinstance(fixed, int) and fixed > 0 and fixed != batch:
        raise RuntimeError(f"model {model!r} takes batches of exactly {fixed}; pass --batch {fixed}")
    k = top_k or 5
    height, width = io_["height"], io_["width"]
    arrays = random_pixels(distinct, height, width)
    path = f"/v2/models/{model}/infer"
    payloads = []
    for group in _groups(distinct, batch):
        tensor = b"".join(arrays[i].tobytes() for i in group)
        header = json.dumps({
            "inputs": [{"name": io_["input"], "shape": [batch, height, width, 3], "datatype": "UINT8",
                        "parameters": {"binary_data_size": len(tensor)}}],
            "outputs": [{"name": io_["output"], "parameters": {"classification": k}}],
        }, separators=(",", ":")).encode()
        payloads.append(build_request("POST", path, target, header + tensor, "application/octet-stream",
                                      {V2_HEADER_LENGTH: str(len(header))}))

    def check(body: bytes) -> None:
        doc = _json(body)
        outs = doc.get("outputs") if isinstance(doc, dict) else None
        out = outs[0] if isinstance(outs, list) and len(outs) == 1 and isinstance(outs[0], dict) else {}
        data = out.get("data")
        if not (out.get("datatype") == "BYTES" and out.get("shape") == [batch, k] and isinstance(data, list)
                and len(data) == batch * k):
            raise ProtocolError(f"expected {batch}x{k} classification strings, got {body[:300]!r}")

    return Workload("v2", path, payloads, batch, f"{width}x{height}", distinct, check)


async def make_workload(
    target: Target, model: str, protocol: str = "classify", batch: int = 1, images: list[bytes] | None = None,
    distinct: int | None = None, top_k: int | None = None, timeout: float = 10.0,
) -> Workload:
    """The requests to send. classify: ``images`` (default: 8 photo-like 500x375 JPEGs); v2: ``distinct``
    random arrays at the model's crop size (default: as many as ``images``, else 8), from its metadata."""
    if protocol == "classify":
        return classify_workload(target, model, images or make_jpegs(distinct or 8), batch, top_k)
    if protocol == "v2":
        io_ = await v2_model_io(target, model, min(timeout, 10.0))
        return v2_workload(target, model, io_, batch, distinct or (len(images) if images else 8), top_k)
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def _check_first(workload: Workload, status: int | str, body: bytes) -> None:
    """The first request, before any load: the endpoint must answer what we expect."""
    if status != 200:
        raise RuntimeError(f"POST {workload.path} answered {status}: {_error_text(body) if body else ''}")
    try:
        workload.check(body)
    except ProtocolError as exc:
        raise RuntimeError(f"POST {workload.path}: {exc}") from None


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
    protocol: str = "classify",
    batch: int = 1,
    distinct: int | None = None,
) -> dict:
    """``concurrency`` clients back to back for ``warmup + duration`` seconds; figures over the last ``duration``.

    ``protocol``: ``classify`` (JPEGs to ``/classify``; ``batch`` > 1 as multipart) or ``v2``
    (``batch`` pixel arrays per request to ``/v2/models/{model}/infer``); see :func:`make_workload`.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    target = parse_url(url, allow_remote)
    workload = await make_workload(target, model, protocol, batch, images, distinct, top_k, timeout)
    payloads = workload.payloads
    conns = [Connection(target) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(c.open() for c in conns))
        # One request checks that the endpoint answers what we expect before any load.
        status, body = await _one(conns[0], payloads[0], timeout)
        _check_first(workload, status, body)
    except BaseException:
        for c in conns:
            c.close()
        raise

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
        rec, mode="closed", url=url, model=model, duration=duration, warmup=warmup, workload=workload,
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
    protocol: str = "classify",
    batch: int = 1,
    distinct: int | None = None,
) -> dict:
    """Requests due at ``rate`` per second; late ones are sent as soon as possible and counted.

    ``rate`` counts requests (of ``batch`` images each); ``protocol`` and ``batch`` as for :func:`closed_loop`.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    target = parse_url(url, allow_remote)
    workload = await make_workload(target, model, protocol, batch, images, distinct, top_k, timeout)
    payloads = workload.payloads
    check = Connection(target)
    try:
        status, body = await _one(check, payloads[0], timeout)
        _check_first(workload, status, body)
    except BaseException:
        check.close()
        raise

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
        rec, mode="open", url=url, model=model, duration=duration, warmup=warmup, workload=workload,
        extra={"rate": rate, "arrivals": arrivals, "max_connections": max_connections}, before=before, after=after,
        cpu_s=cpu_after - cpu_before,
    )
    # Open loop: requests/errors/latency are over the requests due in the window; throughput is the
    # successful responses that arrived inside it.
    report["throughput_img_s"] = round(completed_in_window * workload.images_per_request / duration, 3)
    report["throughput_req_s"] = round(completed_in_window / duration, 3)
    report["late"] = {"late": late["late"], "scheduled": scheduled, "threshold_ms": late_ms,
                      "max_lateness_ms": round(late["max_lateness_ms"], 3)}
    report["latency_ms_from_send"] = latency_summary(sent_latencies)
    return report


def _report(rec: Recorder, *, mode, url, model, duration, warmup, workload, extra, before, after, cpu_s) -> dict:
    requests = rec.ok + sum(rec.errors.values())
    per_request = workload.images_per_request
    return {
        "mode": mode,
        "url": url,
        "model": model,
        "protocol": workload.protocol,
        "size": workload.size,
        "batch": per_request,
        **extra,
        "duration_s": duration,
        "warmup_s": warmup,
        "distinct_images": workload.distinct_images,
        "images_per_request": per_request,
        "requests": requests,
        "ok": rec.ok,
        "images_ok": rec.ok * per_request,
        "errors": dict(rec.errors),
        "throughput_img_s": round(rec.ok * per_request / duration, 3),  # images, not requests
        "throughput_req_s": round(rec.ok / duration, 3),
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
    per_request = r.get("images_per_request", 1)
    what = "JPEG" if r.get("protocol", "classify") == "classify" else "UINT8 pixels"
    if r.get("protocol") == "classify" and per_request > 1:
        what += ", multipart"
    lines = [
        f"{r['model']} @ {r['url']} ({r['mode']} loop, {shape}, {r['duration_s']:g}s after {r['warmup_s']:g}s warm-up)",
        f"  protocol {r.get('protocol', 'classify')}: {per_request} image(s) per request, {r.get('size', '?')} "
        f"{what}",
        f"  requests {r['requests']}  ok {r['ok']} ({r.get('images_ok', r['ok'])} images)  "
        f"errors {r['errors'] or 'none'}",
        f"  throughput {r['throughput_img_s']:.2f} img/s ({r.get('throughput_req_s', r['throughput_img_s']):.2f} "
        f"req/s)   loadgen CPU {r['loadgen_cpu_cores']:.2f} cores",
        "  latency ms (client): p50 {p50} p90 {p90} p99 {p99} mean {mean}".format(**lat),
    ]
    if r["mode"] == "open":
        lines.append(f"  late: {r['late']['late']} of {r['late']['scheduled']} sent > {r['late']['threshold_ms']:g} ms "
                     f"after due (max {r['late']['max_lateness_ms']:.1f} ms)")
    s = r.get("server")
    if s:
        sl = s["request_latency_ms"]
        lines.append(f"  server: mean batch {s['mean_batch_size']} over {s['batches']} batches "
                     f"({s.get('alone_batches', 0)} alone) {s['batch_size_histogram']}")
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
    p.add_argument("--protocol", choices=PROTOCOLS, default="classify",
                   help="classify: JPEGs to POST /classify/{model} (default); v2: preprocessed UINT8 [B,H,W,3] "
                        "pixels at the model's crop size to POST /v2/models/{model}/infer (binary tensor data)")
    p.add_argument("--batch", type=int, default=1,
                   help="images per request (default 1): v2's batch dimension; classify sends B > 1 JPEGs as "
                        "multipart/form-data")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help="size of the generated JPEGs (default 500x375; e.g. 4032x3024); classify only")
    p.add_argument("--images", type=int, default=8, help="distinct JPEGs (or v2 arrays) to cycle (default 8)")
    p.add_argument("--top-k", type=int, help="top_k query parameter (default: the server's); v2: the "
                                                "classification extension's k (default 5)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--json", help="write the report to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0:
        print("error: --duration must be in (0, 3600] and --warmup >= 0", file=sys.stderr)
        return 2
    problem = None
    if args.batch < 1:
        problem = f"--batch must be >= 1, got {args.batch}"
    elif args.images < 1:
        problem = f"--images must be >= 1, got {args.images}"
    elif args.concurrency is not None and args.concurrency < 1:
        problem = f"--concurrency must be >= 1, got {args.concurrency}"
    elif args.protocol == "v2" and args.size is not None:
        problem = "--size is for --protocol classify; v2 sends pixels at the model's crop size (from its metadata)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    images = None
    if args.protocol == "classify":
        width, height = args.size or (500, 375)
        images = make_jpegs(args.images, width, height)
    common = dict(url=args.url, model=args.model, duration=args.duration, warmup=args.warmup, images=images,
                  timeout=args.timeout, max_requests=args.max_requests, top_k=args.top_k,
                  allow_remote=args.allow_remote, protocol=args.protocol, batch=args.batch, distinct=args.images)
    if args.rate is not None:
        coro = open_loop(rate=args.rate, arrivals=args.arrivals, max_connections=args.max_connections,
                         late_ms=args.late_ms, **common)
    else:
        coro = closed_loop(concurrency=args.concurrency or 16, **common)
    try:
        report = run_async(coro)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
