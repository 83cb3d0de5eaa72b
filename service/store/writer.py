"""Writing the prediction log without ever failing or losing a request.

If the store is unreachable (a database restart, a full disk), records wait in
a bounded in-memory buffer and are retried in the background; the store is
reported ``degraded`` (``GET /health/ready``, ``archserve_store_up``) while
classification goes on. Only if the outage outlasts the buffer are the oldest
records dropped, and they are counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from .base import ExperimentStore
from .records import PredictionRecord

log = logging.getLogger(__name__)


@dataclass
class StoreWriter:
    store: ExperimentStore
    max_pending: int = 100_000
    pending: deque = field(default_factory=deque)
    dropped: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    on_state: object = None  # callable(up: bool) for a gauge
    # One flush at a time: two would write the same records and each pop them, losing the ones behind.
    _flushing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

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
        """Store ``records`` (after anything still buffered); buffer them if the store fails."""
        if self.pending:
            self._buffer(records)
            await self.flush()
            return not self.pending
        try:
            await asyncio.to_thread(self.store.record, records)
        except Exception as exc:
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

    async def flush(self) -> None:
        async with self._flushing:
            while self.pending:
                batch = [self.pending[i] for i in range(min(len(self.pending), 500))]
                try:
                    await asyncio.to_thread(self.store.record, batch)
                except Exception as exc:
                    self._failed(exc)
                    return
                for record in batch:  # what was written, unless a full buffer dropped it meanwhile
                    if self.pending and self.pending[0] is record:
                        self.pending.popleft()
            self._recovered()

    async def run(self, interval_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self.pending:
                await self.flush()

    def _buffer(self, records: list[PredictionRecord]) -> None:
        self.pending.extend(records)
        while len(self.pending) > self.max_pending:
            self.pending.popleft()
            self.dropped += 1

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
