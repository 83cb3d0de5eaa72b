"""The experiment store on real SQLite files: log, feedback, joins, retention, durability, threads."""

from __future__ import annotations

import sqlite3
import threading
import time
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
)

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


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "store.db")
    yield s
    s.close()


def test_is_an_experiment_store(store: SQLiteStore) -> None:
    assert isinstance(store, ExperimentStore)
    assert store.counts() == {"predictions": 0, "feedback": 0}


def test_record_and_find_primary(store: SQLiteStore) -> None:
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


def test_record_empty_is_a_no_op_and_retry_keeps_first_written(store: SQLiteStore) -> None:
    store.record([])
    first = rec("r1", created_at=time.time() - 5)
    store.record([first])
    store.record([first, rec("r2")])  # a retried batch does no harm
    store.record([rec("r1", top5=(0,))])  # same key, other content: the first stays
    assert store.find_primary("r1") == first
    assert store.counts()["predictions"] == 2


def test_record_validates_before_writing_anything(store: SQLiteStore) -> None:
    bad_scores = PredictionRecord("r9", 0, "exp", "a", "primary", "m", 1, (1, 2), (0.5,), 0.1, time.time())
    with pytest.raises(ValueError, match="top5 has 2 classes but top5_scores 1"):
        store.record([rec("r8"), bad_scores])
    with pytest.raises(ValueError, match="role must be"):
        store.record([rec("r8", role="canary")])
    assert store.counts()["predictions"] == 0


def test_multi_image_requests_are_kept_apart(store: SQLiteStore) -> None:
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


def test_experiment_data_joins_feedback_and_shadow_pairs(store: SQLiteStore) -> None:
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


def test_experiment_data_since(store: SQLiteStore) -> None:
    t = time.time() - 100
    old, new = rec("old", created_at=t), rec("new", created_at=t + 50)
    store.record([old, new, rec("old", variant="b", role="shadow", created_at=t + 60)])
    store.record([rec("new", variant="b", role="shadow", created_at=t + 51)])

    assert [p.prediction.request_id for p in store.experiment_data("exp").primaries] == ["old", "new"]
    recent = store.experiment_data("exp", since=t + 50)  # inclusive; on the primary's time
    assert [p.prediction.request_id for p in recent.primaries] == ["new"]
    assert [(sp.primary.request_id, sp.shadow.request_id) for sp in recent.shadow_pairs] == [("new", "new")]
    assert store.experiment_data("exp", since=t + 50.001).primaries == []


def test_feedback_created_duplicate_conflicting_unknown(store: SQLiteStore) -> None:
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


def test_retention_by_age_removes_old_predictions_and_their_feedback(tmp_path: Path) -> None:
    now = time.time()
    with SQLiteStore(tmp_path / "s.db", retention_days=30) as store:
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


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    t = time.time() - 1000
    with SQLiteStore(tmp_path / "s.db", max_predictions=5) as store:
        store.record([rec(f"r{i}", created_at=t + i) for i in range(8)])
        for i in range(8):
            store.add_feedback(f"r{i}", 0, i, t + 100)

        assert store.prune(time.time()) == 6  # three predictions, three feedback
        assert store.counts() == {"predictions": 5, "feedback": 5}
        assert [p.prediction.request_id for p in store.experiment_data("exp").primaries] == [
            f"r{i}" for i in range(3, 8)
        ]
        assert [p.label for p in store.experiment_data("exp").primaries] == [3, 4, 5, 6, 7]


def test_feedback_stays_while_its_primary_does(tmp_path: Path) -> None:
    t = time.time() - 1000
    with SQLiteStore(tmp_path / "s.db", max_predictions=2) as store:
        # The shadow is older than its primary: pruning it must not take the feedback along.
        store.record([rec("r", variant="b", role="shadow", created_at=t), rec("r", created_at=t + 1)])
        store.record([rec("s", created_at=t + 2)])
        store.add_feedback("r", 0, 4, t + 3)
        assert store.prune(time.time()) == 1
        assert store.counts() == {"predictions": 2, "feedback": 1}
        assert store.add_feedback("r", 0, 4, t + 4) == "duplicate"


