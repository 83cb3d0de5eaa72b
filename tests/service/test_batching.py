"""The dynamic batcher, driven by a fake engine that the tests hold and release."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from service.errors import (
    DeadlineExceededError,
    InferenceError,
    ModelClosedError,
    QueueFullError,
    QueueWaitError,
    ServiceError,
    ShedError,
)
from service.models.batching import Batcher, BatchStats

pytestmark = pytest.mark.anyio

HOLD = 1000
FAIL = -1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeEngine:
    """Doubles its inputs; blocks while a batch holds HOLD, raises if one holds FAIL."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.off_loop = True

    def __call__(self, items: list[int]) -> list[int]:
        if threading.current_thread() is threading.main_thread():
            self.off_loop = False
        self.batches.append(list(items))
        if HOLD in items:
            self.entered.set()
            assert self.gate.wait(10), "the test never released the engine"
        if FAIL in items:
            raise ValueError(f"cannot process {items}")
        return [x * 2 for x in items]

    @property
    def seen(self) -> list[int]:
        return [x for batch in self.batches for x in batch]

    def sizes_after_hold(self) -> list[int]:
        index = next(i for i, b in enumerate(self.batches) if HOLD in b)
        return [len(b) for b in self.batches[index + 1 :]]


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine, run_batch: Callable[[list[int]], list[int]] | None = None, **kwargs
) -> AsyncIterator[Batcher[int, int]]:
    kwargs.setdefault("max_batch_size", 4)
    kwargs.setdefault("max_queue_size", 64)
    batcher: Batcher[int, int] = Batcher(run_batch or engine, **kwargs)
    await batcher.start()
    try:
        yield batcher
    finally:
        engine.gate.set()
        await batcher.close(timeout=5)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached in time"
        await asyncio.sleep(0.002)


async def hold_engine(batcher: Batcher[int, int], engine: FakeEngine) -> asyncio.Task[int]:
    """Occupy the (single) worker with a batch that runs until ``engine.gate`` is set."""
    task = asyncio.create_task(batcher.submit(HOLD))
    await eventually(engine.entered.is_set)
    return task


def spawn(batcher: Batcher[int, int], items, **kwargs) -> list[asyncio.Task[int]]:
    return [asyncio.create_task(batcher.submit(x, **kwargs)) for x in items]


async def behind_a_lone_batch(
    batcher: Batcher[int, int], alone: FakeEngine, items: list[int]
) -> tuple[asyncio.Task[int], list[asyncio.Task[int]]]:
    """A request running alone until ``alone.gate`` is set, and ``items`` queued behind it, one request each."""
    held = asyncio.create_task(batcher.submit(HOLD))
    await eventually(alone.entered.is_set)
    tasks = spawn(batcher, items)
    await eventually(lambda: batcher.queue_depth == len(items))
    return held, tasks


async def test_low_load_dispatches_alone_without_waiting():
    engine = FakeEngine()
    stats: list[BatchStats] = []
    async with running(engine, max_batch_size=8, on_batch=stats.append) as batcher:
        assert await batcher.submit(3) == 6
        assert await batcher.submit(4) == 8
    assert engine.batches == [[3], [4]]
    assert engine.off_loop, "run_batch ran on the event loop thread"
    assert [s.size for s in stats] == [1, 1]
    assert all(s.queue_wait_s[0] < 1.0 for s in stats)


async def test_batches_form_under_load_and_respect_max_size():
    engine = FakeEngine()
    async with running(engine, max_batch_size=4) as batcher:
        held = await hold_engine(batcher, engine)
        tasks = spawn(batcher, range(10))
        await eventually(lambda: batcher.queue_depth == 10)
        engine.gate.set()
        assert await asyncio.gather(*tasks) == [x * 2 for x in range(10)]
        assert await held == HOLD * 2
    assert engine.sizes_after_hold() == [4, 4, 2]
    assert engine.seen[1:] == list(range(10)), "FIFO order within the queue"


async def test_max_batch_size_holds_with_many_concurrent_callers():
    engine = FakeEngine()
    async with running(engine, max_batch_size=3, max_queue_size=200) as batcher:
        results = await asyncio.gather(*spawn(batcher, range(100)))
    assert results == [x * 2 for x in range(100)]
    assert all(1 <= len(b) <= 3 for b in engine.batches)
    assert sorted(engine.seen) == list(range(100))


async def test_max_queue_delay_groups_items_and_dispatches_when_full():
    engine = FakeEngine()
    async with running(engine, max_batch_size=3, max_queue_delay_ms=5000) as batcher:
        started = time.monotonic()
        first = asyncio.create_task(batcher.submit(1))
        await eventually(lambda: batcher.queue_depth == 1)
        await asyncio.sleep(0.05)
        assert engine.batches == [], "dispatched before the delay or a full batch"
        rest = spawn(batcher, [2, 3])
        assert await asyncio.gather(first, *rest) == [2, 4, 6]
        assert time.monotonic() - started < 4.0, "a full batch must not wait out the delay"
    assert engine.batches == [[1, 2, 3]]


async def test_max_queue_delay_is_never_exceeded_for_a_partial_batch():
    engine = FakeEngine()
    stats: list[BatchStats] = []
    async with running(engine, max_batch_size=8, max_queue_delay_ms=100, on_batch=stats.append) as batcher:
        started = time.monotonic()
        assert await batcher.submit(5) == 10
        elapsed = time.monotonic() - started
    assert engine.batches == [[5]]
    assert elapsed >= 0.09
    assert stats[0].queue_wait_s[0] >= 0.09
    assert elapsed < 3.0


