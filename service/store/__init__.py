"""The experiment store: prediction log and feedback, behind a small interface.

:class:`ExperimentStore` (``base``) is the interface, synchronous and thread-safe;
:class:`SQLiteStore` (``sqlite``) the default implementation. Another database
(PostgreSQL) is added by implementing :class:`ExperimentStore` and passing the same
tests. The data going in and out are the plain dataclasses of ``records``.
"""

from .base import (
    ConflictingFeedbackError,
    ExperimentStore,
    FeedbackOutcome,
    StoreError,
    UnknownRequestError,
)
from .records import (
    ExperimentData,
    FeedbackRecord,
    LabelledPrediction,
    PredictionRecord,
    Role,
    ShadowPair,
)
from .sqlite import SQLiteStore

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
]
