"""The PostgreSQL store's tables, and the migration that creates them or brings them up to date.

Created on first use (``CREATE TABLE IF NOT EXISTS``) in the first schema of the
connection's ``search_path`` (``public`` unless the URL says otherwise, e.g.
``?options=-c%20search_path%3Darchserve``); ``archserve_schema_version`` holds
their version. Creation and migrations run under a transaction-level advisory
lock, so replicas starting together do not race.
"""

from __future__ import annotations

import logging

import psycopg

from .base import StoreError
from .decisions import POSTGRES_TABLE

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # archserve_schema_version.version of a database this code writes

# Text columns compare and sort bytewise (COLLATE "C"), as in SQLite, whatever the database's locale.
SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS predictions (
        id          bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order, to break ties on created_at
        request_id  text COLLATE "C" NOT NULL,
        image_index bigint NOT NULL,
        experiment  text COLLATE "C" NOT NULL,
        variant     text COLLATE "C" NOT NULL,
        role        text COLLATE "C" NOT NULL CHECK (role IN ('primary', 'shadow')),
        model       text COLLATE "C" NOT NULL,
        version     bigint NOT NULL,
        top5        bigint[] NOT NULL,            -- class indices, best first
        top5_scores double precision[] NOT NULL,  -- probabilities matching top5
        latency_s   double precision NOT NULL,
        created_at  double precision NOT NULL,    -- unix time
        PRIMARY KEY (request_id, image_index, role, variant)
    )
    """,
    # The primary key's index serves look-ups by (request_id, image_index[, role]).
    "CREATE INDEX IF NOT EXISTS predictions_by_experiment ON predictions (experiment, created_at)",
    "CREATE INDEX IF NOT EXISTS predictions_by_age ON predictions (created_at, id)",  # retention, oldest first
    """
    CREATE TABLE IF NOT EXISTS feedback (
        request_id  text COLLATE "C" NOT NULL,
        image_index bigint NOT NULL,
        label       bigint NOT NULL,
        received_at double precision NOT NULL,  -- unix time
        PRIMARY KEY (request_id, image_index)
    )
    """,
    POSTGRES_TABLE,  # guardrail decisions (service.store.decisions)
)
VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS archserve_schema_version (
        singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version    integer NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
"""

# Statements that take a database from version N-1 to N, for N in 2..SCHEMA_VERSION.
MIGRATIONS: dict[int, tuple[str, ...]] = {2: (POSTGRES_TABLE,)}

# Advisory lock keys (first half; the second is a hash of the schema, so each schema has its own).
MIGRATION_LOCK = 0x41726D31  # "Arm1"
PRUNE_LOCK = 0x41727031  # "Arp1"
LOCK_ARGS = "%s, hashtext(coalesce(current_schema(), ''))"


def migrate(conn: psycopg.Connection, where: str) -> None:
    """Create the tables, or migrate them to ``SCHEMA_VERSION``; ``where`` names the server in messages."""
    with conn.transaction():
        (schema,) = conn.execute("SELECT current_schema()").fetchone()
        if schema is None:
            raise StoreError(
                f"PostgreSQL at {where}: no schema of the search_path exists to create the store's "
                "tables in; create it, or fix the search_path option of ARCHSERVE_STORE_URL"
            )
        # Replicas starting together wait here for the first to finish; none sees half a schema.
        conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_ARGS})", (MIGRATION_LOCK,))
        conn.execute(VERSION_TABLE)
        row = conn.execute("SELECT version FROM archserve_schema_version").fetchone()
        version = 0 if row is None else row[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"PostgreSQL at {where} (schema {schema!r}) has schema version {version}, newer than this "
                f"archserve supports ({SCHEMA_VERSION}); upgrade archserve or use another database or schema"
            )
        if version == SCHEMA_VERSION:
            return  # up to date: touch nothing (CREATE INDEX IF NOT EXISTS would lock out writers briefly)
        if version:  # an existing database: bring it up to date; a new one gets SCHEMA as is
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO archserve_schema_version (singleton, version) VALUES (true, %s) "
            "ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
            (SCHEMA_VERSION,),
        )
        log.info("experiment store at %s: schema %r at version %d", where, schema, SCHEMA_VERSION)
