"""Guardrail decisions in the experiment store: one row per (experiment, variant, fingerprint), first writer wins.

A decision is what a guardrail concluded about a variant ("pause" or "alert"),
with the evidence. ``fingerprint`` identifies the configuration it was taken
under (the variant's spec and the experiment's guardrails): a changed YAML gives
a new fingerprint, so the old decision no longer applies, and nothing else ever
lifts it. Rows are inserted with ``ON CONFLICT DO NOTHING`` and the stored row
is read back in the same transaction, so of several workers or replicas
deciding at once exactly one row is written and all of them get that row.
The SQL is the same for SQLite and PostgreSQL but for the placeholders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["pause", "alert"]

_COLUMNS = "experiment, variant, fingerprint, guardrail, action, decided_at, evidence"

SQLITE_TABLE = """
    CREATE TABLE IF NOT EXISTS guardrail_decisions (
        experiment  TEXT NOT NULL,
        variant     TEXT NOT NULL,
        fingerprint TEXT NOT NULL,  -- of the variant's spec and the experiment's guardrails when decided
        guardrail   TEXT NOT NULL,  -- accuracy, latency_p99_ms or error_rate
        action      TEXT NOT NULL CHECK (action IN ('pause', 'alert')),
        decided_at  REAL NOT NULL,  -- unix time
        evidence    TEXT NOT NULL,  -- JSON: the figures, the threshold, the test
        PRIMARY KEY (experiment, variant, fingerprint)
    )
"""
POSTGRES_TABLE = """
    CREATE TABLE IF NOT EXISTS guardrail_decisions (
        experiment  text COLLATE "C" NOT NULL,
        variant     text COLLATE "C" NOT NULL,
        fingerprint text COLLATE "C" NOT NULL,
        guardrail   text COLLATE "C" NOT NULL,
        action      text COLLATE "C" NOT NULL CHECK (action IN ('pause', 'alert')),
        decided_at  double precision NOT NULL,
        evidence    text NOT NULL,
        PRIMARY KEY (experiment, variant, fingerprint)
    )
"""


@dataclass(frozen=True)
class GuardrailDecision:
    experiment: str
    variant: str
    fingerprint: str
    guardrail: str
    action: Action
    decided_at: float  # unix time
    evidence: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def row(self) -> tuple:
        if self.action not in ("pause", "alert"):
            raise ValueError(f"a guardrail decision's action is 'pause' or 'alert', not {self.action!r}")
        evidence = json.dumps(self.evidence, sort_keys=True, allow_nan=False)
        return (self.experiment, self.variant, self.fingerprint, self.guardrail, self.action,
                float(self.decided_at), evidence)

    @classmethod
    def of_row(cls, row) -> GuardrailDecision:
        return cls(row[0], row[1], row[2], row[3], row[4], float(row[5]), json.loads(row[6]))


def _sql(mark: str) -> tuple[str, str, str]:
    insert = (f"INSERT INTO guardrail_decisions ({_COLUMNS}) VALUES ({', '.join([mark] * 7)}) "
              "ON CONFLICT (experiment, variant, fingerprint) DO NOTHING")
    one = (f"SELECT {_COLUMNS} FROM guardrail_decisions WHERE experiment = {mark} AND variant = {mark} "
           f"AND fingerprint = {mark}")
    every = f"SELECT {_COLUMNS} FROM guardrail_decisions WHERE experiment = {mark} ORDER BY decided_at, variant"
    return insert, one, every


_SQLITE_INSERT, _SQLITE_ONE, _SQLITE_EVERY = _sql("?")
_PG_INSERT, _PG_ONE, _PG_EVERY = _sql("%s")


class SQLiteDecisions:
    """For :class:`~service.store.sqlite.SQLiteStore` (its ``_using`` and ``_transaction``)."""

    def record_decision(self, decision: GuardrailDecision) -> GuardrailDecision:
        row = decision.row()
        # BEGIN IMMEDIATE: the insert and the read back see no other writer in between, in any process.
        with self._using("record a guardrail decision") as conn, self._transaction(conn, write=True):
            conn.execute(_SQLITE_INSERT, row)
            stored = conn.execute(_SQLITE_ONE, row[:3]).fetchone()
        return GuardrailDecision.of_row(stored)

    def decisions(self, experiment: str) -> list[GuardrailDecision]:
        with self._using("read guardrail decisions") as conn:
            return [GuardrailDecision.of_row(r) for r in conn.execute(_SQLITE_EVERY, (experiment,))]


class PostgresDecisions:
    """For :class:`~service.store.postgres.PostgresStore` (its ``_connection``)."""

    def record_decision(self, decision: GuardrailDecision) -> GuardrailDecision:
        row = decision.row()
        with self._connection("record a guardrail decision") as conn, conn.transaction():
            # A concurrent insert of the same key makes this one wait for it, then do nothing; the select
            # (READ COMMITTED: a new snapshot per statement) then sees the winner's row.
            conn.execute(_PG_INSERT, row)
            stored = conn.execute(_PG_ONE, row[:3]).fetchone()
        return GuardrailDecision.of_row(stored)

    def decisions(self, experiment: str) -> list[GuardrailDecision]:
        with self._connection("read guardrail decisions") as conn:
            return [GuardrailDecision.of_row(r) for r in conn.execute(_PG_EVERY, (experiment,)).fetchall()]
