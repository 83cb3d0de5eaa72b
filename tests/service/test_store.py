"""The experiment store, on SQLite files and on PostgreSQL: log, feedback, joins, retention, durability, threads.

Every test that takes ``store`` or ``store_factory`` runs against both stores (ids ``[sqlite]`` and
``[postgres]``); the PostgreSQL runs need a server (``bash .ci/postgres.sh``, see tests/service/postgres.py):
without one they fail when ``CI`` is set and are skipped otherwise.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from service.store import (
    ConflictingFeedbackError,
    ExperimentStore,
    LabelledPrediction,
    PredictionRecord,
    ShadowPair,
    SQLiteStore,
    StoreError,
    UnknownRequestError,
    is_postgres_url,
    open_store,
)

from . import postgres as pg

DAY = 86400.0


def rec(
    request_id: str,
    image_index: int = 0,
    *,
    experiment: str = "exp",
    variant: str = "a",
    role: str = "primary",
    created_at: float | None = None,
    top5: tuple[int, ...] = (3, 1, 4, 5, 9),
) -> PredictionRecord:
    scores = tuple(round(0.5 / (i + 1), 6) + 0.1 * image_index for i in range(len(top5)))
    return PredictionRecord(
        request_id=request_id,
        image_index=image_index,
        experiment=experiment,
        variant=variant,
        role=role,  # type: ignore[arg-type]
        model=f"model-{variant}",
        version=2,
        top5=top5,
        top5_scores=scores,
        latency_s=0.0123,
        created_at=time.time() if created_at is None else created_at,
    )


class StoreFactory:
    """Opens stores on one database of one backend (a SQLite file, or a PostgreSQL schema);
    every call is another connection to the same data, as another worker or replica would be."""

    def __init__(self, backend: str, location: str | Path, stack: ExitStack) -> None:
        self.backend = backend
        self.location = location  # the SQLite file, or the PostgreSQL URL (with its search_path)
        self._stack = stack

    def __call__(self, **options) -> ExperimentStore:
        if self.backend == "sqlite":
            store: ExperimentStore = SQLiteStore(self.location, **options)
        else:
            from service.store.postgres import PostgresStore

            store = PostgresStore(str(self.location), **options)
        self._stack.callback(store.close)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path):
    with ExitStack() as stack:
        if request.param == "sqlite":
            location: str | Path = tmp_path / "store.db"
        else:
            location = stack.enter_context(pg.fresh_schema())
        factory = StoreFactory(request.param, location, stack)
        yield factory  # the stores close before the schema is dropped (ExitStack: last in, first out)


@pytest.fixture
def store(store_factory: StoreFactory) -> ExperimentStore:
    return store_factory()


def raw_pg(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def run_threads(target: Callable[[int], None], n: int, timeout: float = 60) -> list[BaseException]:
    """Run ``target(i)`` for i in range(n) in threads; the exceptions they raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    workers = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout)
    assert not any(w.is_alive() for w in workers), "threads still running: a deadlock?"
    return errors


# -- the shared suite: both stores ----------------------------------------------------------------


def test_is_an_experiment_store(store: ExperimentStore) -> None:
    assert isinstance(store, ExperimentStore)
    assert store.counts() == {"predictions": 0, "feedback": 0}


def test_record_and_find_primary(store: ExperimentStore) -> None:
    primary = rec("r1", variant="a")
    shadow = rec("r1", variant="b", role="shadow", top5=(7, 8))
    store.record([primary, shadow])
    store.record([rec("only-shadow", variant="b", role="shadow")])

    found = store.find_primary("r1")
    assert found == primary  # every field round-trips, floats exactly, top5 as tuples
    assert isinstance(found.top5, tuple) and isinstance(found.top5_scores, tuple)
    assert store.find_primary("r1", 1) is None
    assert store.find_primary("nope") is None
    assert store.find_primary("only-shadow") is None  # a shadow is not a primary
    assert store.counts() == {"predictions": 3, "feedback": 0}