async def test_two_instances_run_two_batches_concurrently():
    barrier = threading.Barrier(2, timeout=5)
    threads: set[str] = set()

    def run_batch(items: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        barrier.wait()
        return [x * 2 for x in items]

    engine = FakeEngine()
    async with running(engine, run_batch, max_batch_size=1, instances=2) as batcher:
        assert await asyncio.gather(*spawn(batcher, [1, 2])) == [2, 4]
    assert len(threads) == 2


async def test_warmup_runs_once_in_each_thread_that_runs_batches_before_any_batch():
    """Runtimes keep per-thread state (CUDA handles), so each batch thread is warmed, and only those."""
    warmed: list[int] = []
    ran: set[int] = set()
    barrier = threading.Barrier(2, timeout=5)

    def warmup() -> None:
        warmed.append(threading.get_ident())

    def run_batch(items: list[int]) -> list[int]:
        assert threading.get_ident() in warmed, "a batch ran in a thread that was not warmed up"
        ran.add(threading.get_ident())
        barrier.wait()  # both instances busy at once: two distinct threads
        return [x * 2 for x in items]

    engine = FakeEngine()
    async with running(engine, run_batch, max_batch_size=1, instances=2, warmup=warmup) as batcher:
        assert len(warmed) == 2 and len(set(warmed)) == 2 and threading.get_ident() not in warmed
        for _ in range(3):
            assert await asyncio.gather(*spawn(batcher, [1, 2])) == [2, 4]
    assert ran == set(warmed) and len(warmed) == 2


async def test_a_failing_warmup_fails_start_and_runs_nothing():
    engine = FakeEngine()

    failures = [RuntimeError("out of GPU memory")]

    def warmup() -> None:
        if failures:
            raise failures.pop()

    before = {t.name for t in threading.enumerate()}
    batcher: Batcher[int, int] = Batcher(engine, max_batch_size=4, max_queue_size=8, warmup=warmup, name="w")
    with pytest.raises(RuntimeError, match="out of GPU memory"):
        await batcher.start()
    with pytest.raises(RuntimeError, match="not started"):
        await batcher.submit(1)
    assert engine.batches == []
    # Its thread is gone, and the batcher is not stuck half-started: a later start can succeed.
    await eventually(lambda: not {t.name for t in threading.enumerate()} - before)
    await batcher.start()
    try:
        assert await batcher.submit(1) == 2
    finally:
        await batcher.close()


async def test_queue_full_rejects_at_once_and_service_continues():
    engine = FakeEngine()
    async with running(engine, max_batch_size=1, max_queue_size=2) as batcher:
        held = await hold_engine(batcher, engine)
        queued = spawn(batcher, [1, 2])
        await eventually(lambda: batcher.queue_depth == 2)
        with pytest.raises(QueueFullError, match="queue full"):
            await batcher.submit(3)
        assert batcher.queue_depth == 2
        assert batcher.in_flight == 1
        engine.gate.set()
        assert await asyncio.gather(held, *queued) == [HOLD * 2, 2, 4]
        assert await batcher.submit(4) == 8
    assert 3 not in engine.seen


class SlowEngine:
    """Takes ``per_image_s`` per item, like a model on a busy machine."""

    def __init__(self, per_image_s: float) -> None:
        self.per_image_s = per_image_s

    def __call__(self, items: list[int]) -> list[int]:
        time.sleep(self.per_image_s * len(items))
        return [x * 2 for x in items]


async def test_a_queue_that_would_wait_too_long_refuses_at_once_and_admits_again_once_drained():
    engine = SlowEngine(0.01)  # 10 ms per image
    async with running(FakeEngine(), engine, max_batch_size=4, max_queue_size=1000,
                       max_queue_wait_ms=100) as batcher:
        assert batcher.expected_wait_s() is None  # nothing ran yet: only the count bound applies
        assert await batcher.submit(1) == 2
        assert batcher.expected_wait_s() == pytest.approx(0.0)  # learned 10 ms per image, nothing ahead
        # A batch of 4 goes with the next dispatch; beyond it, 100 ms at 10 ms per image is the limit: about
        # 14 of 40 are admitted, the rest refused.
        tasks = spawn(batcher, range(40))
        await asyncio.sleep(0)  # each task has been admitted or refused; no batch has been taken yet
        assert 8 <= sum(not t.done() for t in tasks) <= 16  # the refused ones were answered at once
        wait = batcher.expected_wait_s()
        assert wait == pytest.approx((batcher.queue_depth + 1 - 4 + batcher.in_flight / 2) * 0.01, rel=0.5)
        with pytest.raises(QueueWaitError, match=r"would wait about \d+ ms .*limit 100 ms") as refused:
            batcher.check_admission()
        assert refused.value.status_code == 503 and refused.value.code == "overloaded"
        assert refused.value.headers["Retry-After"] == "1"
        results = await asyncio.gather(*tasks, return_exceptions=True)
        admitted = [(x, r) for x, r in zip(range(40), results) if not isinstance(r, Exception)]
        assert all(isinstance(r, QueueWaitError) for r in results if isinstance(r, Exception))
        assert 8 <= len(admitted) <= 16, len(admitted)
        assert all(r == 2 * x for x, r in admitted)  # the admitted ones all ran
        batcher.check_admission()  # drained: admits again
        assert await batcher.submit(5) == 10


async def test_a_stalled_model_refuses_once_its_oldest_request_waited_twice_the_bound():
    """A batch that runs far longer than the model's recent ones (a stall) shows in the queue's age before it
    ends: past twice the bound, new requests are refused although the run-time estimate is still small."""
    engine = FakeEngine()
    async with running(engine, max_batch_size=1, max_queue_wait_ms=50) as batcher:
        assert await batcher.submit(1) == 2  # learns a run time per image of almost nothing
        held = await hold_engine(batcher, engine)
        queued = spawn(batcher, [2])
        await eventually(lambda: batcher.queue_depth == 1)
        batcher.check_admission()  # just queued: admitted
        await asyncio.sleep(0.12)  # the oldest has now waited over 2 x 50 ms
        with pytest.raises(QueueWaitError):
            batcher.check_admission()
        engine.gate.set()
        assert await asyncio.gather(held, *queued) == [2 * HOLD, 4]


async def test_an_empty_queue_admits_however_slow_the_model():
    """Progress: a model slower than the limit per batch still takes one request at a time."""
    async with running(FakeEngine(), SlowEngine(0.05), max_batch_size=4, max_queue_wait_ms=10) as batcher:
        assert await batcher.submit(1) == 2
        first = asyncio.create_task(batcher.submit_many([1, 2, 3, 4]))
        await eventually(lambda: batcher.in_flight == 4)
        assert batcher.expected_wait_s() > 0.01  # the running batch alone is over the limit
        second = asyncio.create_task(batcher.submit(7))  # the queue is empty: admitted
        await eventually(lambda: batcher.queue_depth == 1)
        with pytest.raises(QueueWaitError):
            await batcher.submit(8)
        assert await first == [2, 4, 6, 8] and await second == 14


async def test_without_a_wait_limit_only_the_count_bounds_the_queue():
    async with running(FakeEngine(), SlowEngine(0.01), max_batch_size=4, max_queue_size=1000) as batcher:
        await batcher.submit(1)
        tasks = spawn(batcher, range(60))
        await eventually(lambda: batcher.queue_depth > 20)
        batcher.check_admission()
        assert await batcher.submit(3) == 6
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5"])
def test_max_queue_wait_ms_is_checked(bad):
    with pytest.raises(ValueError, match="max_queue_wait_ms"):
        Batcher(FakeEngine(), max_batch_size=1, max_queue_size=1, max_queue_wait_ms=bad)


async def test_deadline_passing_while_queued_fails_without_running():
    engine = FakeEngine()
    expired: list[int] = []
    async with running(engine, max_batch_size=4, on_expired=expired.append) as batcher:
        held = await hold_engine(batcher, engine)
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(7, deadline=time.monotonic() + 0.05)
        assert batcher.queue_depth == 0
        assert expired == [1]
        engine.gate.set()
        await held
        assert await batcher.submit(8) == 16
    assert 7 not in engine.seen


async def test_expired_items_are_counted_once_whoever_notices_first():
    engine = FakeEngine()
    expired: list[int] = []
    async with running(engine, max_batch_size=4, on_expired=expired.append) as batcher:
        held = await hold_engine(batcher, engine)
        many = asyncio.create_task(batcher.submit_many([1, 2, 3], deadline=time.monotonic() + 0.1))
        await eventually(lambda: batcher.queue_depth == 3)
        engine.gate.set()
        time.sleep(0.15)  # block the loop: the timers and the freed worker race
        with pytest.raises(DeadlineExceededError):
            await many
        await held
        assert batcher.queue_depth == 0
    assert sum(expired) == 3
    assert engine.seen == [HOLD]


async def test_deadline_already_passed_is_rejected_at_submit():
    engine = FakeEngine()
    expired: list[int] = []
    async with running(engine, on_expired=expired.append) as batcher:
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(1, deadline=time.monotonic() - 1)
    assert engine.batches == []
    assert expired == [1]


async def test_deadline_passing_while_running_fails_the_caller_and_batch_completes():
    engine = FakeEngine()
    stats: list[BatchStats] = []
    async with running(engine, on_batch=stats.append) as batcher:
        held = asyncio.create_task(batcher.submit(HOLD, deadline=time.monotonic() + 1.0))
        await eventually(engine.entered.is_set)  # running (held at the gate) before its deadline passes
        with pytest.raises(DeadlineExceededError):
            await held
        assert batcher.in_flight == 1
        engine.gate.set()
        await eventually(lambda: batcher.in_flight == 0)
        assert await batcher.submit(2) == 4
    assert engine.batches == [[HOLD], [2]]
    assert stats[0].ok


async def test_cancelled_caller_leaves_the_queue_and_is_never_run():
    engine = FakeEngine()
    async with running(engine, max_batch_size=4) as batcher:
        held = await hold_engine(batcher, engine)
        doomed = asyncio.create_task(batcher.submit(7))
        kept = asyncio.create_task(batcher.submit(8))
        await eventually(lambda: batcher.queue_depth == 2)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.queue_depth == 1
        engine.gate.set()
        assert await held == HOLD * 2
        assert await kept == 16
    assert 7 not in engine.seen
    assert engine.batches[-1] == [8]


async def test_exception_reaches_every_waiter_and_next_batch_works():
    engine = FakeEngine()
    stats: list[BatchStats] = []
    async with running(engine, max_batch_size=4, on_batch=stats.append) as batcher:
        held = await hold_engine(batcher, engine)
        doomed = spawn(batcher, [FAIL, 1, 2])
        await eventually(lambda: batcher.queue_depth == 3)
        engine.gate.set()
        await held
        errors = await asyncio.gather(*doomed, return_exceptions=True)
        assert await batcher.submit(3) == 6
    assert engine.batches[1] == [FAIL, 1, 2]
    for error in errors:
        assert isinstance(error, InferenceError)
        assert isinstance(error.__cause__, ValueError)
        assert "cannot process" in str(error)
    assert len({id(e) for e in errors}) == 3, "each waiter gets its own exception"
    assert [s.ok for s in stats] == [True, False, True]


async def test_output_count_mismatch_fails_the_whole_batch():
    engine = FakeEngine()

    def short(items: list[int]) -> list[int]:
        outputs = engine(items)
        return outputs if HOLD in items else outputs[:-1]

    async with running(engine, short, max_batch_size=4) as batcher:
        held = await hold_engine(batcher, engine)
        tasks = spawn(batcher, [1, 2, 3])
        await eventually(lambda: batcher.queue_depth == 3)
        engine.gate.set()
        await held
        errors = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(errors) == 3
    for error in errors:
        assert isinstance(error, InferenceError)
        assert "returned 2 outputs for 3 inputs" in str(error)


async def test_submit_many_keeps_order_across_batches():
    engine = FakeEngine()
    async with running(engine, max_batch_size=3) as batcher:
        assert await batcher.submit_many(list(range(7))) == [x * 2 for x in range(7)]
        assert await batcher.submit_many([]) == []
    assert all(len(b) <= 3 for b in engine.batches)
    assert engine.seen == list(range(7))


async def test_submit_many_admission_is_all_or_nothing():
    engine = FakeEngine()
    async with running(engine, max_batch_size=4, max_queue_size=4) as batcher:
        held = await hold_engine(batcher, engine)
        first = asyncio.create_task(batcher.submit_many([1, 2]))
        await eventually(lambda: batcher.queue_depth == 2)
        with pytest.raises(QueueFullError):
            await batcher.submit_many([10, 11, 12])
        assert batcher.queue_depth == 2
        with pytest.raises(QueueFullError, match="never fit"):
            await batcher.submit_many(list(range(20, 25)))
        second = asyncio.create_task(batcher.submit_many([3, 4]))
        await eventually(lambda: batcher.queue_depth == 4)
        engine.gate.set()
        await held
        assert await first == [2, 4]
        assert await second == [6, 8]
    assert not {10, 11, 12} & set(engine.seen)


async def test_submit_many_failure_cancels_the_rest():
    engine = FakeEngine()
    async with running(engine, max_batch_size=1) as batcher:
        with pytest.raises(InferenceError):
            await batcher.submit_many([FAIL, HOLD, 5])
        assert batcher.queue_depth == 0
        engine.gate.set()
        await eventually(lambda: batcher.in_flight == 0)
        assert await batcher.submit(6) == 12
    assert 5 not in engine.seen


async def test_close_with_drain_answers_everything_then_rejects():
    engine = FakeEngine()
    batcher: Batcher[int, int] = Batcher(engine, max_batch_size=2, max_queue_size=64)
    await batcher.start()
    held = await hold_engine(batcher, engine)
    tasks = spawn(batcher, range(9))
    await eventually(lambda: batcher.queue_depth == 9)
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(ModelClosedError):
        await batcher.submit(100)
    engine.gate.set()
    await closing
    assert held.result() == HOLD * 2
    assert [t.result() for t in tasks] == [x * 2 for x in range(9)]
    assert batcher.queue_depth == 0 and batcher.in_flight == 0
    with pytest.raises(ModelClosedError):
        await batcher.submit(101)
    assert 100 not in engine.seen and 101 not in engine.seen
    await batcher.close()


async def test_close_without_drain_fails_queued_but_finishes_in_flight():
    engine = FakeEngine()
    depths: list[int] = []
    batcher: Batcher[int, int] = Batcher(engine, max_batch_size=2, max_queue_size=64, on_queue_depth=depths.append)
    await batcher.start()
    held = await hold_engine(batcher, engine)
    tasks = spawn(batcher, range(5))
    await eventually(lambda: batcher.queue_depth == 5)
    closing = asyncio.create_task(batcher.close(drain=False))
    errors = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, ModelClosedError) for e in errors)
    engine.gate.set()
    await closing
    assert await held == HOLD * 2
    assert engine.batches == [[HOLD]]
    assert depths[-1] == 0


