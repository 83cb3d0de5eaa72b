"""Guardrail decisions in both stores: insert-if-absent, first writer wins, every reader gets that row."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from service.store.decisions import GuardrailDecision
from service.store.sqlite import SQLiteStore
from tests.service import postgres as pg


def decision(n: int, fingerprint: str = "f1", variant: str = "b") -> GuardrailDecision:
    return GuardrailDecision("exp", variant, fingerprint, "accuracy", "pause", 1000.0 + n, {"writer": n})


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    if request.param == "sqlite":
        yield lambda: SQLiteStore(tmp_path / "s.sqlite3")
        return
    from service.store.postgres import PostgresStore

    with pg.fresh_schema() as url:
        yield lambda: PostgresStore(url, pool_max=2)


def test_the_first_decision_wins_and_every_store_reads_it(open_store):
    stores = [open_store() for _ in range(4)]  # as four worker processes would open it
    try:
        start = threading.Barrier(len(stores))
        winners = [None] * len(stores)

        def decide(n: int) -> None:
            start.wait(10)
            winners[n] = stores[n].record_decision(decision(n))

        threads = [threading.Thread(target=decide, args=(n,)) for n in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len({w.evidence["writer"] for w in winners}) == 1  # all got the same stored row
        assert [d.evidence for d in stores[0].decisions("exp")] == [winners[0].evidence]
        # A new fingerprint (the YAML changed) is a new decision; another experiment sees none of them.
        stores[1].record_decision(decision(9, fingerprint="f2"))
        assert [d.fingerprint for d in stores[2].decisions("exp")] == ["f1", "f2"]
        assert stores[3].decisions("other") == []
    finally:
        for s in stores:
            s.close()


def test_a_decision_needs_a_known_action(tmp_path):
    with SQLiteStore(tmp_path / "s.sqlite3") as store, pytest.raises(ValueError, match="'pause' or 'alert'"):
        store.record_decision(GuardrailDecision("exp", "b", "f", "accuracy", "stop", 1.0, {}))


def test_a_version_1_sqlite_file_gets_the_decisions_table(tmp_path):
    path = tmp_path / "old.sqlite3"
    with SQLiteStore(path):
        pass
    with sqlite3.connect(path) as raw:  # as archserve before guardrails left it
        raw.execute("DROP TABLE guardrail_decisions")
        raw.execute("PRAGMA user_version = 1")
    with SQLiteStore(path) as store:
        assert store.record_decision(decision(1)).evidence == {"writer": 1}