def test_record_empty_is_a_no_op_and_retry_keeps_first_written(store: ExperimentStore) -> None:
    store.record([])
    first = rec("r1", created_at=time.time() - 5)
    store.record([first])
    store.record([first, rec("r2")])  # a retried batch does no harm
    store.record([rec("r1", top5=(0,))])  # same key, other content: the first stays
    assert store.find_primary("r1") == first
    assert store.counts()["predictions"] == 2


def test_record_validates_before_writing_anything(store: ExperimentStore) -> None:
    bad_scores = PredictionRecord("r9", 0, "exp", "a", "primary", "m", 1, (1, 2), (0.5,), 0.1, time.time())
    with pytest.raises(ValueError, match="top5 has 2 classes but top5_scores 1"):
        store.record([rec("r8"), bad_scores])
    with pytest.raises(ValueError, match="role must be"):
        store.record([rec("r8", role="canary")])
    assert store.counts()["predictions"] == 0


def test_multi_image_requests_are_kept_apart(store: ExperimentStore) -> None:
    images = [rec("multi", i, top5=(i, i + 1, i + 2)) for i in range(3)]
    shadows = [rec("multi", i, variant="b", role="shadow", top5=(9 - i,)) for i in range(3)]
    store.record(images + shadows)

    for i in range(3):
        assert store.find_primary("multi", i) == images[i]
    assert store.add_feedback("multi", 1, 42, time.time()) == "created"
    assert store.add_feedback("multi", 2, 7, time.time()) == "created"  # another image, another label: no conflict
    with pytest.raises(UnknownRequestError, match=r"'multi' \(image 3\)"):
        store.add_feedback("multi", 3, 1, time.time())

    data = store.experiment_data("exp")
    assert [(p.prediction.image_index, p.label) for p in data.primaries] == [(0, None), (1, 42), (2, 7)]
    assert [(sp.primary.image_index, sp.shadow.image_index, sp.shadow.top5) for sp in data.shadow_pairs] == [
        (0, 0, (9,)),
        (1, 1, (8,)),
        (2, 2, (7,)),
    ]


def test_experiment_data_joins_feedback_and_shadow_pairs(store: ExperimentStore) -> None:
    t = time.time() - 100
    r1 = rec("r1", variant="A", created_at=t + 1)
    r1_b = rec("r1", variant="B", role="shadow", created_at=t + 1.5)
    r1_c = rec("r1", variant="C", role="shadow", created_at=t + 1.6)
    r2 = rec("r2", variant="B", created_at=t + 2)
    r2_a = rec("r2", variant="A", role="shadow", created_at=t + 2.5)
    r3 = rec("r3", variant="A", created_at=t + 3)
    other = rec("r4", experiment="other", variant="A", created_at=t + 4)
    other_shadow = rec("r4", experiment="other", variant="B", role="shadow", created_at=t + 4)
    stray_shadow = rec("r3", experiment="other", variant="B", role="shadow", created_at=t + 3)  # same id, other exp
    store.record([r3, r2_a, r1_c, other, r1, stray_shadow, r2, r1_b, other_shadow])  # order does not matter
    assert store.add_feedback("r1", 0, 5, t + 10) == "created"
    assert store.add_feedback("r3", 0, 8, t + 11) == "created"
    assert store.add_feedback("r4", 0, 1, t + 12) == "created"

    data = store.experiment_data("exp")
    assert data.experiment == "exp"
    assert data.primaries == [
        LabelledPrediction(r1, label=5, labelled_at=t + 10),
        LabelledPrediction(r2),
        LabelledPrediction(r3, label=8, labelled_at=t + 11),
    ]
    assert data.shadow_pairs == [ShadowPair(r1, r1_b), ShadowPair(r1, r1_c), ShadowPair(r2, r2_a)]
    assert data.shadow_shed == {}

    other_data = store.experiment_data("other")
    assert other_data.primaries == [LabelledPrediction(other, label=1, labelled_at=t + 12)]
    assert other_data.shadow_pairs == [ShadowPair(other, other_shadow)]
    empty = store.experiment_data("missing")
    assert empty.primaries == [] and empty.shadow_pairs == []


