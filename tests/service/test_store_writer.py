"""The store writer's buffer, with a store that records what it is given (a unit: no database)."""

from __future__ import annotations

import asyncio
import threading
import time

from service.store.base import StoreError
from service.store.writer import StoreWriter


class SlowStore:
    """Keeps every record it is given; fails while ``down``; each write takes a moment, like a database."""

    def __init__(self) -> None:
        self.written: list = []
        self.down = False
        self.lock = threading.Lock()

    def record(self, records) -> None:
        if self.down:
            raise StoreError("unreachable")
        time.sleep(0.02)
        with self.lock:
            self.written.extend(records)


def test_concurrent_writes_after_an_outage_store_every_record_once():
    async def scenario():
        store = SlowStore()
        writer = StoreWriter(store)
        store.down = True
        assert not await writer.write(list(range(10)))
        store.down = False
        # Several requests finish at once while records are buffered: each write flushes.
        results = await asyncio.gather(*(writer.write([100 + i]) for i in range(8)), writer.flush())
        return store.written, writer

    written, writer = asyncio.run(scenario())
    assert sorted(written) == list(range(10)) + [100 + i for i in range(8)]
    assert len(writer.pending) == 0 and writer.status()["state"] == "ok"
