"""A throwaway PostgreSQL for the store tests: a fresh schema per test on the server of `.ci/postgres.sh`.

The server comes from ``ARCHSERVE_TEST_POSTGRES_URL`` (default: the one ``bash .ci/postgres.sh``
starts). If it cannot be reached, the PostgreSQL tests fail when ``CI`` is set (CI must test
both stores) and are skipped otherwise, with the command that starts one.

Each test gets its own schema (``archserve_test_<random>``), selected through the URL's
``options=-c search_path=...``, and dropped afterwards, so tests never see each other's rows
and may run in parallel against one server.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

DEFAULT_URL = "postgresql://archserve:archserve@127.0.0.1:55432/archserve_test"
URL_ENV = "ARCHSERVE_TEST_POSTGRES_URL"
START_HINT = "start one with `bash .ci/postgres.sh` (or point ARCHSERVE_TEST_POSTGRES_URL at a server)"


def server_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (libpq's ``options`` query parameter)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "options"]
    existing = dict(parse_qsl(parts.query)).get("options", "")
    query.append(("options", f"{existing} -c search_path={schema}".strip()))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@lru_cache(maxsize=1)
def _unreachable_reason() -> str | None:
    """Why the test server cannot be used, or None; asked once per session."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc}); pip install -e '.[test]'"
    from service.store.postgres import describe_url

    # In CI the server must be there: one slow connection must not fail every PostgreSQL test, so try for 30 s.
    # Elsewhere one try, so that a machine without PostgreSQL skips its tests at once.
    give_up = time.monotonic() + (30 if in_ci() else 0)
    while True:
        try:
            with psycopg.connect(server_url(), connect_timeout=3, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return None
        except psycopg.Error as exc:
            if time.monotonic() >= give_up:
                return f"PostgreSQL at {describe_url(server_url())} is unreachable ({str(exc).strip()}); {START_HINT}"
        time.sleep(1)


def require_server() -> str:
    """The server's URL; fails the test in CI, skips it elsewhere, if there is no server."""
    reason = _unreachable_reason()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI is set, so the PostgreSQL store must be tested: {reason}", pytrace=False)
        pytest.skip(reason)
    return server_url()


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A URL on a new, empty schema of the test server, dropped with everything in it afterwards."""
    import psycopg

    url = require_server()
    schema = f"archserve_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