def test_ties_on_time_keep_insertion_order_and_names_sort_bytewise(store: ExperimentStore) -> None:
    t = time.time() - 100
    store.record([rec(f"same-{i}", created_at=t) for i in (3, 1, 2)])
    store.record([rec("same-3", variant=v, role="shadow", created_at=t) for v in ("b", "B", "a", "_")])
    data = store.experiment_data("exp")
    assert [p.prediction.request_id for p in data.primaries] == ["same-3", "same-1", "same-2"]
    assert [sp.shadow.variant for sp in data.shadow_pairs] == ["B", "_", "a", "b"]  # as bytes, not a locale


def test_experiment_data_since(store: ExperimentStore) -> None:
    t = time.time() - 100
    old, new = rec("old", created_at=t), rec("new", created_at=t + 50)
    store.record([old, new, rec("old", variant="b", role="shadow", created_at=t + 60)])
    store.record([rec("new", variant="b", role="shadow", created_at=t + 51)])

    assert [p.prediction.request_id for p in store.experiment_data("exp").primaries] == ["old", "new"]
    recent = store.experiment_data("exp", since=t + 50)  # inclusive; on the primary's time
    assert [p.prediction.request_id for p in recent.primaries] == ["new"]
    assert [(sp.primary.request_id, sp.shadow.request_id) for sp in recent.shadow_pairs] == [("new", "new")]
    assert store.experiment_data("exp", since=t + 50.001).primaries == []


def test_feedback_created_duplicate_conflicting_unknown(store: ExperimentStore) -> None:
    store.record([rec("r1"), rec("shadowed", variant="b", role="shadow")])
    now = time.time()

    assert store.add_feedback("r1", 0, 3, now) == "created"
    assert store.add_feedback("r1", 0, 3, now + 1) == "duplicate"
    with pytest.raises(ConflictingFeedbackError, match=r"already has label 3, not 4") as conflict:
        store.add_feedback("r1", 0, 4, now + 2)
    assert (conflict.value.existing_label, conflict.value.label) == (3, 4)
    assert isinstance(conflict.value, StoreError)

    with pytest.raises(UnknownRequestError, match=r"no prediction with request id 'ghost' \(image 0\).*30-day") as e:
        store.add_feedback("ghost", 0, 1, now)
    assert (e.value.request_id, e.value.image_index) == ("ghost", 0)
    with pytest.raises(UnknownRequestError):
        store.add_feedback("shadowed", 0, 1, now)  # only a shadow ran: nothing was served
    with pytest.raises(ValueError, match="label must be"):
        store.add_feedback("r1", 0, -1, now)

    (labelled,) = store.experiment_data("exp").primaries
    assert (labelled.label, labelled.labelled_at) == (3, now)  # the duplicate and the conflict changed nothing
    assert store.counts() == {"predictions": 2, "feedback": 1}


def test_odd_text_round_trips_or_is_unknown(store: ExperimentStore) -> None:
    odd = rec("ünï-çødé 🙂 ' \" %s \\", experiment="exp %(x)s", variant="ß")
    store.record([odd])
    assert store.find_primary(odd.request_id) == odd
    assert store.add_feedback(odd.request_id, 0, 1, time.time()) == "created"
    assert [p.label for p in store.experiment_data("exp %(x)s").primaries] == [1]
    # A NUL cannot be stored in PostgreSQL text, so no such prediction exists anywhere.
    assert store.find_primary("nul\x00id") is None
    with pytest.raises(UnknownRequestError):
        store.add_feedback("nul\x00id", 0, 1, time.time())
    assert store.experiment_data("nul\x00exp").primaries == []


