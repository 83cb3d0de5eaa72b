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


class HangingStore(SlowStore):
    """As SlowStore, but each write waits for ``release`` while ``hang`` is set (a database that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def record(self, records) -> None:
        self.calls += 1
        if self.hang.is_set():
            self.release.wait(10)
        super().record(records)


def test_a_request_waits_at_most_the_bound_then_its_records_wait_in_the_buffer():
    async def scenario():
        store = HangingStore()
        writer = StoreWriter(store, write_wait_s=0.1)
        store.hang.set()
        started = time.monotonic()
        stored = await writer.write([1, 2])
        waited = time.monotonic() - started
        status = writer.status()
        calls = store.calls
        # Degraded: later requests do not wait for the store at all.
        started = time.monotonic()
        assert not await writer.write([3])
        assert time.monotonic() - started < 0.05 and store.calls == calls
        store.hang.clear()
        store.release.set()  # the stuck write ends too: its records are stored once all the same
        assert await writer.flush()
        await asyncio.sleep(0.1)
        writer.close()
        return stored, waited, status, store, writer

    stored, waited, status, store, writer = asyncio.run(scenario())
    assert not stored and 0.1 <= waited < 0.5
    assert status["state"] == "degraded" and status["pending_records"] == 2
    assert "no answer within 0.1 s" in status["last_error"]
    assert sorted(set(store.written)) == [1, 2, 3] and writer.status()["state"] == "ok"


def test_the_background_flush_retries_with_backoff_until_the_store_is_back():
    async def scenario():
        store = SlowStore()
        ups: list[bool] = []
        writer = StoreWriter(store, retry_min_s=0.05, retry_max_s=0.2, on_state=ups.append)
        store.down = True
        await writer.write([1])
        attempts = []
        real = store.record

        def counted(records):
            attempts.append(time.monotonic())
            return real(records)

        store.record = counted
        runner = asyncio.create_task(writer.run())
        await asyncio.sleep(0.8)
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        store.down = False
        await asyncio.sleep(0.4)
        runner.cancel()
        writer.close()
        return store, writer, gaps, ups

    store, writer, gaps, ups = asyncio.run(scenario())
    assert store.written == [1] and writer.status()["state"] == "ok" and ups[-1] is True
    assert gaps and gaps[0] >= 0.09 and max(gaps) < 0.35  # doubling from 0.05 s, at most 0.2 s apart


def test_an_outage_longer_than_the_buffer_drops_the_oldest_and_counts_them():
    async def scenario():
        store = SlowStore()
        dropped: list[int] = []
        writer = StoreWriter(store, max_pending=5, on_drop=dropped.append)
        store.down = True
        for i in range(4):
            await writer.write([2 * i, 2 * i + 1])
        store.down = False
        assert await writer.flush()
        writer.close()
        return store, writer, dropped

    store, writer, dropped = asyncio.run(scenario())
    assert store.written == [3, 4, 5, 6, 7]
    assert writer.dropped == 3 == sum(dropped) and writer.status()["dropped_records"] == 3
