"""The experiment store in PostgreSQL: shared by every replica, bounded retention.

Several replicas (and worker processes) share one database, so feedback may reach
another replica than the one that served the request. Each store holds a
:class:`psycopg_pool.ConnectionPool` (``pool_min``..``pool_max`` connections,
checked before use so a restarted server costs no failed request, and reconnected
within seconds of a lost server's return) and is safe to call from several threads at once.

Consistency: every write is one transaction. ``record`` inserts with
``ON CONFLICT DO NOTHING`` (a retried batch does no harm); ``add_feedback`` locks
the primary prediction (``FOR KEY SHARE``, so retention cannot remove it under
the feedback) and inserts with ``ON CONFLICT DO NOTHING``: of several concurrent
calls for one image, on any replicas, exactly one creates the feedback, the
others see its label (``"duplicate"`` or :class:`ConflictingFeedbackError`).
Reads run in ``REPEATABLE READ`` transactions, so a report sees one snapshot.

Schema: created or migrated on open, one replica at a time (``postgres_schema``).

Retention: as in :class:`~service.store.sqlite.SQLiteStore`: predictions older than
``retention_days`` and, beyond ``max_predictions`` rows, the oldest go, with the
feedback of images left without a primary prediction; on open and after every
``prune_every`` rows this store inserted. Retention passes of several replicas
take turns (another advisory lock).

Credentials: the URL's password is never logged nor put in a message or repr.
"""

from __future__ import annotations

import math
import operator
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .base import (
    ConflictingFeedbackError,
    ExperimentStore,
    FeedbackOutcome,
    StoreError,
)
from .decisions import PostgresDecisions
from .postgres_errors import TransientError, describe_url, parse_error, translate_errors
from .postgres_schema import LOCK_ARGS, PRUNE_LOCK, migrate
from .records import ExperimentData, LabelledPrediction, PredictionRecord, ShadowPair
from .rows import COLUMNS, N_COLUMNS, PruneSchedule, check_feedback, columns, record_of, row_of

_INSERT = f"INSERT INTO predictions ({COLUMNS}) VALUES ({', '.join(['%s'] * N_COLUMNS)}) ON CONFLICT DO NOTHING"
_ATTEMPTS = 3  # tries of a write that PostgreSQL rolled back to break a deadlock
_PRUNE_CHUNK = 5000  # rows deleted per transaction, so other writers wait briefly
_DAY_S = 86400.0
# How long the pool tries to reconnect to a lost server (1, 2, 2 s apart) before the next use starts over.
# psycopg_pool's default backs off for 5 minutes: after a 20 s outage its next try came up to 11 s late.
_RECONNECT_S = 5.0


def _text(value: object, what: str, request_id: object) -> str:
    text = str(value)
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL characters (request {request_id!r})")
    return text


def _row_of(record: PredictionRecord) -> tuple:
    return row_of(record, _text, list)  # top-5 lists go to integer[] / double precision[] as they are


def _record_of(row: Sequence, start: int = 0) -> PredictionRecord:
    return record_of(row, list, start)


