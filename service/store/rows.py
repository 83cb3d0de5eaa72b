"""What both store backends do alike: the column order, record validation and conversion,
and the bookkeeping after an insert. Only the SQL dialect and the top-5 encoding differ."""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Callable, Sequence

from .base import StoreError, UnknownRequestError
from .records import PredictionRecord

log = logging.getLogger(__name__)

COLUMNS = (
    "request_id, image_index, experiment, variant, role, model, version, top5, top5_scores, latency_s, created_at"
)  # the order of PredictionRecord's fields
N_COLUMNS = 11


def columns(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in COLUMNS.split(","))


def row_of(record: PredictionRecord, text: Callable[[object, str, object], str], encode_list: Callable) -> tuple:
    """Validate one record and turn it into a row; ``text`` checks strings, ``encode_list`` stores top-5 lists."""
    if record.role not in ("primary", "shadow"):
        raise ValueError(f"role must be 'primary' or 'shadow', not {record.role!r} (request {record.request_id!r})")
    if not record.request_id:
        raise ValueError("a prediction record needs a non-empty request_id")
    image_index = operator.index(record.image_index)
    if image_index < 0:
        raise ValueError(f"image_index must be >= 0, not {image_index} (request {record.request_id!r})")
    if len(record.top5) != len(record.top5_scores):
        raise ValueError(
            f"top5 has {len(record.top5)} classes but top5_scores {len(record.top5_scores)} scores "
            f"(request {record.request_id!r}, variant {record.variant!r}); they must match"
        )
    rid = record.request_id
    return (
        text(rid, "request_id", rid),
        image_index,
        text(record.experiment, "experiment", rid),
        text(record.variant, "variant", rid),
        record.role,
        text(record.model, "model", rid),
        operator.index(record.version),
        encode_list([operator.index(c) for c in record.top5]),
        encode_list([float(s) for s in record.top5_scores]),
        float(record.latency_s),
        float(record.created_at),
    )


def record_of(row: Sequence, decode_list: Callable, start: int = 0) -> PredictionRecord:
    r = row[start : start + N_COLUMNS]
    return PredictionRecord(
        request_id=r[0],
        image_index=r[1],
        experiment=r[2],
        variant=r[3],
        role=r[4],
        model=r[5],
        version=r[6],
        top5=tuple(decode_list(r[7])),
        top5_scores=tuple(decode_list(r[8])),
        latency_s=r[9],
        created_at=r[10],
    )


def check_feedback(image_index: int, label: int) -> tuple[int, int]:
    image_index = operator.index(image_index)
    label = operator.index(label)
    if label < 0:
        raise ValueError(f"label must be a class index >= 0, not {label}")
    return image_index, label


class PruneSchedule:
    """What the stores share about retention: checks the settings, counts inserted rows and runs a
    retention pass every ``prune_every`` of them, and words the unknown-request error."""

    def _init_retention(self, retention_days: float, max_predictions: int, prune_every: int) -> None:
        """Check and keep the retention settings every store takes; start counting inserts."""
        if not (retention_days > 0 and math.isfinite(retention_days)):
            raise ValueError(f"retention_days must be a positive number of days, not {retention_days!r}")
        if max_predictions < 1:
            raise ValueError(f"max_predictions must be at least 1, not {max_predictions!r}")
        if prune_every < 1:
            raise ValueError(f"prune_every must be at least 1, not {prune_every!r}")
        self.retention_days = float(retention_days)
        self.max_predictions = int(max_predictions)
        self.prune_every = int(prune_every)
        self._inserted_since_prune = 0

    def _unknown_request(self, request_id: str, image_index: int) -> UnknownRequestError:
        return UnknownRequestError(
            f"no prediction with request id {request_id!r} (image {image_index}); check the X-Request-ID "
            f"that /classify returned and the image's position in that request; predictions older than "
            f"the {self.retention_days:g}-day retention (or the oldest beyond {self.max_predictions:,}) "
            "are removed",
            request_id=request_id,
            image_index=image_index,
        )

    def _after_insert(self, inserted: int, offered: int) -> None:
        if inserted < offered:
            log.warning(
                "%d of %d prediction records were already stored under the same (request_id, image_index, role, "
                "variant) and were kept as first written; is a client reusing X-Request-ID?",
                offered - inserted,
                offered,
            )
        with self._lock:
            self._inserted_since_prune += max(inserted, 0)
            due = self._inserted_since_prune >= self.prune_every
            if due:
                self._inserted_since_prune = 0
        if due:
            try:
                self.prune(time.time())
            except StoreError as exc:  # the records are in; retention catches up next time
                log.warning("retention pass after recording failed: %s", exc)