async def test_close_timeout_fails_a_stuck_batch():
    engine = FakeEngine()
    batcher: Batcher[int, int] = Batcher(engine, max_batch_size=2, max_queue_size=64)
    await batcher.start()
    try:
        held = await hold_engine(batcher, engine)
        queued = asyncio.create_task(batcher.submit(1))
        await eventually(lambda: batcher.queue_depth == 1)
        await batcher.close(timeout=0.1)
        with pytest.raises(ModelClosedError):
            await held
        with pytest.raises(ModelClosedError):
            await queued
    finally:
        engine.gate.set()


async def test_callbacks_receive_plausible_values():
    engine = FakeEngine()
    stats: list[BatchStats] = []
    depths: list[int] = []
    async with running(engine, max_batch_size=4, on_batch=stats.append, on_queue_depth=depths.append) as batcher:
        held = await hold_engine(batcher, engine)
        tasks = spawn(batcher, range(6))
        await eventually(lambda: batcher.queue_depth == 6)
        engine.gate.set()
        await asyncio.gather(held, *tasks)
    assert [s.size for s in stats] == [1, 4, 2]
    for s in stats:
        assert s.ok
        assert len(s.queue_wait_s) == s.size
        assert all(w >= 0 for w in s.queue_wait_s)
        assert s.run_s >= 0
    assert stats[0].run_s > 0
    assert max(depths) == 6
    assert depths[-1] == 0
    assert all(a != b for a, b in zip(depths, depths[1:])), "reported only on change"


