"""The storage interface of the experiment store, and its errors.

The API is synchronous: the service calls it from worker threads
(``asyncio.to_thread``), so an implementation must be safe to call from several
threads at once. Implementations hand back the plain dataclasses of
:mod:`service.store.records`, never database types.

The errors are independent of HTTP; the HTTP layer maps them
(:class:`UnknownRequestError` -> 404, :class:`ConflictingFeedbackError` -> 409).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Literal

from .decisions import GuardrailDecision
from .records import ExperimentData, PredictionRecord

FeedbackOutcome = Literal["created", "duplicate"]


class StoreError(Exception):
    """Anything the store cannot do; the message says what to do about it."""


class UnknownRequestError(StoreError):
    """Feedback for a (request id, image index) with no primary prediction, or one removed by retention."""

    def __init__(self, message: str, *, request_id: str, image_index: int) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.image_index = image_index


class ConflictingFeedbackError(StoreError):
    """Feedback with another label for an image that already has one."""

    def __init__(self, message: str, *, request_id: str, image_index: int, existing_label: int, label: int) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.image_index = image_index
        self.existing_label = existing_label
        self.label = label


class ExperimentStore(abc.ABC):
    """The prediction log and the feedback on it, for A/B reports.

    Predictions are keyed by (request_id, image_index, role, variant), feedback
    by (request_id, image_index): one true label per image of a request.
    """

    @abc.abstractmethod
    def record(self, records: Sequence[PredictionRecord]) -> None:
        """Insert primary and/or shadow records, all or none; durable when it returns.

        A record whose key is already stored is left as first written (so a
        retried call does no harm).
        """

    @abc.abstractmethod
    def add_feedback(self, request_id: str, image_index: int, label: int, received_at: float) -> FeedbackOutcome:
        """Attach the true label of one image to its primary prediction.

        Idempotent: the same label again returns ``"duplicate"`` and changes
        nothing. Raises :class:`ConflictingFeedbackError` if the image already has
        another label, :class:`UnknownRequestError` if it has no primary
        prediction (never recorded, or removed by retention).
        """

    @abc.abstractmethod
    def find_primary(self, request_id: str, image_index: int = 0) -> PredictionRecord | None:
        """The primary prediction of one image of a request, or None."""

    @abc.abstractmethod
    def experiment_data(self, experiment: str, since: float | None = None) -> ExperimentData:
        """The experiment's primaries (created_at >= since) joined with their feedback, and
        a :class:`~service.store.records.ShadowPair` for every (primary, shadow) of the
        experiment on the same (request_id, image_index). Oldest first.

        ``shadow_shed`` is left empty: it comes from the metrics, not the store.
        """

    @abc.abstractmethod
    def prune(self, now: float) -> int:
        """Apply retention as of ``now`` (unix time); return the rows removed (predictions + feedback)."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """``{"predictions": n, "feedback": n}``, for health and debugging."""

    def record_decision(self, decision: GuardrailDecision) -> GuardrailDecision:
        """Store a guardrail decision unless one with its (experiment, variant, fingerprint) is stored; return
        the stored one (the first writer's, whichever process that was)."""
        raise StoreError(f"{type(self).__name__} keeps no guardrail decisions")

    def decisions(self, experiment: str) -> list[GuardrailDecision]:
        """The experiment's guardrail decisions, oldest first."""
        raise StoreError(f"{type(self).__name__} keeps no guardrail decisions")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the database; idempotent. Any later call raises :class:`StoreError`."""

    def __enter__(self) -> ExperimentStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
