"""Open the experiment store that a URL or path names.

* ``postgresql://USER:PASSWORD@HOST:PORT/DATABASE`` (or ``postgres://``; libpq's query
  options allowed, e.g. ``?sslmode=require&options=-c%20search_path%3Darchserve``):
  :class:`~service.store.postgres.PostgresStore`, shared by every replica.
  Needs the ``postgres`` extra (``pip install 'archserve[postgres]'``).
* ``sqlite:///relative/path``, ``sqlite:////absolute/path`` (as SQLAlchemy spells them),
  ``sqlite:///:memory:``, or a plain path: :class:`~service.store.sqlite.SQLiteStore`.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

from .base import ExperimentStore, StoreError

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite://"


def is_postgres_url(url_or_path: str | PathLike[str]) -> bool:
    """Whether :func:`open_store` would open a PostgreSQL store (to pick backend-specific options)."""
    return not isinstance(url_or_path, PathLike) and str(url_or_path).lower().startswith(_POSTGRES_SCHEMES)


def open_store(url_or_path: str | PathLike[str], **options: Any) -> ExperimentStore:
    """The store at ``url_or_path``; ``options`` go to the store's constructor.

    ``retention_days``, ``max_predictions`` and ``prune_every`` suit both stores;
    ``busy_timeout_s`` is SQLite's, ``pool_min``, ``pool_max`` and ``connect_timeout_s``
    PostgreSQL's (an option the store does not take raises TypeError).
    """
    target = str(url_or_path) if isinstance(url_or_path, PathLike) else url_or_path
    if not isinstance(target, str) or not target.strip():
        raise ValueError("the experiment store needs a PostgreSQL URL, a sqlite:/// URL or a file path")
    lowered = target.lower()
    if is_postgres_url(target):
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(
                f"a PostgreSQL store needs psycopg and psycopg-pool ({exc}); install them with "
                "pip install 'archserve[postgres]', or use a SQLite file"
            ) from exc
        scheme, rest = target.split("://", 1)
        return PostgresStore(f"{scheme.lower()}://{rest}", **options)  # libpq knows the schemes in lower case only

    from .sqlite import SQLiteStore

    if lowered.startswith(_SQLITE_SCHEME):
        rest = target[len(_SQLITE_SCHEME) :]
        if rest in ("", "/", "/:memory:"):
            return SQLiteStore(":memory:", **options)
        if not rest.startswith("/"):
            raise ValueError(
                f"a SQLite URL has three slashes before a relative path and four before an absolute one "
                f"(sqlite:///data/store.db, sqlite:////var/lib/archserve/store.db), not {target!r}"
            )
        path = rest[1:]
        if "?" in path:
            raise ValueError(f"SQLite URLs take no query options: {target!r}")
        return SQLiteStore(path, **options)
    if "://" in target:
        scheme = target.split("://", 1)[0]
        raise ValueError(
            f"unsupported experiment store URL scheme {scheme!r}; use postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
            "sqlite:///PATH or a file path"
        )
    return SQLiteStore(target, **options)