async def test_raising_callbacks_are_logged_and_ignored(caplog):
    def boom(_):
        raise RuntimeError("callback bug")

    engine = FakeEngine()
    with caplog.at_level(logging.ERROR, logger="service.models.batching"):
        async with running(engine, on_batch=boom, on_queue_depth=boom, on_expired=boom) as batcher:
            assert await batcher.submit(1) == 2
            with pytest.raises(DeadlineExceededError):
                await batcher.submit(2, deadline=time.monotonic() - 1)
            assert await batcher.submit_many([3, 4]) == [6, 8]
    logged = {r.getMessage() for r in caplog.records}
    assert any("on_batch" in m for m in logged)
    assert any("on_queue_depth" in m for m in logged)
    assert any("on_expired" in m for m in logged)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1, got 0"),
        ({"max_queue_size": 0}, ValueError, "max_queue_size must be >= 1, got 0"),
        ({"instances": 0}, ValueError, "instances must be >= 1, got 0"),
        ({"max_queue_delay_ms": -1}, ValueError, "max_queue_delay_ms must be a finite number >= 0"),
        ({"max_queue_delay_ms": float("nan")}, ValueError, "max_queue_delay_ms must be a finite number >= 0"),
        ({"max_batch_size": 2.5}, TypeError, "max_batch_size must be an int"),
        ({"on_batch": 3}, TypeError, "on_batch must be callable"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    arguments = {"max_batch_size": 4, "max_queue_size": 8, **kwargs}
    with pytest.raises(error, match=message):
        Batcher(FakeEngine(), **arguments)


async def test_submit_before_start_is_an_error():
    batcher: Batcher[int, int] = Batcher(FakeEngine(), max_batch_size=1, max_queue_size=1)
    with pytest.raises(RuntimeError, match="start"):
        await batcher.submit(1)


def test_errors_carry_the_status_a_caller_answers_with():
    statuses = {QueueFullError: 503, ShedError: 503, ModelClosedError: 503, DeadlineExceededError: 504,
                InferenceError: 500}
    for error, status in statuses.items():
        assert issubclass(error, ServiceError) and error.status_code == status


# --- low-priority (shadow) traffic ---------------------------------------------------------


async def test_low_priority_items_fill_batches_after_normal_ones():
    engine = FakeEngine()
    async with running(engine, max_batch_size=4, shed_depth=10) as batcher:
        held = await hold_engine(batcher, engine)
        low = [asyncio.ensure_future(batcher.submit(100 + i, priority="low")) for i in range(3)]
        normal = spawn(batcher, range(2))
        await eventually(lambda: batcher.queue_depth == 5)
        assert batcher.low_queue_depth == 3
        engine.gate.set()
        assert await asyncio.gather(*normal) == [0, 2]
        assert await asyncio.gather(*low) == [200, 202, 204]
        await held
    assert engine.batches[1] == [0, 1, 100, 101], "normal first, low-priority fills the rest"


async def test_low_priority_is_refused_while_normal_traffic_queues():
    engine = FakeEngine()
    shed: list[int] = []
    async with running(engine, max_batch_size=4, shed_depth=2, on_shed=shed.append) as batcher:
        held = await hold_engine(batcher, engine)
        normal = spawn(batcher, range(2))
        await eventually(lambda: batcher.queue_depth == 2)
        with pytest.raises(ShedError, match="shed"):
            await batcher.submit(7, priority="low")
        engine.gate.set()
        await asyncio.gather(*normal, held)
    assert shed == [1]
    assert 7 not in engine.seen


async def test_queued_low_priority_items_are_shed_when_normal_traffic_arrives():
    engine = FakeEngine()
    shed: list[int] = []
    async with running(engine, max_batch_size=4, shed_depth=3, on_shed=shed.append) as batcher:
        held = await hold_engine(batcher, engine)
        low = [asyncio.ensure_future(batcher.submit(100 + i, priority="low")) for i in range(2)]
        await eventually(lambda: batcher.low_queue_depth == 2)
        normal = spawn(batcher, range(3))  # reaches shed_depth: the queued shadows go
        results = await asyncio.gather(*low, return_exceptions=True)
        assert all(isinstance(r, ShedError) for r in results)
        engine.gate.set()
        assert await asyncio.gather(*normal) == [0, 2, 4]
        await held
    assert shed == [2]
    assert not {100, 101} & set(engine.seen)


async def test_low_priority_never_takes_room_from_normal_admission():
    engine = FakeEngine()
    async with running(engine, max_batch_size=4, max_queue_size=2, max_low_queue_size=5, shed_depth=3) as batcher:
        held = await hold_engine(batcher, engine)
        low = [asyncio.ensure_future(batcher.submit(100 + i, priority="low")) for i in range(5)]
        await eventually(lambda: batcher.low_queue_depth == 5)
        normal = spawn(batcher, range(2))  # the normal queue still has its full capacity
        with pytest.raises(ShedError):
            await batcher.submit(200, priority="low")  # the low queue is full
        engine.gate.set()
        assert await asyncio.gather(*normal) == [0, 2]
        assert len(await asyncio.gather(*low)) == 5
        await held


async def test_low_priority_work_waits_while_another_model_has_normal_requests_queued():
    """Models share the cores: a shadow on one model must not slow the primary of another."""
    primary_engine, shadow_engine = FakeEngine(), FakeEngine()
    async with running(primary_engine, max_batch_size=1) as primary, running(shadow_engine) as shadow:
        held = await hold_engine(primary, primary_engine)
        queued = spawn(primary, [1, 2])
        await eventually(lambda: primary.queue_depth == 2)
        low = asyncio.ensure_future(shadow.submit(100, priority="low"))
        await asyncio.sleep(0.1)
        assert not low.done() and shadow_engine.batches == []  # yielding
        normal = await shadow.submit(7)  # normal traffic of the shadow's own model is not held back
        assert normal == 14 and shadow_engine.batches == [[7]]
        primary_engine.gate.set()
        assert await asyncio.gather(held, *queued) == [2 * HOLD, 2, 4]
        assert await low == 200  # the other model's queue is empty: the shadow runs
    assert shadow_engine.batches == [[7], [100]]


async def test_a_batch_of_low_priority_items_only_takes_what_runs_in_about_a_tenth_of_a_second():
    engine = SlowEngine(0.04)  # 40 ms per image on one lane: 2 images fit in LOW_BATCH_S (0.1 s)
    sizes: list[int] = []
    async with running(FakeEngine(), engine, max_batch_size=8,
                       on_batch=lambda stats: sizes.append(stats.size)) as batcher:
        await batcher.submit(1)  # learns the run time per image
        low = [asyncio.ensure_future(batcher.submit(100 + i, priority="low")) for i in range(6)]
        assert await asyncio.gather(*low) == [200 + 2 * i for i in range(6)]
        mixed = spawn(batcher, [1, 2, 3])  # normal items still fill whole batches, with low ones after them
        await asyncio.gather(*mixed)
    assert sizes[0] == 1 and max(sizes[1:4]) <= 2, sizes


async def test_closing_during_warmup_never_starts_and_a_second_start_is_refused():
    engine = FakeEngine()
    warming = threading.Event()
    finish = threading.Event()

    def warmup() -> None:
        warming.set()
        assert finish.wait(5)

    batcher: Batcher[int, int] = Batcher(engine, max_batch_size=4, max_queue_size=8, warmup=warmup)
    starting = asyncio.create_task(batcher.start())
    await eventually(warming.is_set)
    with pytest.raises(RuntimeError, match="already started"):
        await batcher.start()
    await batcher.close()
    finish.set()
    with pytest.raises(ModelClosedError, match="closed while warming up"):
        await starting
    with pytest.raises(ModelClosedError):
        await batcher.submit(1)
    assert engine.batches == []


# run_alone: a lone request gets the whole machine; under load, batches run side by side.


async def test_a_lone_item_runs_alone_and_batches_of_several_run_beside_each_other():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        assert await batcher.submit(3) == 6
        assert await batcher.submit(4) == 8
        assert alone.batches == [[3], [4]] and lanes.batches == []
        assert alone.off_loop
        # Two requests at once: one batch of two, in a lane.
        held = spawn(batcher, [5, HOLD])
        await eventually(lanes.entered.is_set)
        assert lanes.batches == [[5, HOLD]]
        # One batch is running: a single item now runs beside it, on the other instance.
        assert await asyncio.wait_for(batcher.submit(7), 5) == 14
        assert [7] in lanes.batches and [7] not in alone.batches
        lanes.gate.set()
        assert await asyncio.gather(*held) == [10, HOLD * 2]


async def test_nothing_starts_while_a_batch_runs_alone():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held, tasks = await behind_a_lone_batch(batcher, alone, [1, 2, 3])
        await asyncio.sleep(0.05)
        assert lanes.batches == [] and batcher.queue_depth == 3, "a batch started beside the one running alone"
        alone.gate.set()
        assert await asyncio.gather(*tasks) == [2, 4, 6]
        assert await held == HOLD * 2
    assert lanes.batches == [[1, 2, 3]], "what waited goes as one batch, beside nothing"


async def test_a_failing_lone_run_answers_its_request_and_the_next_one_runs():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        with pytest.raises(InferenceError):
            await batcher.submit(FAIL)
        assert await asyncio.wait_for(batcher.submit(6), 5) == 12
    assert alone.batches == [[FAIL], [6]]


async def test_run_alone_must_be_callable():
    with pytest.raises(TypeError, match="run_alone"):
        Batcher(FakeEngine(), max_batch_size=2, max_queue_size=2, run_alone=42)


async def test_one_requests_several_items_run_alone_but_several_requests_do_not():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, max_batch_size=4, run_alone=alone) as batcher:
        assert await batcher.submit_many([1, 2, 3]) == [2, 4, 6]  # one request, the model idle
        assert alone.batches == [[1, 2, 3]] and lanes.batches == []
        held = asyncio.create_task(batcher.submit(HOLD))  # alone; meanwhile two requests queue up
        await eventually(alone.entered.is_set)
        tasks = [asyncio.create_task(batcher.submit_many([4, 5])), asyncio.create_task(batcher.submit(6))]
        await eventually(lambda: batcher.queue_depth == 3)
        alone.gate.set()
        assert await asyncio.gather(*tasks) == [[8, 10], 12]
        assert await held == HOLD * 2
    assert lanes.batches == [[4, 5, 6]], "a batch of two requests runs in a lane"