def test_retention_by_age_removes_old_predictions_and_their_feedback(store_factory: StoreFactory) -> None:
    now = time.time()
    store = store_factory(retention_days=30)
    store.record(
        [
            rec("old", created_at=now - 31 * DAY),
            rec("old", variant="b", role="shadow", created_at=now - 31 * DAY),
            rec("recent", created_at=now - 29 * DAY),
            rec("recent", variant="b", role="shadow", created_at=now - 29 * DAY),
        ]
    )
    store.add_feedback("old", 0, 1, now - 30 * DAY)
    store.add_feedback("recent", 0, 2, now - 28 * DAY)

    assert store.prune(now) == 3  # two predictions and one feedback
    assert store.prune(now) == 0
    assert store.counts() == {"predictions": 2, "feedback": 1}
    assert store.find_primary("old") is None
    with pytest.raises(UnknownRequestError, match="30-day retention"):
        store.add_feedback("old", 0, 1, now)
    data = store.experiment_data("exp")
    assert [(p.prediction.request_id, p.label) for p in data.primaries] == [("recent", 2)]
    assert [sp.shadow.request_id for sp in data.shadow_pairs] == ["recent"]


def test_retention_by_count_keeps_the_newest(store_factory: StoreFactory) -> None:
    t = time.time() - 1000
    store = store_factory(max_predictions=5)
    store.record([rec(f"r{i}", created_at=t + i) for i in range(8)])
    for i in range(8):
        store.add_feedback(f"r{i}", 0, i, t + 100)

    assert store.prune(time.time()) == 6  # three predictions, three feedback
    assert store.counts() == {"predictions": 5, "feedback": 5}
    assert [p.prediction.request_id for p in store.experiment_data("exp").primaries] == [f"r{i}" for i in range(3, 8)]
    assert [p.label for p in store.experiment_data("exp").primaries] == [3, 4, 5, 6, 7]


def test_feedback_stays_while_its_primary_does(store_factory: StoreFactory) -> None:
    t = time.time() - 1000
    store = store_factory(max_predictions=2)
    # The shadow is older than its primary: pruning it must not take the feedback along.
    store.record([rec("r", variant="b", role="shadow", created_at=t), rec("r", created_at=t + 1)])
    store.record([rec("s", created_at=t + 2)])
    store.add_feedback("r", 0, 4, t + 3)
    assert store.prune(time.time()) == 1
    assert store.counts() == {"predictions": 2, "feedback": 1}
    assert store.add_feedback("r", 0, 4, t + 4) == "duplicate"


def test_retention_runs_by_itself_as_records_arrive(store_factory: StoreFactory) -> None:
    now = time.time()
    store = store_factory(max_predictions=20, prune_every=10)
    store.record([rec("ancient", created_at=now - 365 * DAY)])
    for i in range(60):
        store.record([rec(f"r{i}", created_at=now - 60 + i)])
        assert store.counts()["predictions"] <= 20 + 10
    assert store.find_primary("ancient") is None
    assert store.find_primary("r59") is not None
    assert store.find_primary("r0") is None


def test_open_applies_retention(store_factory: StoreFactory) -> None:
    now = time.time()
    with store_factory(retention_days=30) as store:
        store.record([rec("old", created_at=now - 40 * DAY), rec("new", created_at=now)])
    with store_factory(retention_days=30) as store:
        assert store.counts()["predictions"] == 1
        assert store.find_primary("old") is None


def test_persists_across_close_and_reopen(store_factory: StoreFactory) -> None:
    t = time.time() - 10
    written = [rec(f"r{i}", i % 3, created_at=t + i) for i in range(50)]
    written += [rec(f"r{i}", i % 3, variant="b", role="shadow", created_at=t + i) for i in range(0, 50, 2)]
    store = store_factory()
    store.record(written)
    for i in range(0, 50, 5):
        store.add_feedback(f"r{i}", i % 3, i, t + 100)
    before = store.experiment_data("exp")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.counts()
    for call in (
        lambda: store.record([rec("late")]),
        lambda: store.add_feedback("r0", 0, 0, t),
        lambda: store.find_primary("r0"),
        lambda: store.experiment_data("exp"),
        lambda: store.prune(time.time()),
    ):
        with pytest.raises(StoreError, match="closed"):
            call()

    with store_factory() as reopened:
        assert reopened.counts() == {"predictions": 75, "feedback": 10}
        after = reopened.experiment_data("exp")
        assert after == before
        assert len(after.primaries) == 50 and len(after.shadow_pairs) == 25


