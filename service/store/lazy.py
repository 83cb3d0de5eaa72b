"""A store that may not be reachable yet: the server starts and classifies anyway.

``LazyStore`` opens the real store on first use and again after a failed open
(at most every ``retry_s``); until then every call raises ``StoreError``, which
the service turns into a degraded store (buffered writes, 503 on feedback)
instead of a crash loop while a database is still starting.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .base import ExperimentStore, StoreError


class LazyStore(ExperimentStore):
    def __init__(self, opener: Callable[[], ExperimentStore], retry_s: float = 5.0) -> None:
        self._opener = opener
        self._retry_s = retry_s
        self._store: ExperimentStore | None = None
        self._last_try = 0.0
        self._last_error: str = "not opened yet"
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._get()
        except StoreError:
            pass  # reported on use; the service starts degraded

    def _get(self) -> ExperimentStore:
        with self._lock:
            if self._closed:
                raise StoreError("the experiment store is closed")
            if self._store is not None:
                return self._store
            now = time.monotonic()
            if now - self._last_try < self._retry_s and self._last_try:
                raise StoreError(f"the experiment store is unavailable: {self._last_error}")
            self._last_try = now
            try:
                self._store = self._opener()
            except Exception as exc:
                self._last_error = str(exc)
                raise StoreError(f"the experiment store is unavailable: {exc}") from exc
            return self._store

    def record(self, records):
        return self._get().record(records)

    def add_feedback(self, request_id, image_index, label, received_at):
        return self._get().add_feedback(request_id, image_index, label, received_at)

    def find_primary(self, request_id, image_index=0):
        return self._get().find_primary(request_id, image_index)

    def experiment_data(self, experiment, since=None):
        return self._get().experiment_data(experiment, since)

    def prune(self, now):
        return self._get().prune(now)

    def counts(self):
        return self._get().counts()

    def record_decision(self, decision):
        return self._get().record_decision(decision)

    def decisions(self, experiment):
        return self._get().decisions(experiment)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._store is not None:
                self._store.close()