async def test_a_batch_runs_alone_only_when_nothing_else_waits():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, max_batch_size=2, run_alone=alone) as batcher:
        # One request larger than a batch: its first batch leaves the rest queued, so it runs in a lane, and the
        # rest runs in the other lane.
        assert await batcher.submit_many([1, 2, 3]) == [2, 4, 6]
        # One request's batch with another request queued behind it: in a lane too.
        results = await asyncio.gather(batcher.submit_many([4, 5]), batcher.submit(6))
        assert results == [[8, 10], 12]
    assert alone.batches == []
    assert sorted(map(sorted, lanes.batches)) == [[1, 2], [3], [4, 5], [6]]


async def test_batch_stats_say_which_batches_ran_alone():
    lanes, alone = FakeEngine(), FakeEngine()
    stats: list[BatchStats] = []
    async with running(lanes, instances=2, run_alone=alone, on_batch=stats.append) as batcher:
        assert await batcher.submit(1) == 2
        assert await asyncio.gather(batcher.submit(2), batcher.submit(3)) == [4, 6]
    assert [(s.size, s.alone) for s in stats] == [(1, True), (2, False)]


async def test_closing_with_drain_runs_what_waited_behind_a_lone_batch():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held, tasks = await behind_a_lone_batch(batcher, alone, [1, 2])
        closing = asyncio.create_task(batcher.close(drain=True))
        await asyncio.sleep(0.02)
        with pytest.raises(ModelClosedError):
            await batcher.submit(3)  # closed to new work while it drains
        alone.gate.set()
        await closing
        assert await asyncio.gather(held, *tasks) == [HOLD * 2, 2, 4]
    assert lanes.batches == [[1, 2]]