class PostgresStore(PostgresDecisions, PruneSchedule, ExperimentStore):
    def __init__(
        self,
        url: str,
        *,
        retention_days: float = 30,
        max_predictions: int = 1_000_000,
        prune_every: int = 1000,
        pool_min: int = 1,
        pool_max: int = 8,
        connect_timeout_s: float = 5,
    ) -> None:
        self._init_retention(retention_days, max_predictions, prune_every)
        if pool_min < 0 or pool_max < max(pool_min, 1):
            raise ValueError(f"need 0 <= pool_min <= pool_max and pool_max >= 1, not {pool_min!r}..{pool_max!r}")
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, not {connect_timeout_s!r}")
        try:
            params = pg_conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(
                f"cannot parse the PostgreSQL URL: {parse_error(url, exc)}; expected "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE[?PARAM=VALUE...]; check ARCHSERVE_STORE_URL"
            ) from None
        self.connect_timeout_s = float(connect_timeout_s)
        self.where = describe_url(url)
        self._password = str(params.get("password") or "") or None
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None

        # libpq's connect_timeout is whole seconds, at least 2.
        connect_kwargs: dict = {"connect_timeout": max(2, math.ceil(self.connect_timeout_s)), "autocommit": True}
        if "application_name" not in params:  # how the connections show in pg_stat_activity
            connect_kwargs["application_name"] = "archserve"
        # One direct connection first: it reports why the server cannot be reached (the pool would only time out),
        # and it creates or migrates the schema before any request is served.
        try:
            conn = psycopg.connect(url, **connect_kwargs)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot reach PostgreSQL at {self.where}: {self._scrub(str(exc).strip())}; check "
                "ARCHSERVE_STORE_URL (host, port, database, user and password) and that the server is up"
            ) from None
        try:
            with conn, translate_errors("create or migrate the schema", self.where, self._scrub):
                migrate(conn, self.where)
        except BaseException:
            if not conn.closed:
                conn.close()
            raise

        pool = ConnectionPool(
            url,
            min_size=int(pool_min),
            max_size=int(pool_max),
            kwargs=connect_kwargs,
            timeout=max(10.0, 2 * self.connect_timeout_s),  # waiting for a free connection
            check=ConnectionPool.check_connection,  # drop connections a server restart broke before using them
            reconnect_timeout=_RECONNECT_S,
            num_workers=2,
            name=f"archserve-store {self.where}",
            open=False,
        )
        try:
            pool.open(wait=pool_min > 0, timeout=max(10.0, 2 * self.connect_timeout_s))
        except PoolTimeout:
            pool.close()
            raise StoreError(
                f"cannot reach PostgreSQL at {self.where}: no connection within "
                f"{max(10.0, 2 * self.connect_timeout_s):g} s (is max_connections exhausted?); "
                "check ARCHSERVE_STORE_URL and the server"
            ) from None
        self._pool = pool
        try:
            self.prune(time.time())
        except BaseException:
            self.close()
            raise

    # -- the interface --------------------------------------------------------------------------

    def record(self, records: Sequence[PredictionRecord]) -> None:
        rows = [_row_of(r) for r in records]
        if not rows:
            return
        for attempt in range(_ATTEMPTS):
            try:
                # No longer than the pool's reconnection tries: a writer retrying it then starts new ones.
                with self._connection("record predictions", _RECONNECT_S) as conn, conn.transaction(), \
                        conn.cursor() as cur:
                    cur.executemany(_INSERT, rows)
                    inserted = cur.rowcount
                break
            except TransientError:
                # A deadlock with a concurrent batch holding some of the same keys (a retry racing its original):
                # PostgreSQL rolled this one back; run it again.
                if attempt == _ATTEMPTS - 1:
                    raise
        self._after_insert(inserted, len(rows))

    def add_feedback(self, request_id: str, image_index: int, label: int, received_at: float) -> FeedbackOutcome:
        image_index, label = check_feedback(image_index, label)
        request_id = str(request_id)
        for attempt in range(_ATTEMPTS):
            try:
                return self._add_feedback_once(request_id, image_index, label, float(received_at))
            except TransientError:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _add_feedback_once(self, request_id: str, image_index: int, label: int, received_at: float) -> FeedbackOutcome:
        with self._connection("record feedback") as conn, conn.transaction():
            # FOR KEY SHARE: retention cannot delete the primary until this transaction ends.
            known = None
            if "\x00" not in request_id:  # PostgreSQL text cannot hold NUL: no such prediction was stored
                known = conn.execute(
                    "SELECT 1 FROM predictions WHERE request_id = %s AND image_index = %s AND role = 'primary' "
                    "LIMIT 1 FOR KEY SHARE",
                    (request_id, image_index),
                ).fetchone()
            if known is None:
                raise self._unknown_request(request_id, image_index)
            # The insert waits for a concurrent insert of the same image to commit or roll back, then
            # inserts or does nothing; the select that follows (a new snapshot) sees the winner's label.
            for _ in range(3):
                created = conn.execute(
                    "INSERT INTO feedback (request_id, image_index, label, received_at) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (request_id, image_index) DO NOTHING RETURNING 1",
                    (request_id, image_index, label, received_at),
                ).fetchone()
                if created is not None:
                    return "created"
                existing = conn.execute(
                    "SELECT label FROM feedback WHERE request_id = %s AND image_index = %s",
                    (request_id, image_index),
                ).fetchone()
                if existing is not None:
                    break
            else:  # removed each time between the two statements: cannot happen while the primary is locked
                raise StoreError(
                    f"cannot record feedback for image {image_index} of request {request_id!r}: it kept changing "
                    "under concurrent writes; retry"
                )
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

    def find_primary(self, request_id: str, image_index: int = 0) -> PredictionRecord | None:
        image_index = operator.index(image_index)
        if "\x00" in str(request_id):
            self._check_open("look up a prediction")
            return None
        with self._connection("look up a prediction") as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM predictions WHERE request_id = %s AND image_index = %s "
                "AND role = 'primary' ORDER BY created_at DESC, id DESC LIMIT 1",
                (str(request_id), image_index),
            ).fetchone()
        return None if row is None else _record_of(row)

    def experiment_data(self, experiment: str, since: float | None = None) -> ExperimentData:
        data = ExperimentData(experiment=experiment)
        if "\x00" in str(experiment):
            self._check_open("read the experiment's data")
            return data
        where = "p.experiment = %s AND p.role = 'primary'"
        params: tuple = (str(experiment),)
        if since is not None:
            where += " AND p.created_at >= %s"
            params += (float(since),)
        with self._connection("read the experiment's data") as conn, self._snapshot(conn), conn.cursor() as cur:
            # stream(): rows arrive in chunks, never the whole result in memory at once.
            for row in cur.stream(
                f"SELECT {columns('p')}, f.label, f.received_at FROM predictions AS p "
                "LEFT JOIN feedback AS f ON f.request_id = p.request_id AND f.image_index = p.image_index "
                f"WHERE {where} ORDER BY p.created_at, p.id",
                params,
                size=1000,
            ):
                data.primaries.append(
                    LabelledPrediction(_record_of(row), label=row[N_COLUMNS], labelled_at=row[N_COLUMNS + 1])
                )
            for row in cur.stream(
                f"SELECT {columns('p')}, {columns('s')} FROM predictions AS p "
                "JOIN predictions AS s ON s.request_id = p.request_id AND s.image_index = p.image_index "
                "AND s.role = 'shadow' AND s.experiment = p.experiment "
                f"WHERE {where} ORDER BY p.created_at, p.id, s.variant",
                params,
                size=1000,
            ):
                data.shadow_pairs.append(ShadowPair(primary=_record_of(row), shadow=_record_of(row, N_COLUMNS)))
        return data

    def prune(self, now: float) -> int:
        """Apply retention as of ``now``; return the rows removed, predictions and feedback together.

        Deletes oldest first, in transactions of a few thousand rows; one replica at a time.
        """
        cutoff = float(now) - self.retention_days * _DAY_S
        removed = 0
        while True:
            with self._connection("apply retention") as conn, conn.transaction():
                conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_ARGS})", (PRUNE_LOCK,))
                aged, total = conn.execute(
                    "SELECT count(*) FILTER (WHERE created_at < %s), count(*) FROM predictions", (cutoff,)
                ).fetchone()
                due = max(aged, total - self.max_predictions)
                if due <= 0:
                    return removed
                deleted = conn.execute(
                    "DELETE FROM predictions AS p USING ("
                    "SELECT request_id, image_index, role, variant FROM predictions ORDER BY created_at, id LIMIT %s"
                    ") AS d WHERE p.request_id = d.request_id AND p.image_index = d.image_index "
                    "AND p.role = d.role AND p.variant = d.variant RETURNING p.request_id, p.image_index, p.role",
                    (min(due, _PRUNE_CHUNK),),
                ).fetchall()
                removed += len(deleted)
                images = sorted({(d[0], d[1]) for d in deleted if d[2] == "primary"})
                if images:  # feedback of images left without a primary prediction
                    cur = conn.execute(
                        "DELETE FROM feedback AS f "
                        "USING unnest(%s::text[], %s::bigint[]) AS d(request_id, image_index) "
                        "WHERE f.request_id = d.request_id AND f.image_index = d.image_index AND NOT EXISTS ("
                        "SELECT 1 FROM predictions AS p WHERE p.request_id = f.request_id "
                        "AND p.image_index = f.image_index AND p.role = 'primary')",
                        ([i[0] for i in images], [i[1] for i in images]),
                    )
                    removed += max(cur.rowcount, 0)
                if not deleted:  # nothing left to remove after all (removed concurrently)
                    return removed

    def counts(self) -> dict[str, int]:
        with self._connection("count rows") as conn, self._snapshot(conn):
            (predictions,) = conn.execute("SELECT count(*) FROM predictions").fetchone()
            (feedback,) = conn.execute("SELECT count(*) FROM feedback").fetchone()
        return {"predictions": predictions, "feedback": feedback}

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)

    def __repr__(self) -> str:
        return (
            f"PostgresStore({self.where!r}, retention_days={self.retention_days:g}, "
            f"max_predictions={self.max_predictions})"
        )

    # -- internals ------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """``text`` without the password (in case a driver message ever quotes the URL)."""
        return text.replace(self._password, "***") if self._password else text

    def _check_open(self, action: str) -> None:
        if self._pool is None:
            raise StoreError(f"cannot {action}: the experiment store at {self.where} is closed; open a new store")

    @contextmanager
    def _connection(self, action: str, timeout: float | None = None) -> Iterator[psycopg.Connection]:
        """A connection from the pool, waited for at most ``timeout`` (default: the pool's); PostgreSQL's and the
        pool's errors become StoreError."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"cannot {action}: the experiment store at {self.where} is closed; open a new store")
        timeout = pool.timeout if timeout is None else timeout
        with translate_errors(action, self.where, self._scrub):
            try:
                with pool.connection(timeout=timeout) as conn:
                    yield conn
            except PoolClosed:
                raise StoreError(
                    f"cannot {action}: the experiment store at {self.where} is closed; open a new store"
                ) from None
            except PoolTimeout:
                raise StoreError(
                    f"cannot {action}: no connection to PostgreSQL at {self.where} within {timeout:g} s "
                    "(the server is down or unreachable, or all connections are busy); retry, and check the "
                    "server and ARCHSERVE_STORE_URL"
                ) from None

    @staticmethod
    @contextmanager
    def _snapshot(conn: psycopg.Connection) -> Iterator[None]:
        """A read-only transaction that sees one snapshot throughout."""
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield
