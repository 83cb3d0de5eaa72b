"""The experiment store in SQLite: one file, WAL journal, bounded retention.

One connection (``check_same_thread=False``) guarded by a lock: the service calls
the store from worker threads, and SQLite serialises writers anyway. Several
processes (``--workers``) may open the same file; each write runs in a
``BEGIN IMMEDIATE`` transaction and waits up to ``busy_timeout_s`` for another
writer. ``":memory:"`` gives a private, empty database (for unit tests).

Durability: ``synchronous=NORMAL`` in WAL mode. A committed write survives the
process crashing; after a power loss or OS crash the last few commits may be
rolled back (the database stays consistent).

Retention: :meth:`SQLiteStore.prune` removes predictions older than
``retention_days`` and, beyond ``max_predictions`` rows, the oldest, together
with the feedback of images that no longer have a primary prediction. It runs
when the store opens and after every ``prune_every`` inserted rows, so the
table holds at most about ``max_predictions + prune_every`` rows.
"""

from __future__ import annotations

import json
import logging
import operator
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .base import (
    ConflictingFeedbackError,
    ExperimentStore,
    FeedbackOutcome,
    StoreError,
)
from .decisions import SQLITE_TABLE, SQLiteDecisions
from .records import ExperimentData, LabelledPrediction, PredictionRecord, ShadowPair
from .rows import COLUMNS, N_COLUMNS, PruneSchedule, check_feedback, columns, record_of, row_of

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # PRAGMA user_version of a database this code writes

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS predictions (
        request_id  TEXT    NOT NULL,
        image_index INTEGER NOT NULL,
        experiment  TEXT    NOT NULL,
        variant     TEXT    NOT NULL,
        role        TEXT    NOT NULL CHECK (role IN ('primary', 'shadow')),
        model       TEXT    NOT NULL,
        version     INTEGER NOT NULL,
        top5        TEXT    NOT NULL,  -- JSON array of class indices, best first
        top5_scores TEXT    NOT NULL,  -- JSON array of probabilities matching top5
        latency_s   REAL    NOT NULL,
        created_at  REAL    NOT NULL,  -- unix time
        PRIMARY KEY (request_id, image_index, role, variant)
    )
    """,
    # The primary key's index serves look-ups by (request_id, image_index[, role]).
    "CREATE INDEX IF NOT EXISTS predictions_by_experiment ON predictions (experiment, created_at)",
    "CREATE INDEX IF NOT EXISTS predictions_by_age ON predictions (created_at)",  # retention, oldest first
    """
    CREATE TABLE IF NOT EXISTS feedback (
        request_id  TEXT    NOT NULL,
        image_index INTEGER NOT NULL,
        label       INTEGER NOT NULL,
        received_at REAL    NOT NULL,  -- unix time
        PRIMARY KEY (request_id, image_index)
    )
    """,
    SQLITE_TABLE,  # guardrail decisions (service.store.decisions)
)

# Statements that take a database from version N-1 to N, for N in 2..SCHEMA_VERSION.
_MIGRATIONS: dict[int, tuple[str, ...]] = {2: (SQLITE_TABLE,)}

_INSERT = f"INSERT INTO predictions ({COLUMNS}) VALUES ({', '.join('?' * N_COLUMNS)}) ON CONFLICT DO NOTHING"
_PRUNE_CHUNK = 5000  # rows deleted per transaction, so other writers wait briefly
_DAY_S = 86400.0


def _text(value: object, _what: str, _request_id: object) -> str:
    return str(value)


def _json(values: list) -> str:
    return json.dumps(values, separators=(",", ":"))


def _row_of(record: PredictionRecord) -> tuple:
    return row_of(record, _text, _json)


def _record_of(row: Sequence, start: int = 0) -> PredictionRecord:
    return record_of(row, json.loads, start)


class SQLiteStore(SQLiteDecisions, PruneSchedule, ExperimentStore):
    def __init__(
        self,
        path: str | Path,
        *,
        retention_days: float = 30,
        max_predictions: int = 1_000_000,
        prune_every: int = 1000,
        busy_timeout_s: float = 10.0,
    ) -> None:
        self._init_retention(retention_days, max_predictions, prune_every)
        if busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s must be >= 0, not {busy_timeout_s!r}")
        self.busy_timeout_s = float(busy_timeout_s)
        self.in_memory = str(path) == ":memory:"
        self.path = str(path) if self.in_memory else Path(path)
        self._lock = threading.Lock()

        where = self._where()
        try:
            if not self.in_memory:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory of {where}: {exc}; check the path and its permissions"
            ) from exc
        try:
            conn = sqlite3.connect(
                str(path), timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {where}: {exc}; check the path and its permissions") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            with self._using("open the database"):
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
                if mode != "wal" and not self.in_memory:
                    log.warning(
                        "%s: journal mode is %r, not WAL (is the file on a network file system?); "
                        "readers and writers will block each other",
                        where,
                        mode,
                    )
                conn.execute("PRAGMA synchronous = NORMAL")
                self._migrate(conn)
            self.prune(time.time())
        except BaseException:
            self.close()
            raise

    # -- the interface --------------------------------------------------------------------------

    def record(self, records: Sequence[PredictionRecord]) -> None:
        rows = [_row_of(r) for r in records]
        if not rows:
            return
        with self._using("record predictions") as conn, self._transaction(conn, write=True):
            inserted = conn.executemany(_INSERT, rows).rowcount
        self._after_insert(inserted, len(rows))

    def add_feedback(self, request_id: str, image_index: int, label: int, received_at: float) -> FeedbackOutcome:
        image_index, label = check_feedback(image_index, label)
        with self._using("record feedback") as conn, self._transaction(conn, write=True):
            known = conn.execute(
                "SELECT 1 FROM predictions WHERE request_id = ? AND image_index = ? AND role = 'primary' LIMIT 1",
                (request_id, image_index),
            ).fetchone()
            if known is None:
                raise self._unknown_request(request_id, image_index)
            existing = conn.execute(
                "SELECT label FROM feedback WHERE request_id = ? AND image_index = ?", (request_id, image_index)
            ).fetchone()
            if existing is not None:
                if existing[0] == label:
                    return "duplicate"
                raise ConflictingFeedbackError(
                    f"image {image_index} of request {request_id!r} already has label {existing[0]}, not {label}; "
                    "feedback cannot be changed once given",
                    request_id=request_id,
                    image_index=image_index,
                    existing_label=existing[0],
                    label=label,
                )
            conn.execute(
                "INSERT INTO feedback (request_id, image_index, label, received_at) VALUES (?, ?, ?, ?)",
                (request_id, image_index, label, float(received_at)),
            )
            return "created"

    def find_primary(self, request_id: str, image_index: int = 0) -> PredictionRecord | None:
        with self._using("look up a prediction") as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM predictions WHERE request_id = ? AND image_index = ? AND role = 'primary' "
                "ORDER BY created_at DESC, rowid DESC LIMIT 1",
                (request_id, operator.index(image_index)),
            ).fetchone()
        return None if row is None else _record_of(row)

    def experiment_data(self, experiment: str, since: float | None = None) -> ExperimentData:
        where = "p.experiment = ? AND p.role = 'primary'"
        params: tuple = (experiment,)
        if since is not None:
            where += " AND p.created_at >= ?"
            params += (float(since),)
        data = ExperimentData(experiment=experiment)
        with self._using("read the experiment's data") as conn, self._transaction(conn, write=False):
            for row in conn.execute(
                f"SELECT {columns('p')}, f.label, f.received_at FROM predictions AS p "
                "LEFT JOIN feedback AS f ON f.request_id = p.request_id AND f.image_index = p.image_index "
                f"WHERE {where} ORDER BY p.created_at, p.rowid",
                params,
            ):
                data.primaries.append(
                    LabelledPrediction(_record_of(row), label=row[N_COLUMNS], labelled_at=row[N_COLUMNS + 1])
                )
            for row in conn.execute(
                f"SELECT {columns('p')}, {columns('s')} FROM predictions AS p "
                "JOIN predictions AS s ON s.request_id = p.request_id AND s.image_index = p.image_index "
                "AND s.role = 'shadow' AND s.experiment = p.experiment "
                f"WHERE {where} ORDER BY p.created_at, p.rowid, s.variant",
                params,
            ):
                data.shadow_pairs.append(ShadowPair(primary=_record_of(row), shadow=_record_of(row, N_COLUMNS)))
        return data

    def prune(self, now: float) -> int:
        """Apply retention as of ``now``; return the rows removed, predictions and feedback together.

        Deletes oldest first, in transactions of a few thousand rows.
        """
        cutoff = float(now) - self.retention_days * _DAY_S
        removed = 0
        while True:
            with self._using("apply retention") as conn, self._transaction(conn, write=True):
                (aged,) = conn.execute("SELECT count(*) FROM predictions WHERE created_at < ?", (cutoff,)).fetchone()
                (total,) = conn.execute("SELECT count(*) FROM predictions").fetchone()
                due = max(aged, total - self.max_predictions)
                if due <= 0:
                    return removed
                doomed = conn.execute(
                    "SELECT rowid, request_id, image_index, role FROM predictions "
                    "ORDER BY created_at, rowid LIMIT ?",
                    (min(due, _PRUNE_CHUNK),),
                ).fetchall()
                conn.executemany("DELETE FROM predictions WHERE rowid = ?", [(d[0],) for d in doomed])
                removed += len(doomed)
                images = {(d[1], d[2]) for d in doomed if d[3] == "primary"}
                if images:  # feedback of images left without a primary prediction
                    cur = conn.executemany(
                        "DELETE FROM feedback WHERE request_id = ?1 AND image_index = ?2 AND NOT EXISTS ("
                        "SELECT 1 FROM predictions WHERE request_id = ?1 AND image_index = ?2 AND role = 'primary')",
                        sorted(images),
                    )
                    removed += max(cur.rowcount, 0)

    def counts(self) -> dict[str, int]:
        with self._using("count rows") as conn, self._transaction(conn, write=False):
            (predictions,) = conn.execute("SELECT count(*) FROM predictions").fetchone()
            (feedback,) = conn.execute("SELECT count(*) FROM feedback").fetchone()
        return {"predictions": predictions, "feedback": feedback}

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error as exc:
                log.debug("PRAGMA optimize on close failed: %s", exc)
            finally:
                conn.close()

    def __repr__(self) -> str:
        return (
            f"SQLiteStore({str(self.path)!r}, retention_days={self.retention_days:g}, "
            f"max_predictions={self.max_predictions})"
        )

    # -- internals ------------------------------------------------------------------------------

    def _where(self) -> str:
        return "the in-memory experiment store" if self.in_memory else f"the experiment store at {self.path}"

    @contextmanager
    def _using(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock on the open connection; turn SQLite's errors into StoreError."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"cannot {action}: {self._where()} is closed; open a new store")
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if "locked" in text or "busy" in text:
                    raise StoreError(
                        f"cannot {action}: {self._where()} stayed locked by another connection for more than "
                        f"{self.busy_timeout_s:g} s ({text}); retry, or check for a process holding it"
                    ) from exc
                raise StoreError(f"cannot {action} in {self._where()}: {text}") from exc
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot {action} in {self._where()}: {exc}; if the file is damaged, move it aside "
                    "and restart (the store starts empty)"
                ) from exc

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
        """A transaction: BEGIN IMMEDIATE for writes (takes the write lock up front, so a
        check-then-insert is atomic across processes), BEGIN for a consistent read."""
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with self._transaction(conn, write=True):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._where()} has schema version {version}, newer than this archserve supports "
                    f"({SCHEMA_VERSION}); upgrade archserve or use another file"
                )
            if version:  # an existing database: bring it up to date; a new one gets _SCHEMA as is
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target]:
                        conn.execute(statement)
            for statement in _SCHEMA:  # idempotent; creates everything in a new database
                conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