async def test_closing_without_drain_fails_what_waited_and_lets_the_lone_batch_finish():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held, tasks = await behind_a_lone_batch(batcher, alone, [1, 2])
        closing = asyncio.create_task(batcher.close(drain=False))
        for task in tasks:
            with pytest.raises(ModelClosedError, match="without draining"):
                await task
        alone.gate.set()
        await closing
        assert await held == HOLD * 2
    assert lanes.batches == []


async def test_a_close_that_times_out_answers_a_stuck_lone_batch():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held, (queued,) = await behind_a_lone_batch(batcher, alone, [1])
        started = time.monotonic()
        await batcher.close(timeout=0.1)
        assert time.monotonic() - started < 2
        for task in (held, queued):
            with pytest.raises(ModelClosedError):
                await task
    assert lanes.batches == []


async def test_a_deadline_that_passes_behind_a_lone_batch_expires_the_request_unrun():
    lanes, alone = FakeEngine(), FakeEngine()
    expired: list[int] = []
    async with running(lanes, instances=2, run_alone=alone, on_expired=expired.append) as batcher:
        held = asyncio.create_task(batcher.submit(HOLD))
        await eventually(alone.entered.is_set)
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(5, deadline=time.monotonic() + 0.05)
        assert batcher.queue_depth == 0
        alone.gate.set()
        assert await held == HOLD * 2
        assert await batcher.submit(6) == 12  # and the next request runs
    assert sum(expired) == 1
    assert 5 not in lanes.seen + alone.seen


