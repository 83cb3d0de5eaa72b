"""Writing the prediction log without ever failing, stalling or losing a request.

If the store is unreachable (a database restart, a full disk), records wait in
a bounded in-memory buffer and are retried in the background; the store is
reported ``degraded`` (``GET /health/ready``, ``archserve_store_up``) while
classification goes on. What the buffer promises:

* **Wait**: a request waits for its records' write at most ``write_wait_s``
  (0.5 s; plus the event loop's delay in resuming it). A write not done by then
  is left to finish in the background and its records are buffered (a record
  written twice is stored once). While the store is degraded, requests do not
  wait for it at all: their records go straight to the buffer.
  ``archserve_store_write_wait_seconds`` shows the waits.
* **Size**: at most ``max_pending`` records (100,000, per worker process) wait
  in the buffer: one per image an experiment served, and one per image for each
  shadow; about 750 bytes each, some 75 MB in all. That covers an outage of
  100,000 / (records per second) seconds, 200 s at 500 images/s. Only if an
  outage outlasts it are the oldest dropped, and counted
  (``archserve_store_dropped_records_total``, ``dropped_records`` in
  ``/health/ready``).
* **Retry**: the buffer is written in the background, ``retry_min_s`` (0.5 s)
  after a failure, then with the wait doubling up to ``retry_max_s`` (5 s), so
  it is written within seconds of the store's return (PostgreSQL: about 3 s
  after a restart). ``archserve_store_pending_records`` shows what waits.
* **Scope**: the buffer is this process's memory. A graceful shutdown writes it
  if the store is back; a crash, or a shutdown while the store is still down,
  loses what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..threads import STORE, name_os_thread
from .base import ExperimentStore
from .records import PredictionRecord

log = logging.getLogger(__name__)


def _executor() -> ThreadPoolExecutor:
    # 8: the PostgreSQL store's default pool size (store_pool_max); more concurrent writes would only queue there.
    return ThreadPoolExecutor(8, thread_name_prefix=STORE, initializer=name_os_thread)


@dataclass
class StoreWriter:
    store: ExperimentStore
    max_pending: int = 100_000
    write_wait_s: float = 0.5
    retry_min_s: float = 0.5
    retry_max_s: float = 5.0
    pending: deque = field(default_factory=deque)
    dropped: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    on_state: Callable[[bool], object] | None = None  # up or not, for a gauge
    on_drop: Callable[[int], object] | None = None  # records dropped from a full buffer, for a counter
    # One flush at a time: two would write the same records and each pop them, losing the ones behind.
    _flushing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # Its own threads: writes stuck on a dead database must not hold up the default executor (model loads).
    _executor: ThreadPoolExecutor = field(default_factory=_executor, repr=False)

    @property
    def degraded(self) -> bool:
        return bool(self.pending) or self.last_error is not None

    def status(self) -> dict:
        return {
            "state": "degraded" if self.degraded else "ok",
            "pending_records": len(self.pending),
            "dropped_records": self.dropped,
            "last_error": self.last_error,
        }

    async def write(self, records: list[PredictionRecord]) -> bool:
        """Store ``records``, waiting at most ``write_wait_s``; buffer them instead if the store is degraded,
        fails or is slower. Whether they were stored."""
        if self.degraded:
            self._buffer(records)  # behind what waits already; the background flush writes them
            return False
        call = asyncio.get_running_loop().run_in_executor(self._executor, self.store.record, records)
        try:
            # On timeout wait_for cancels the call: dropped if it has not started, else it finishes unobserved.
            await asyncio.wait_for(call, self.write_wait_s)
        except asyncio.CancelledError:
            self._buffer(records)  # the request was cancelled, not its prediction: the background flush writes it
            raise
        except Exception as exc:
            if call.cancelled():
                exc = TimeoutError(f"no answer within {self.write_wait_s:g} s")
            self._failed(exc)
            self._buffer(records)
            return False
        self._recovered()
        return True

    def find_pending(self, request_id: str, image_index: int) -> PredictionRecord | None:
        for record in self.pending:
            if record.role == "primary" and record.request_id == request_id and record.image_index == image_index:
                return record
        return None

    async def flush(self) -> bool:
        """Write the buffer, oldest first, until it is empty or the store fails; whether it is empty."""
        loop = asyncio.get_running_loop()
        async with self._flushing:
            while self.pending:
                batch = [self.pending[i] for i in range(min(len(self.pending), 500))]
                try:
                    await loop.run_in_executor(self._executor, self.store.record, batch)
                except Exception as exc:
                    self._failed(exc)
                    return False
                for record in batch:  # what was written, unless a full buffer dropped it meanwhile
                    if self.pending and self.pending[0] is record:
                        self.pending.popleft()
            self._recovered()
            return True

    async def run(self) -> None:
        """Write the buffer in the background: ``retry_min_s`` after a failure, then backing off."""
        delay = self.retry_min_s
        while True:
            await asyncio.sleep(delay)
            if not self.degraded:
                delay = self.retry_min_s
            elif await self.flush():
                delay = self.retry_min_s
            else:
                delay = min(delay * 2, self.retry_max_s)

    def close(self) -> None:
        """Stop the threads once their writes end (after the last ``flush``)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _buffer(self, records: list[PredictionRecord]) -> None:
        self.pending.extend(records)
        over = len(self.pending) - self.max_pending
        if over > 0:
            for _ in range(over):
                self.pending.popleft()
            self.dropped += over
            if self.on_drop:
                self.on_drop(over)

    def _failed(self, exc: Exception) -> None:
        if self.last_error is None:
            log.error("the experiment store is unreachable; buffering predictions: %s", exc)
        self.last_error, self.last_error_at = f"{type(exc).__name__}: {exc}", time.time()
        if self.on_state:
            self.on_state(False)

    def _recovered(self) -> None:
        if self.last_error is not None and not self.pending:
            log.info("the experiment store is reachable again; buffered predictions written")
            self.last_error = None
        if self.on_state and not self.pending:
            self.on_state(True)
