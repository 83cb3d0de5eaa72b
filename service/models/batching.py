"""Dynamic batching: single requests in, model-sized batches out.

Requests wait in one bounded FIFO queue. Each of ``instances`` worker tasks takes, as soon as it is free,
everything waiting (up to ``max_batch_size``) and runs ``run_batch`` on it in that worker's own thread, so the
event loop never blocks. At low load a request waits for nobody; under load batches fill by themselves
(MLServer's adaptive batcher, Triton's dynamic batcher). With ``max_queue_delay_ms`` > 0, a free worker holding
a partial batch waits until the oldest waiting item has been queued that long, or the batch is full.

Admission never waits: a full queue raises ``QueueFullError`` at once, and so does one that would keep the
request longer than ``max_queue_wait_ms`` (``QueueWaitError``, from the images ahead and the recent run time
per image): overload is refused at arrival, not admitted to wait for seconds. A request's absolute
``time.monotonic()`` deadline removes it from the queue if it passes there, and fails it with
``DeadlineExceededError`` if it passes while its batch runs (the late result is dropped); a cancelled caller's
queued item is removed too. Nothing here knows of HTTP or of the model runtime; the errors come from
``service.errors``, each carrying its status. Settings, ``start`` and ``close`` are in ``batcher_lifecycle``;
the low-priority lane (shadows) in ``low_lane``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import DeadlineExceededError, InferenceError, ModelClosedError, QueueFullError, QueueWaitError
from .batcher_lifecycle import BatcherLifecycle, R, T
from .low_lane import YIELD_S, LowPriorityLane

__all__ = ["BatchStats", "Batcher"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """One batch run, for metrics: ``queue_wait_s`` per item, submit to dispatch; ``alone``: on ``run_alone``;
    ``request_waits_s``: the wait of each request with items in it (a request's items are queued at once)."""
    size: int
    queue_wait_s: list[float]
    run_s: float
    ok: bool
    alone: bool = False
    request_waits_s: tuple[float, ...] = ()


class _State(enum.Enum):
    QUEUED = enum.auto()
    RUNNING = enum.auto()
    DONE = enum.auto()


@dataclass(eq=False, slots=True)
class _Entry:
    item: Any
    future: asyncio.Future[Any]
    deadline: float | None
    enqueued_at: float
    low: bool = False
    state: _State = _State.QUEUED
    request: int = 0  # one number per submit / submit_many call


class Batcher(LowPriorityLane, BatcherLifecycle[T, R]):
    """Groups concurrent ``submit`` calls into calls of ``run_batch`` (its settings: ``BatcherLifecycle``).

    Low-priority items (``priority="low"``, shadows) fill what normal items leave of a batch (``low_lane``).
    A batch whose items all come from one ``submit`` call, dispatched while no other batch runs and nothing
    else waits, goes to ``run_alone`` (if given) and no other batch is dispatched until it ends: it may use
    the whole machine, where ``run_batch`` runs beside other batches on a share of the cores each.
    """

    _new_entry = _Entry  # for low_lane

    @property
    def queue_depth(self) -> int:  # items admitted and waiting for dispatch, both priorities
        return len(self._queue) + len(self._low)

    async def submit(self, item: T, *, deadline: float | None = None, priority: str = "normal") -> R:
        """Queue one item and return its output. ``deadline`` is an absolute ``time.monotonic()`` value. Raises
        ``QueueFullError``, ``DeadlineExceededError``, ``ModelClosedError``, ``InferenceError``, or for
        low-priority items ``ShedError``."""
        entries = self._admit([item], deadline, priority)
        return (await self._wait(entries, deadline))[0]

    async def submit_many(self, items: list[T], *, deadline: float | None = None, priority: str = "normal") -> list[R]:
        """Queue several items, each on its own (they may land in different batches), all or none. Outputs come
        back in order; if one item fails, the others are cancelled and its error is raised."""
        entries = self._admit(list(items), deadline, priority)
        if not entries:
            return []
        return await self._wait(entries, deadline)

    @property
    def can_run_now(self) -> bool:
        """Started and open, nothing running or waiting, no queue delay to wait out, and a run may have the
        model to itself (``run_alone``, or a single instance): ``run_now`` may be called."""
        return (self._started and not self._closing and not self._running and not self._queue and not self._low
                and not self._max_queue_delay_s and (self._run_alone is not None or self._instances == 1))

    async def run_now(self, prepare: Callable[[], T], *, deadline: float | None = None) -> R:
        """When ``can_run_now``, make one item with ``prepare`` and run it alone, in one batch-thread hand-off.

        For a lone request whose item is thread work (decoding) that ``submit`` would take two hand-offs for,
        each a wake-up. What arrives meanwhile queues behind it. What ``prepare`` raises reaches the caller.
        """
        if not self.can_run_now:
            raise RuntimeError(f"{self._label}: run_now needs an idle batcher (can_run_now); submit instead")
        run = self._run_alone or self._run_batch
        self._alone_done.clear()  # no batch dispatches until this run ends, however its caller fares
        self._running += 1
        self._in_flight += 1

        def finished(future: asyncio.Future) -> None:
            self._in_flight -= 1
            self._running -= 1
            self._alone_done.set()
            self._direct.discard(future)
            if not future.cancelled() and future.exception() is None:  # prepared: a batch of one ran
                _, error, run_s = future.result()
                self._batch_ran(BatchStats(1, [0.0], run_s, error is None, run is self._run_alone, (0.0,)), 1)

        future = self._loop.run_in_executor(self._executors[0], lambda: self._timed_run(run, [prepare()]))
        self._direct.add(future)
        future.add_done_callback(finished)
        delay = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(delay):
                outputs, error, _ = await asyncio.shield(future)  # a caller gone leaves the run to finish
        except TimeoutError:
            raise self._late_error() from None
        if error is not None:
            raise InferenceError(f"inference failed for {self._label} (a batch of 1): {error}") from error
        return outputs[0]

    def _admit(self, items: list[Any], deadline: float | None, priority: str = "normal") -> list[_Entry]:
        if priority not in ("normal", "low"):
            raise ValueError(f"priority must be 'normal' or 'low', got {priority!r}")
        if self._closing:
            raise ModelClosedError(f"{self._label} is closed (shutting down or unloaded) and accepts no new requests; retry")
        if not self._started:
            raise RuntimeError(f"{self._label} is not started: await start() before submitting")
        now = time.monotonic()
        if not items:
            return []
        if deadline is not None and deadline <= now:
            self._notify(self._on_expired, len(items), "on_expired")
            raise DeadlineExceededError(f"{self._label}: the deadline had passed before the request was queued")
        if priority == "low":
            return self._admit_low(items, deadline, now)
        self._refuse_if_full(len(items), now)
        assert self._loop is not None and self._available is not None
        request = next(self._requests)
        entries = [_Entry(item, self._loop.create_future(), deadline, now, request=request) for item in items]
        self._queue.extend(entries)
        if len(self._queue) >= self._shed_depth:
            self._shed_low("normal traffic is queueing")
        self._depth_changed()
        self._available.set()
        return entries

    def check_admission(self, count: int = 1) -> None:
        """Raise now what ``submit_many`` of ``count`` items would for a full or slow queue: refused undecoded."""
        if self._started and not self._closing:
            self._refuse_if_full(count, time.monotonic())

    def expected_wait_s(self) -> float | None:
        """How long a request arriving now would wait for its batch to start: the images queued beyond one batch
        and half of those running, at the recent run time per image (per batch beside it: the model's rate), or
        the oldest waiting one's age less the bound (a stall, before any batch ends); None before any batch."""
        if self._per_image_s is None:
            return None
        stalled = time.monotonic() - self._queue[0].enqueued_at - self._max_queue_wait_s if self._queue else 0.0
        ahead = max(0, len(self._queue) + 1 - self._max_batch_size)  # the next batch takes the rest with it
        return max(stalled, (ahead + self._in_flight / 2) * self._per_image_s)

    def _refuse_if_full(self, count: int, now: float) -> None:
        if count > self._max_queue_size:
            raise QueueFullError(f"{self._label}: {count} items can never fit max_queue_size={self._max_queue_size}")
        if len(self._queue) + count > self._max_queue_size:
            self._expire_queued(now)
            if len(self._queue) + count > self._max_queue_size:
                raise QueueFullError(
                    f"{self._label}: queue full, at its limit of {self._max_queue_size} images "
                    f"({len(self._queue)} waiting, {count} more requested); retry after a moment"
                )
        wait = self.expected_wait_s() if self._max_queue_wait_s and self._queue else None  # empty: progress
        if wait is not None and wait > self._max_queue_wait_s:
            raise QueueWaitError(
                f"{self._label}: overloaded, a request now would wait about {wait * 1000:.0f} ms for its batch "
                f"(limit {self._max_queue_wait_s * 1000:.0f} ms, {len(self._queue)} images queued); retry soon"
            )

    def _batch_ran(self, stats: BatchStats, side_by_side: int) -> None:
        if stats.ok:  # the run time per image, weighted by images: a few batches forget the past
            sample, weight = stats.run_s / stats.size / max(1, side_by_side), min(1.0, 0.02 * stats.size)
            self._per_image_s = sample + (1 - weight) * ((self._per_image_s or sample) - sample)
        self._notify(self._on_batch, stats, "on_batch")

    async def _wait(self, entries: list[_Entry], deadline: float | None) -> list[Any]:
        futures = [e.future for e in entries]
        delay = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(delay):
                await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        except TimeoutError:
            self._abandon(entries, expired=True)
            raise self._late_error() from None
        except BaseException:
            self._abandon(entries, expired=False)
            raise
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                error = future.exception()
                self._abandon(entries, expired=isinstance(error, DeadlineExceededError))
                raise error
        return [f.result() for f in futures]

    def _abandon(self, entries: list[_Entry], *, expired: bool) -> None:
        removed = 0
        for entry in entries:
            if entry.state is _State.QUEUED:
                entry.state = _State.DONE
                removed += 1
            if not entry.future.done():
                entry.future.cancel()
            elif not entry.future.cancelled():
                entry.future.exception()
        if not removed:
            return
        self._drop_finished()
        self._depth_changed()
        if expired:
            self._notify(self._on_expired, removed, "on_expired")

    def _expire_queued(self, now: float) -> None:
        expired = [e for q in (self._queue, self._low) for e in q if e.deadline is not None and e.deadline <= now]
        if not expired:
            return
        for entry in expired:
            self._fail(entry, self._late_error("the request's deadline passed while it was queued"))
        self._drop_finished()
        self._depth_changed()
        self._notify(self._on_expired, len(expired), "on_expired")

    def _drop_finished(self) -> None:
        for queue in (self._queue, self._low):
            kept = [e for e in queue if e.state is _State.QUEUED]
            if len(kept) != len(queue):
                queue.clear()
                queue.extend(kept)

    def _late_error(self, what: str = "no result before the request's deadline") -> DeadlineExceededError:
        return DeadlineExceededError(f"{self._label}: {what}; the server is overloaded, retry later")

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        entry.state = _State.DONE
        if not entry.future.done():
            entry.future.set_exception(error)

    def _take_batch(self) -> list[_Entry]:
        now = time.monotonic()
        batch: list[_Entry] = []
        expired = 0
        for queue in (self._queue, self._low):  # normal items first; low ones as low_lane allows
            room = self._max_batch_size if queue is self._queue else self._low_room(len(batch))
            while queue and len(batch) < room:
                entry = queue.popleft()
                if entry.future.done():
                    entry.state = _State.DONE
                elif entry.deadline is not None and entry.deadline <= now:
                    self._fail(entry, self._late_error("the request's deadline passed while it was queued"))
                    expired += 1
                else:
                    entry.state = _State.RUNNING
                    batch.append(entry)
        self._depth_changed()
        if expired:
            self._notify(self._on_expired, expired, "on_expired")
        return batch

    async def _next_batch(self) -> list[_Entry] | None:
        assert self._available is not None and self._collect_lock is not None
        async with self._collect_lock:
            while True:
                while not self._queue and not self._low:
                    if self._closing:
                        return None
                    self._available.clear()
                    await self._available.wait()
                if self._max_queue_delay_s > 0:
                    await self._gather_more()
                if self._alone_done is not None and not self._alone_done.is_set():
                    await self._alone_done.wait()  # a batch with the machine to itself runs: then look again
                    continue
                batch = self._take_batch()
                if batch:
                    return batch
                await asyncio.sleep(YIELD_S)  # low-priority work yielding to other models (low_lane)

    async def _gather_more(self) -> None:
        assert self._available is not None
        while self.queue_depth and self.queue_depth < self._max_batch_size and not self._closing:
            oldest = min(q[0].enqueued_at for q in (self._queue, self._low) if q)
            remaining = oldest + self._max_queue_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._available.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._available.wait()
            except TimeoutError:
                return

    async def _worker(self, executor: ThreadPoolExecutor) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            try:
                await self._dispatch(batch, executor)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s: unexpected error while dispatching a batch", self._label)
                for entry in batch:
                    self._fail(entry, InferenceError(f"{self._label}: internal error while running the batch"))

    async def _dispatch(self, batch: list[_Entry], executor: ThreadPoolExecutor) -> None:
        assert self._loop is not None and self._alone_done is not None
        dispatched_at = time.monotonic()
        waits = [dispatched_at - e.enqueued_at for e in batch]
        waited = {e.request: wait for e, wait in zip(batch, waits)}  # per request: Triton's statistics count them
        # Decided and recorded with no await in between: no other worker can start a batch meanwhile.
        alone = (self._run_alone is not None and self._running == 0 and not self._queue and not self._low
                 and len(waited) == 1)
        run = self._run_alone if alone else self._run_batch
        if alone:
            self._alone_done.clear()
        self._running += 1
        side_by_side = self._running
        self._in_flight += len(batch)
        try:
            outputs, error, run_s = await self._loop.run_in_executor(
                executor, self._timed_run, run, [e.item for e in batch]
            )
        except asyncio.CancelledError:
            for entry in batch:
                self._fail(entry, ModelClosedError(f"{self._label}: closed before this request's batch finished"))
            raise
        except Exception as exc:
            outputs, error, run_s = None, exc, time.monotonic() - dispatched_at
        finally:
            self._in_flight -= len(batch)
            self._running -= 1
            if alone:
                self._alone_done.set()
        if error is None:
            for entry, output in zip(batch, outputs):
                entry.state = _State.DONE
                if not entry.future.done():
                    entry.future.set_result(output)
        else:
            for entry in batch:
                failure = InferenceError(f"inference failed for {self._label} (a batch of {len(batch)}): {error}")
                failure.__cause__ = error
                self._fail(entry, failure)
        self._batch_ran(BatchStats(len(batch), waits, run_s, error is None, alone, tuple(waited.values())), side_by_side)

    @staticmethod
    def _timed_run(run: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> tuple[Any, Exception | None, float]:
        """``run(items)``, timed: its outputs, or the error it raised or made (not one output per item)."""
        started = time.monotonic()
        try:
            outputs, error = run(items), None
            if not hasattr(outputs, "__len__"):
                error = TypeError(f"run_batch returned {type(outputs).__name__}, which has no length; "
                                  "return a sequence with one output per input")
            elif len(outputs) != len(items):
                error = ValueError(f"run_batch returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as exc:
            outputs, error = None, exc
        return outputs, error, time.monotonic() - started

    def _depth_changed(self) -> None:
        depth = self.queue_depth
        if depth != self._reported_depth:
            self._reported_depth = depth
            self._notify(self._on_queue_depth, depth, "on_queue_depth")

    def _notify(self, callback: Callable[[Any], None] | None, value: Any, label: str) -> None:
        try:
            if callback is not None:
                callback(value)
        except Exception:
            logger.exception("%s: the %s callback raised; ignoring it", self._label, label)