def test_concurrent_writers_all_land(store: ExperimentStore) -> None:
    threads, per_thread = 8, 200
    start = threading.Barrier(threads)

    def write(n: int) -> None:
        start.wait(5)
        for i in range(per_thread):
            store.record([rec(f"t{n}-{i}", created_at=time.time())])
            if i % 20 == 0:
                store.add_feedback(f"t{n}-{i}", 0, n, time.time())
                store.find_primary(f"t{n}-{i}")

    errors = run_threads(write, threads)
    assert not errors, errors
    assert store.counts() == {"predictions": threads * per_thread, "feedback": threads * per_thread // 20}
    assert len(store.experiment_data("exp").primaries) == threads * per_thread


def test_two_stores_on_one_database(store_factory: StoreFactory) -> None:
    """As with several worker processes or replicas: separate connections to one database, writing at once."""
    stores = [store_factory(), store_factory()]
    outcomes: list[str] = []
    stores[0].record([rec("contested")])

    def write(n: int) -> None:
        store = stores[n % 2]
        for i in range(50):
            store.record([rec(f"c{n}-{i}")])
        outcomes.append(store.add_feedback("contested", 0, 7, time.time()))

    errors = run_threads(write, 4)
    assert not errors, errors
    assert sorted(outcomes) == ["created", "duplicate", "duplicate", "duplicate"]
    assert stores[1].counts() == {"predictions": 201, "feedback": 1}


def test_feedback_reaches_another_replica(store_factory: StoreFactory) -> None:
    """The replica that takes the feedback is not the one that served the request."""
    served_by, told = store_factory(), store_factory()
    t = time.time() - 10
    primary = rec("req-1", 1, variant="A", created_at=t)
    served_by.record([rec("req-1", 0, variant="A", created_at=t), primary])
    served_by.record([rec("req-1", 1, variant="B", role="shadow", created_at=t + 0.5)])

    assert told.find_primary("req-1", 1) == primary
    assert told.add_feedback("req-1", 1, 9, t + 5) == "created"
    assert served_by.add_feedback("req-1", 1, 9, t + 6) == "duplicate"  # a retry, landing on the first replica
    with pytest.raises(ConflictingFeedbackError) as conflict:
        served_by.add_feedback("req-1", 1, 2, t + 7)
    assert conflict.value.existing_label == 9
    with pytest.raises(UnknownRequestError):
        told.add_feedback("req-1", 2, 9, t + 5)  # no such image in that request

    for store in (served_by, told):
        data = store.experiment_data("exp")
        assert [(p.prediction.image_index, p.label, p.labelled_at) for p in data.primaries] == [
            (0, None, None),
            (1, 9, t + 5),
        ]
        assert [sp.shadow.variant for sp in data.shadow_pairs] == ["B"]
        assert store.counts() == {"predictions": 3, "feedback": 1}

    # Retention applied by one replica is what the other sees.
    assert told.prune(t + 31 * DAY) == 4
    assert served_by.find_primary("req-1", 1) is None
    with pytest.raises(UnknownRequestError):
        served_by.add_feedback("req-1", 1, 9, t + 8)


def test_concurrent_feedback_is_idempotent_and_one_label_wins(store_factory: StoreFactory) -> None:
    """Many clients (retries, duplicates) label the same images at once, through two replicas."""
    stores = [store_factory(), store_factory()]
    images = 15
    stores[0].record([rec("same", i) for i in range(images)] + [rec("split", i) for i in range(images)])
    threads = 6
    start = threading.Barrier(threads)
    outcomes: list[tuple[str, int, int, object]] = []  # (request, image, label sent, outcome or existing label)
    lock = threading.Lock()

    def label(n: int) -> None:
        store = stores[n % 2]
        start.wait(10)
        for i in range(images):
            # "same": everyone sends label 5. "split": half send 1, half 2; the first to commit wins.
            for request_id, sent in (("same", 5), ("split", 1 + n % 2)):
                try:
                    result: object = store.add_feedback(request_id, i, sent, time.time())
                except ConflictingFeedbackError as exc:
                    assert exc.label == sent and exc.existing_label != sent
                    result = ("conflict", exc.existing_label)
                with lock:
                    outcomes.append((request_id, i, sent, result))

    errors = run_threads(label, threads)
    assert not errors, errors
    stored = {
        (p.prediction.request_id, p.prediction.image_index): p.label for p in stores[1].experiment_data("exp").primaries
    }
    assert stores[0].counts() == {"predictions": 2 * images, "feedback": 2 * images}
    for request_id in ("same", "split"):
        for i in range(images):
            mine = [(sent, result) for r, j, sent, result in outcomes if (r, j) == (request_id, i)]
            assert len(mine) == threads
            tally = Counter(
                "created" if res == "created" else "duplicate" if res == "duplicate" else "conflict" for _, res in mine
            )
            assert tally["created"] == 1, (request_id, i, mine)  # exactly one writer created it
            (winner,) = [sent for sent, res in mine if res == "created"]
            assert stored[(request_id, i)] == winner
            for sent, res in mine:
                if res == "duplicate":
                    assert sent == winner
                elif res != "created":
                    assert res == ("conflict", winner) and sent != winner
            if request_id == "same":
                assert tally == {"created": 1, "duplicate": threads - 1}


def test_rejects_bad_settings(store_factory: StoreFactory) -> None:
    with pytest.raises(ValueError, match="retention_days"):
        store_factory(retention_days=0)
    with pytest.raises(ValueError, match="max_predictions"):
        store_factory(max_predictions=0)
    with pytest.raises(ValueError, match="prune_every"):
        store_factory(prune_every=0)


# -- SQLite only ----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "store.db")
    yield s
    s.close()


def test_sqlite_creates_parent_directories_and_sets_user_version(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "store.db"
    with SQLiteStore(path) as store:
        store.record([rec("r1")])
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 2


def test_wal_mode_and_indexes(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    store = sqlite_store
    store.record([rec("r1")])
    raw = sqlite3.connect(tmp_path / "store.db")  # a second, independent connection
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        plan = " ".join(
            str(row[-1])
            for row in raw.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM predictions WHERE experiment = 'exp' AND created_at >= 0"
            )
        )
        assert "predictions_by_experiment" in plan
        plan = " ".join(
            str(row[-1])
            for row in raw.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM predictions WHERE request_id = 'r1' AND image_index = 0"
            )
        )
        assert "USING INDEX" in plan and "request_id=? AND image_index=?" in plan
    finally:
        raw.close()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99, newer than this archserve supports"):
        SQLiteStore(path)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        SQLiteStore(path)


def test_in_memory_store() -> None:
    with SQLiteStore(":memory:") as a, SQLiteStore(":memory:") as b:
        a.record([rec("r1"), rec("r1", variant="b", role="shadow")])
        assert a.add_feedback("r1", 0, 2, time.time()) == "created"
        assert a.find_primary("r1") is not None
        assert len(a.experiment_data("exp").shadow_pairs) == 1
        assert b.counts() == {"predictions": 0, "feedback": 0}  # private databases


# -- PostgreSQL only ------------------------------------------------------------------------------


@pytest.fixture
def pg_url():
    with pg.fresh_schema() as url:
        yield url


def test_postgres_schema_version_indexes_and_plans(pg_url: str) -> None:
    from service.store.postgres import PostgresStore

    with PostgresStore(pg_url) as store:
        store.record([rec("r1")])
        with raw_pg(pg_url) as raw:
            assert raw.execute("SELECT version FROM archserve_schema_version").fetchall() == [(2,)]
            indexes = {
                r[0] for r in raw.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
            }
            assert {"predictions_by_experiment", "predictions_by_age", "predictions_pkey", "feedback_pkey"} <= indexes
            raw.execute("SET enable_seqscan = off")  # the table is tiny: ask which index the planner would use
            plan = " ".join(
                r[0]
                for r in raw.execute("EXPLAIN SELECT * FROM predictions WHERE experiment = 'exp' AND created_at >= 0")
            )
            assert "predictions_by_experiment" in plan
            plan = " ".join(
                r[0]
                for r in raw.execute(
                    "EXPLAIN SELECT * FROM predictions WHERE request_id = 'r1' AND image_index = 0 AND role = 'primary'"
                )
            )
            assert "predictions_pkey" in plan
    with PostgresStore(pg_url) as again:  # opening an up-to-date schema changes nothing
        assert again.counts() == {"predictions": 1, "feedback": 0}


def test_postgres_refuses_a_newer_schema(pg_url: str) -> None:
    from service.store.postgres import PostgresStore

    PostgresStore(pg_url).close()
    with raw_pg(pg_url) as raw:
        raw.execute("UPDATE archserve_schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99, newer than this archserve supports"):
        PostgresStore(pg_url)


def test_postgres_replicas_starting_together_create_the_schema_once(pg_url: str) -> None:
    from service.store.postgres import PostgresStore

    replicas = 5
    start = threading.Barrier(replicas)
    opened: list[PostgresStore] = []

    def open_one(n: int) -> None:
        start.wait(10)
        store = PostgresStore(pg_url, pool_max=2)
        opened.append(store)
        store.record([rec(f"from-{n}")])

    try:
        errors = run_threads(open_one, replicas)
        assert not errors, errors
        assert opened[0].counts() == {"predictions": replicas, "feedback": 0}
    finally:
        for s in opened:
            s.close()
    with raw_pg(pg_url) as raw:
        assert raw.execute("SELECT version FROM archserve_schema_version").fetchall() == [(2,)]


def test_postgres_unreachable_says_what_to_do_and_hides_the_password(caplog: pytest.LogCaptureFixture) -> None:
    from service.store.postgres import PostgresStore

    caplog.set_level(logging.DEBUG)
    secret = "s3cret-Pw"
    with pytest.raises(StoreError) as err:
        PostgresStore(f"postgresql://someone:{secret}@127.0.0.1:1/nowhere", connect_timeout_s=2)
    text = str(err.value)
    assert "cannot reach PostgreSQL at someone@127.0.0.1:1/nowhere" in text
    assert "ARCHSERVE_STORE_URL" in text
    assert secret not in text and secret not in caplog.text
    with pytest.raises(StoreError, match='cannot parse the PostgreSQL URL: invalid URI query parameter: "nosuch"'):
        PostgresStore(f"postgresql://someone:{secret}@127.0.0.1/db?nosuch=1")
    with pytest.raises(StoreError, match="cannot parse the PostgreSQL URL: .*not shown") as err:
        PostgresStore(f"postgresql://someone:{secret}@[::1/db")  # libpq's message quotes the whole URL
    assert secret not in str(err.value)
    with pytest.raises(StoreError, match="cannot reach .*invalid integer value") as err:
        PostgresStore(f"postgresql://someone:{secret}@127.0.0.1:notaport/db")
    assert secret not in str(err.value)


def test_postgres_wrong_password_hides_it(caplog: pytest.LogCaptureFixture) -> None:
    from urllib.parse import urlsplit, urlunsplit

    from service.store.postgres import PostgresStore

    caplog.set_level(logging.DEBUG)
    parts = urlsplit(pg.require_server())
    secret = "not-the-Password-42"
    netloc = f"{parts.username}:{secret}@{parts.hostname}:{parts.port}"
    with pytest.raises(StoreError, match="cannot reach PostgreSQL at .*password authentication failed") as err:
        PostgresStore(urlunsplit(parts._replace(netloc=netloc)))
    assert secret not in str(err.value) and secret not in caplog.text
    assert secret not in repr(err.value.__cause__ or "") and err.value.__suppress_context__


def test_postgres_survives_the_server_dropping_its_connections(pg_url: str) -> None:
    from service.store.postgres import PostgresStore

    with PostgresStore(pg_url, pool_min=1, pool_max=1) as store:
        store.record([rec("r1")])
        with store._connection("find the backend") as conn:
            pid = conn.info.backend_pid
        with raw_pg(pg_url) as raw:  # as a server restart or an idle-connection killer would
            assert raw.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        assert store.counts() == {"predictions": 1, "feedback": 0}  # a fresh connection, no error
        assert store.add_feedback("r1", 0, 1, time.time()) == "created"


def test_postgres_record_retries_after_a_deadlock(pg_url: str) -> None:
    """A retried batch racing its original in another order: PostgreSQL breaks the deadlock, the store retries."""
    import psycopg

    from service.store.postgres import _INSERT, PostgresStore, _row_of

    k1, k2 = rec("dl", 0), rec("dl", 1)
    with PostgresStore(pg_url) as store, raw_pg(pg_url) as raw, raw_pg(pg_url) as watch:
        raw.execute("BEGIN")
        raw.execute(_INSERT, _row_of(k2))  # holds k2, uncommitted
        worker = threading.Thread(target=lambda: errors.extend(run_threads(lambda _: store.record([k1, k2]), 1)))
        errors: list[BaseException] = []
        worker.start()
        deadline = time.monotonic() + 10
        while not watch.execute(  # until the store has inserted k1 and waits for k2
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the store never waited for the row lock"
            time.sleep(0.02)
        try:
            raw.execute(_INSERT, _row_of(k1))  # waits for the store's k1: a deadlock
            raw.execute("COMMIT")
        except psycopg.errors.DeadlockDetected:  # PostgreSQL may pick this side to roll back instead
            raw.execute("ROLLBACK")
        worker.join(30)
        assert not errors, errors
        assert store.counts() == {"predictions": 2, "feedback": 0}
        assert store.find_primary("dl", 0) == k1 and store.find_primary("dl", 1) == k2


def test_postgres_rejects_bad_pool_settings() -> None:
    from service.store.postgres import PostgresStore

    url = "postgresql://u:p@127.0.0.1:1/db"  # never reached: the settings are checked first
    with pytest.raises(ValueError, match="pool_min"):
        PostgresStore(url, pool_min=3, pool_max=2)
    with pytest.raises(ValueError, match="connect_timeout_s"):
        PostgresStore(url, connect_timeout_s=0)


# -- open_store -----------------------------------------------------------------------------------


def test_open_store_picks_sqlite_for_paths_and_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(str(tmp_path / "plain.db")) as s:
        assert isinstance(s, SQLiteStore) and s.path == tmp_path / "plain.db"
    with open_store(tmp_path / "pathlike.db", retention_days=7) as s:
        assert isinstance(s, SQLiteStore) and s.retention_days == 7
    with open_store(f"sqlite:///{tmp_path}/abs.db") as s:  # four slashes: absolute
        assert isinstance(s, SQLiteStore) and s.path == tmp_path / "abs.db"
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel/store.db", max_predictions=10) as s:  # three slashes: relative
        assert isinstance(s, SQLiteStore) and s.path == Path("rel/store.db") and s.max_predictions == 10
    assert (tmp_path / "rel" / "store.db").exists()
    for memory in ("sqlite://", "sqlite:///:memory:"):
        with open_store(memory) as s:
            assert isinstance(s, SQLiteStore) and s.in_memory
    with pytest.raises(ValueError, match="unsupported experiment store URL scheme 'mysql'") as err:
        open_store("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="three slashes"):
        open_store("sqlite://host/x.db")
    assert not any(map(is_postgres_url, ("data/x.db", tmp_path / "postgres://x", "sqlite:///x.db", "mysql://h/d")))


def test_open_store_needs_the_postgres_extra_for_postgres_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "service.store.postgres", None)  # as if psycopg were not installed
    with pytest.raises(StoreError, match=r"pip install 'archserve\[postgres\]'"):
        open_store("postgresql://u:p@127.0.0.1:1/db")


def test_open_store_picks_postgres_for_postgres_urls(pg_url: str) -> None:
    from service.store.postgres import PostgresStore

    assert is_postgres_url(pg_url) and is_postgres_url("Postgres://h/d")
    for url in (pg_url, "postgres://" + pg_url.split("://", 1)[1], "PostgreSQL://" + pg_url.split("://", 1)[1]):
        with open_store(url, retention_days=3, pool_max=2) as s:
            assert isinstance(s, PostgresStore) and s.retention_days == 3
            assert s.counts() == {"predictions": 0, "feedback": 0}