async def test_with_a_queue_delay_a_lone_request_still_runs_alone_and_a_gathered_batch_in_a_lane():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone, max_queue_delay_ms=100) as batcher:
        started = time.monotonic()
        assert await batcher.submit(1) == 2
        assert time.monotonic() - started >= 0.09, "a partial batch went before the delay"
        assert alone.batches == [[1]]
    assert lanes.batches == []
    # Two requests 20 ms apart, well within the delay (5 s, so that a stalled event loop cannot let it pass
    # between them): gathered into one batch, which runs in a lane as soon as it is full.
    async with running(lanes, instances=2, run_alone=alone, max_queue_delay_ms=5000, max_batch_size=2) as batcher:
        started = time.monotonic()
        first = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.02)
        assert await asyncio.gather(first, batcher.submit(3)) == [4, 6]
        assert time.monotonic() - started < 4, "a full batch waited out the delay"
    assert lanes.batches == [[2, 3]] and alone.batches == [[1]]


# run_now: a lone request on an idle model is prepared (decoded) and run in one batch thread.


async def test_run_now_prepares_and_runs_in_one_batch_thread_alone():
    lanes, alone = FakeEngine(), FakeEngine()
    stats: list[BatchStats] = []
    threads: list[threading.Thread] = []

    def prepare() -> int:
        threads.append(threading.current_thread())
        return 3

    async with running(lanes, instances=2, run_alone=alone, on_batch=stats.append) as batcher:
        assert batcher.can_run_now
        assert await batcher.run_now(prepare) == 6
        assert alone.batches == [[3]] and lanes.batches == [] and alone.off_loop
        assert threads[0] is not threading.main_thread() and threads[0].name.startswith("batcher-0")
        assert batcher.can_run_now and batcher.in_flight == 0  # released once answered
    assert [(s.size, s.queue_wait_s, s.ok, s.alone) for s in stats] == [(1, [0.0], True, True)]


