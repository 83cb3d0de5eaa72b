"""A Batcher's life around its request path: its settings checked, its threads started and warmed, its close.

Nothing here runs for a request; :mod:`service.models.batching` holds all that a request crosses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from ..errors import ModelClosedError
from ..threads import BATCH, name_os_thread

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class BatcherLifecycle(Generic[T, R]):
    """A :class:`~service.models.batching.Batcher`'s state, its constructor's checks, ``start`` and ``close``.

    ``run_batch`` gets a list of up to ``max_batch_size`` items and returns one output per item, in order; it
    runs in one of ``instances`` threads, each kept for the batcher's life. ``warmup``, if given, runs once in
    each of those threads during ``start()``, before any batch (an exception it raises fails ``start``):
    per-thread runtime state is warm where the batches run. ``run_alone`` has ``run_batch``'s contract.
    Low-priority items wait in a queue of ``max_low_queue_size``, shed while ``shed_depth`` normal items wait
    (default ``max_batch_size``). With ``max_queue_wait_ms``, a normal request that would wait longer than that
    behind the queue (estimated from recent batches' run time per image) is refused at once. Callbacks (``on_batch``, ``on_queue_depth``, ``on_expired`` for requests
    whose deadline passed before they ran, ``on_shed``) run on the event loop and must be quick; an
    exception they raise is logged and ignored.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_queue_size: int,
        instances: int = 1,
        max_queue_delay_ms: float = 0.0,
        name: str = "",
        on_batch: Callable[[Any], None] | None = None,  # given each batch's batching.BatchStats
        on_queue_depth: Callable[[int], None] | None = None,
        on_expired: Callable[[int], None] | None = None,
        max_low_queue_size: int | None = None,
        shed_depth: int | None = None,
        on_shed: Callable[[int], None] | None = None,
        warmup: Callable[[], None] | None = None,
        run_alone: Callable[[list[T]], Sequence[R]] | None = None,
        max_queue_wait_ms: float = 0.0,
    ) -> None:
        if not callable(run_batch):
            raise TypeError(f"run_batch must be callable, got {type(run_batch).__name__}")
        if run_alone is not None and not callable(run_alone):
            raise TypeError(f"run_alone must be callable or None, got {type(run_alone).__name__}")
        self._max_batch_size = _check_count("max_batch_size", max_batch_size, 1)
        self._max_queue_size = _check_count("max_queue_size", max_queue_size, 1)
        self._max_low_queue_size = _check_count(
            "max_low_queue_size", max_queue_size if max_low_queue_size is None else max_low_queue_size, 0
        )
        self._shed_depth = _check_count("shed_depth", max_batch_size if shed_depth is None else shed_depth, 1)
        self._instances = _check_count("instances", instances, 1)
        if isinstance(max_queue_delay_ms, bool) or not isinstance(max_queue_delay_ms, (int, float)):
            raise TypeError(f"max_queue_delay_ms must be a number, got {type(max_queue_delay_ms).__name__}")
        if not math.isfinite(max_queue_delay_ms) or max_queue_delay_ms < 0:
            raise ValueError(
                f"max_queue_delay_ms must be a finite number >= 0 (0 disables the delay), got {max_queue_delay_ms}"
            )
        for label, value in (("max_queue_delay_ms", max_queue_delay_ms), ("max_queue_wait_ms", max_queue_wait_ms)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{label} must be a finite number >= 0 (0 = off), got {value!r}")
        for label, callback in (
            ("on_batch", on_batch), ("on_queue_depth", on_queue_depth), ("on_expired", on_expired),
            ("on_shed", on_shed), ("warmup", warmup),
        ):
            if callback is not None and not callable(callback):
                raise TypeError(f"{label} must be callable or None, got {type(callback).__name__}")

        self._run_batch = run_batch
        self._run_alone = run_alone
        self._warmup = warmup
        self._max_queue_delay_s = float(max_queue_delay_ms) / 1000.0
        self._max_queue_wait_s = float(max_queue_wait_ms) / 1000.0
        self._per_image_s: float | None = None  # recent run time per image, per batch running at once (EWMA)
        self._name = name
        self._label = f"batcher {name!r}" if name else "batcher"
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._on_expired = on_expired
        self._on_shed = on_shed

        self._queue: deque[Any] = deque()  # batching._Entry, normal priority
        self._low: deque[Any] = deque()  # and low
        self._reported_depth = 0
        self._in_flight = 0
        self._running = 0  # batches dispatched and not finished
        self._requests = itertools.count(1)
        self._alone_done: asyncio.Event | None = None  # cleared while a run_alone batch runs
        self._direct: set[asyncio.Future[Any]] = set()  # run_now's runs, not yet finished
        self._started = False
        self._closing = False
        self._abandoned_threads = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executors: list[ThreadPoolExecutor] = []
        self._available: asyncio.Event | None = None
        self._collect_lock: asyncio.Lock | None = None
        self._workers: list[asyncio.Task[None]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def low_queue_depth(self) -> int:
        """Low-priority items waiting for dispatch."""
        return len(self._low)

    @property
    def in_flight(self) -> int:
        """Items dispatched to ``run_batch`` (or ``run_alone``) whose batch has not finished."""
        return self._in_flight

    async def start(self) -> None:
        """Start one thread per instance, run ``warmup`` in each, then start the workers, on the running
        event loop. If the warm-up raises, or ``close`` is called meanwhile, nothing is left running."""
        if self._closing:
            raise RuntimeError(f"{self._label} was closed; create a new Batcher instead of restarting it")
        if self._started or self._executors:
            raise RuntimeError(f"{self._label} is already started")
        self._loop = asyncio.get_running_loop()
        self._available = asyncio.Event()
        self._collect_lock = asyncio.Lock()
        self._alone_done = asyncio.Event()
        self._alone_done.set()
        prefix = f"batcher-{self._name}" if self._name else "batcher"
        # One thread per instance, for its whole life: runtimes keep per-thread state (onnxruntime's CUDA
        # provider: cuDNN/cuBLAS handles and what they cache per shape), so the warm-up runs in the very
        # threads that will run the batches.
        # The OS name (`top -H`, /proc) keeps 15 bytes: "batch resnet50/".
        os_name = f"{BATCH} {self._name}" if self._name else BATCH
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{prefix}-{i}",
                                              initializer=name_os_thread, initargs=(os_name,))
                           for i in range(self._instances)]
        if self._warmup is not None:
            try:
                await asyncio.gather(*(self._loop.run_in_executor(ex, self._warmup) for ex in self._executors))
            except BaseException:
                self._drop_executors()
                raise
            if self._closing:  # closed while warming up: never start
                self._drop_executors()
                raise ModelClosedError(f"{self._label} was closed while warming up")
        self._workers = [
            self._loop.create_task(self._worker(self._executors[i]), name=f"{self._label} worker {i}")
            for i in range(self._instances)
        ]
        self._started = True
        self._live.add(self)  # low_lane: other models' shadows yield to this one's queue

    def _drop_executors(self) -> None:
        """The threads of a start that did not complete: stopped (a running warm-up finishes in its thread)."""
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors = []

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests, then stop the workers and the thread pool.

        With ``drain``, queued and in-flight items are run and answered first;
        without it, queued items fail with ``ModelClosedError`` (in-flight
        batches still finish). After ``timeout`` seconds the workers are
        cancelled and whatever is unanswered fails with ``ModelClosedError``
        (a batch already running in a thread cannot be interrupted; its result
        is dropped). Calling ``close`` again is harmless.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
        self._closing = True
        self._live.discard(self)
        if not self._started:
            return
        assert self._available is not None and self._executors
        if not drain:
            self._fail_queued("the batcher was closed without draining its queue")
        self._available.set()
        pending = {w for w in self._workers if not w.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        if pending:
            logger.warning(
                "%s: close timed out after %ss with %d item(s) in flight and %d queued; cancelling",
                self._label,
                timeout,
                self._in_flight,
                len(self._queue),
            )
            self._abandoned_threads = True
            for worker in pending:
                worker.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._fail_queued("the batcher was closed before this request was run")
        if self._direct:  # a lone run_now in its thread: answered before the threads go, within the timeout
            await asyncio.wait(set(self._direct), timeout=timeout)
            self._abandoned_threads |= bool(self._direct)
        for executor in self._executors:
            executor.shutdown(wait=not self._abandoned_threads, cancel_futures=True)

    def _fail_queued(self, reason: str) -> None:
        if not self._queue and not self._low:
            return
        entries = list(self._queue) + list(self._low)
        self._queue.clear()
        self._low.clear()
        for entry in entries:
            self._fail(entry, ModelClosedError(f"{self._label}: {reason}"))
        self._depth_changed()

    # The request path's, defined by Batcher.

    async def _worker(self, executor: ThreadPoolExecutor) -> None:
        raise NotImplementedError

    def _fail(self, entry: Any, error: BaseException) -> None:
        raise NotImplementedError

    def _depth_changed(self) -> None:
        raise NotImplementedError
