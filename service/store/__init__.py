"""The experiment store: prediction log and feedback, behind a small interface.

:class:`ExperimentStore` (``base``) is the interface, synchronous and thread-safe;
:class:`SQLiteStore` (``sqlite``) the default implementation, one file per machine;
:class:`PostgresStore` (``postgres``, the ``postgres`` extra) one database shared by
every replica. Both pass the same tests. :func:`open_store` (``factory``) opens the
one a URL or path names. The data going in and out are the plain dataclasses of
``records``.
"""

from .base import (
    ConflictingFeedbackError,
    ExperimentStore,
    FeedbackOutcome,
    StoreError,
    UnknownRequestError,
)
from .factory import is_postgres_url, open_store
from .records import (
    ExperimentData,
    FeedbackRecord,
    LabelledPrediction,
    PredictionRecord,
    Role,
    ShadowPair,
)
from .sqlite import SQLiteStore


def __getattr__(name: str):
    # Imported on first use (and left out of __all__): psycopg is optional (the postgres extra).
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConflictingFeedbackError",
    "ExperimentData",
    "ExperimentStore",
    "FeedbackOutcome",
    "FeedbackRecord",
    "LabelledPrediction",
    "PredictionRecord",
    "Role",
    "SQLiteStore",
    "ShadowPair",
    "StoreError",
    "UnknownRequestError",
    "is_postgres_url",
    "open_store",
]