def test_retention_runs_by_itself_as_records_arrive(tmp_path: Path) -> None:
    now = time.time()
    with SQLiteStore(tmp_path / "s.db", max_predictions=20, prune_every=10) as store:
        store.record([rec("ancient", created_at=now - 365 * DAY)])
        for i in range(60):
            store.record([rec(f"r{i}", created_at=now - 60 + i)])
            assert store.counts()["predictions"] <= 20 + 10
        assert store.find_primary("ancient") is None
        assert store.find_primary("r59") is not None
        assert store.find_primary("r0") is None


def test_open_applies_retention(tmp_path: Path) -> None:
    now = time.time()
    with SQLiteStore(tmp_path / "s.db", retention_days=30) as store:
        store.record([rec("old", created_at=now - 40 * DAY), rec("new", created_at=now)])
    with SQLiteStore(tmp_path / "s.db", retention_days=30) as store:
        assert store.counts()["predictions"] == 1
        assert store.find_primary("old") is None


def test_persists_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "store.db"  # parent directories are created
    t = time.time() - 10
    written = [rec(f"r{i}", i % 3, created_at=t + i) for i in range(50)]
    written += [rec(f"r{i}", i % 3, variant="b", role="shadow", created_at=t + i) for i in range(0, 50, 2)]
    store = SQLiteStore(path)
    store.record(written)
    for i in range(0, 50, 5):
        store.add_feedback(f"r{i}", i % 3, i, t + 100)
    before = store.experiment_data("exp")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.counts()

    with SQLiteStore(path) as reopened:
        assert reopened.counts() == {"predictions": 75, "feedback": 10}
        after = reopened.experiment_data("exp")
        assert after == before
        assert len(after.primaries) == 50 and len(after.shadow_pairs) == 25
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1


def test_wal_mode_and_indexes(store: SQLiteStore, tmp_path: Path) -> None:
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


def test_concurrent_writers_all_land(store: SQLiteStore) -> None:
    threads, per_thread = 8, 200
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            start.wait(5)
            for i in range(per_thread):
                store.record([rec(f"t{n}-{i}", created_at=time.time())])
                if i % 20 == 0:
                    store.add_feedback(f"t{n}-{i}", 0, n, time.time())
                    store.find_primary(f"t{n}-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    assert store.counts() == {"predictions": threads * per_thread, "feedback": threads * per_thread // 20}
    assert len(store.experiment_data("exp").primaries) == threads * per_thread


def test_two_connections_on_one_file(tmp_path: Path) -> None:
    """As with several worker processes: separate connections to one file, writing at once."""
    path = tmp_path / "shared.db"
    stores = [SQLiteStore(path), SQLiteStore(path)]
    errors: list[BaseException] = []
    outcomes: list[str] = []
    stores[0].record([rec("contested")])

    def write(store: SQLiteStore, n: int) -> None:
        try:
            for i in range(50):
                store.record([rec(f"c{n}-{i}")])
            outcomes.append(store.add_feedback("contested", 0, 7, time.time()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(stores[n % 2], n)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    try:
        assert not errors, errors
        assert sorted(outcomes) == ["created", "duplicate", "duplicate", "duplicate"]
        assert stores[1].counts() == {"predictions": 201, "feedback": 1}
    finally:
        for s in stores:
            s.close()


def test_in_memory_store() -> None:
    with SQLiteStore(":memory:") as a, SQLiteStore(":memory:") as b:
        a.record([rec("r1"), rec("r1", variant="b", role="shadow")])
        assert a.add_feedback("r1", 0, 2, time.time()) == "created"
        assert a.find_primary("r1") is not None
        assert len(a.experiment_data("exp").shadow_pairs) == 1
        assert b.counts() == {"predictions": 0, "feedback": 0}  # private databases


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_days"):
        SQLiteStore(tmp_path / "s.db", retention_days=0)
    with pytest.raises(ValueError, match="max_predictions"):
        SQLiteStore(tmp_path / "s.db", max_predictions=0)
