"""Load loops against one endpoint: closed loop (N clients back to back) and open loop (requests due at a rate).

Both run a warm-up (not recorded), then a measured window of ``duration``
seconds; ``/metrics`` is scraped at each end of the window for the server's
own figures. In the open loop a request that cannot be sent on time is still
sent, as soon as it can be, counted as late, and its latency measured from when
it was due, so a slow server cannot hide queueing behind the generator (no
coordinated omission). Every loop is bounded in time (plus a drain of at most
one request timeout) and in count (``max_requests``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import time
from collections import Counter, deque

import numpy as np

from .http_client import Connection, ProtocolError, Target, parse_url
from .prom import Samples, scrape, server_figures
from .workloads import check_first, make_workload


class Recorder:
    """Responses that completed inside the measured window."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, successful responses
        self.error_latencies: dict[str, list[float]] = {}  # seconds, by status: how fast a refusal comes
        self.errors: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()  # "503 overloaded": status and the body's code
        self.ok = 0
        self.window: tuple[float, float] = (math.inf, math.inf)

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    def record(self, status: int | str, latency: float, body: bytes = b"") -> None:
        if status == 200:
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.errors[str(status)] += 1
            self.error_latencies.setdefault(str(status), []).append(latency)
            self.error_codes[f"{status} {_error_code(body)}"] += 1


def _error_code(body: bytes) -> str:
    """archserve's ``code`` from an error body ({"error", "code"}), or ``-``."""
    try:
        return str(json.loads(body).get("code", "-"))
    except (ValueError, AttributeError):
        return "-"


def latency_summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    arr = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {k: round(float(v), 3) for k, v in
            (("p50", p50), ("p90", p90), ("p99", p99), ("mean", arr.mean()), ("min", arr.min()), ("max", arr.max()))}


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
    keep_latencies: bool = False,
) -> dict:
    """``concurrency`` clients back to back for ``warmup + duration`` seconds; figures over the last ``duration``.

    ``keep_latencies`` adds every successful request's latency (``latencies_s``), to pool several runs.

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
        check_first(workload, status, body)
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
            status, body = await _one(conn, payloads[k % len(payloads)], timeout)
            k += 1
            done = time.perf_counter()
            if rec.in_window(done):
                rec.record(status, done - sent, body)
            if not isinstance(status, int):
                await asyncio.sleep(0.01)  # connection trouble: do not spin

    scrapes = asyncio.gather(_scrape_at(target, measure_from), _scrape_at(target, stop_at))
    try:
        await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
        (before, cpu_before), (after, cpu_after) = await scrapes
    finally:
        for c in conns:
            c.close()
    report = _report(
        rec, mode="closed", url=url, model=model, duration=duration, warmup=warmup, workload=workload,
        extra={"concurrency": concurrency}, before=before, after=after, cpu_s=cpu_after - cpu_before,
    )
    if keep_latencies:
        report["latencies_s"] = rec.latencies
    return report


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
        check_first(workload, status, body)
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
                status, body = await _one(conn, payload, timeout)
            except BaseException:  # cancelled at the end of the drain
                conn.close()
                raise
            done = time.perf_counter()
            if conn.is_open:
                idle.append(conn)
        if status == 200 and measure_from <= done < stop_at:
            completed_in_window += 1
        if due_in_window(due):
            rec.record(status, done - due, body)  # from when it was due: includes any lateness
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
        "error_codes": dict(rec.error_codes),
        "throughput_img_s": round(rec.ok * per_request / duration, 3),  # images, not requests
        "throughput_req_s": round(rec.ok / duration, 3),
        "latency_ms": latency_summary(rec.latencies),
        "error_latency_ms": {status: latency_summary(v) for status, v in sorted(rec.error_latencies.items())},
        "server": server_figures(before, after, model),
        "loadgen_cpu_cores": round(cpu_s / duration, 3),
    }