async def test_run_now_is_refused_unless_the_batcher_is_idle():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held, tasks = await behind_a_lone_batch(batcher, alone, [1])
        assert not batcher.can_run_now  # a batch runs, one waits
        with pytest.raises(RuntimeError, match="idle"):
            await batcher.run_now(lambda: 2)
        alone.gate.set()
        await asyncio.gather(held, *tasks)
        assert batcher.can_run_now
    assert not batcher.can_run_now  # closed
    # Settings under which a run cannot take the model at once: a queue delay to gather a batch, or several
    # instances with no run_alone to keep the others off the model while it runs.
    for kwargs in ({"run_alone": alone, "max_queue_delay_ms": 5}, {"instances": 2}):
        async with running(FakeEngine(), **kwargs) as batcher:
            assert not batcher.can_run_now
    async with running(FakeEngine(), instances=1) as batcher:
        assert batcher.can_run_now


async def test_what_arrives_during_run_now_waits_for_it_then_runs_as_one_batch():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held = asyncio.create_task(batcher.run_now(lambda: HOLD))
        await eventually(alone.entered.is_set)
        assert not batcher.can_run_now
        tasks = spawn(batcher, [1, 2])
        await asyncio.sleep(0.05)
        assert lanes.batches == [] and batcher.queue_depth == 2, "a batch started beside the run_now"
        alone.gate.set()
        assert await held == HOLD * 2
        assert await asyncio.gather(*tasks) == [2, 4]
    assert lanes.batches == [[1, 2]]


async def test_what_prepare_raises_reaches_the_caller_unchanged_and_nothing_runs():
    lanes, alone = FakeEngine(), FakeEngine()
    stats: list[BatchStats] = []

    def prepare() -> int:
        raise ServiceError("undecodable")

    async with running(lanes, instances=2, run_alone=alone, on_batch=stats.append) as batcher:
        with pytest.raises(ServiceError, match="undecodable") as caught:
            await batcher.run_now(prepare)
        assert type(caught.value) is ServiceError
        assert alone.batches == [] and stats == []
        assert batcher.can_run_now and await batcher.run_now(lambda: 4) == 8


async def test_a_failing_run_now_is_an_inference_error_and_the_next_runs():
    lanes, alone = FakeEngine(), FakeEngine()
    stats: list[BatchStats] = []
    async with running(lanes, instances=2, run_alone=alone, on_batch=stats.append) as batcher:
        with pytest.raises(InferenceError, match="a batch of 1"):
            await batcher.run_now(lambda: FAIL)
        assert await batcher.run_now(lambda: 5) == 10
    assert [s.ok for s in stats] == [False, True]


async def test_run_now_past_its_deadline_answers_at_the_deadline_and_holds_the_model_until_the_run_ends():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await batcher.run_now(lambda: HOLD, deadline=time.monotonic() + 0.05)
        assert time.monotonic() - started < 2
        # The run goes on in its thread: nothing else may start on the model until it ends.
        assert not batcher.can_run_now and batcher.in_flight == 1
        task = spawn(batcher, [7])[0]
        await asyncio.sleep(0.05)
        assert not task.done() and lanes.batches == []
        alone.gate.set()
        assert await task == 14
        await eventually(lambda: batcher.can_run_now)


async def test_a_cancelled_run_now_caller_leaves_the_run_to_finish_alone():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        caller = asyncio.create_task(batcher.run_now(lambda: HOLD))
        await eventually(alone.entered.is_set)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert not batcher.can_run_now and batcher.in_flight == 1
        alone.gate.set()
        await eventually(lambda: batcher.can_run_now)
        assert await batcher.submit(1) == 2


async def test_closing_waits_for_a_run_now_and_a_close_that_times_out_does_not_hang():
    lanes, alone = FakeEngine(), FakeEngine()
    async with running(lanes, instances=2, run_alone=alone) as batcher:
        held = asyncio.create_task(batcher.run_now(lambda: HOLD))
        await eventually(alone.entered.is_set)
        closing = asyncio.create_task(batcher.close(drain=True))
        await asyncio.sleep(0.05)
        assert not closing.done(), "close did not wait for the run"
        alone.gate.set()
        await closing
        assert await held == HOLD * 2
    stuck = FakeEngine()
    batcher = Batcher(FakeEngine(), max_batch_size=2, max_queue_size=4, instances=2, run_alone=stuck)
    await batcher.start()
    held = asyncio.create_task(batcher.run_now(lambda: HOLD))
    await eventually(stuck.entered.is_set)
    started = time.monotonic()
    await batcher.close(timeout=0.1)
    assert time.monotonic() - started < 2
    stuck.gate.set()
    assert await held == HOLD * 2  # the run finished after all; its caller still waited for it
