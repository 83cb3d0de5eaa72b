"""What PostgreSQL's URLs and errors become in the store's messages: never the password."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg
from psycopg import conninfo as pg_conninfo

from .base import StoreError


def parse_error(url: str, exc: Exception) -> str:
    """libpq's complaint about ``url``, unless it quotes the URL (and so perhaps its password)."""
    text = str(exc).strip()
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    if "://" in text or "password" in text.lower() or "@" in text:
        return "(libpq's message not shown: it quotes the URL, which may hold a password)"
    return text


def describe_url(url: str) -> str:
    """``user@host:port/dbname`` of a libpq URL or conninfo string; never the password."""
    try:
        params = pg_conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable PostgreSQL URL"
    host = str(params.get("host") or params.get("hostaddr") or "the local socket")
    port = str(params.get("port") or "5432")
    user = params.get("user")
    where = f"{host}:{port}/{params.get('dbname') or user or '(default database)'}"
    return f"{user}@{where}" if user else where


class TransientError(StoreError):
    """PostgreSQL rolled the transaction back (deadlock, serialization failure); running it again may work."""


@contextmanager
def translate_errors(action: str, where: str, scrub: Callable[[str], str]) -> Iterator[None]:
    """PostgreSQL's errors inside become StoreError (TransientError where a retry may work) saying what failed
    (``action``) and where; ``scrub`` takes the password out of the server's text."""
    try:
        yield
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        # The server's one-line message, without the statement's text and caret that str() adds.
        text = scrub((exc.diag.message_primary if state else None) or str(exc).strip())
        if state.startswith("40"):  # deadlock or serialization failure: PostgreSQL rolled the transaction back
            raise TransientError(
                f"cannot {action} in PostgreSQL at {where}: {text} (a clash with concurrent writers); retry"
            ) from None
        if isinstance(exc, psycopg.OperationalError) and (not state or state.startswith(("08", "57P"))):
            raise StoreError(  # the connection broke, or the server is shutting down or restarting
                f"cannot {action}: lost PostgreSQL at {where} ({text}); retry, "
                "and check the server and ARCHSERVE_STORE_URL"
            ) from None
        if state == "42501":  # insufficient_privilege
            text += (
                "; the user needs CREATE on the schema (on PostgreSQL 15+ not granted on 'public' to other "
                "users than the database's owner) the first time, then SELECT, INSERT and DELETE on its tables"
            )
        raise StoreError(f"cannot {action} in PostgreSQL at {where}: {text}") from None
