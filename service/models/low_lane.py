"""The low-priority lane of a :class:`~service.models.batching.Batcher`: shadow traffic's admission and its
shedding. Low-priority items wait in their own queue, fill what normal items leave of a batch, and are shed
first: refused, or dropped from their queue, once ``shed_depth`` normal items wait.
"""

from __future__ import annotations

from typing import Any

from ..errors import ShedError


class LowPriorityLane:
    """Mixed into ``Batcher``: uses its queues, its entries and its callbacks."""

    def _admit_low(self, items: list[Any], deadline: float | None, now: float) -> list:
        if len(self._queue) >= self._shed_depth or len(self._low) + len(items) > self._max_low_queue_size:
            self._notify(self._on_shed, len(items), "on_shed")
            raise ShedError(
                f"{self._label}: low-priority work shed ({len(self._queue)} normal and {len(self._low)} "
                f"low-priority items waiting)"
            )
        assert self._loop is not None and self._available is not None
        request = next(self._requests)
        entries = [self._new_entry(item, self._loop.create_future(), deadline, now, low=True, request=request)
                   for item in items]
        self._low.extend(entries)
        self._depth_changed()
        self._available.set()
        return entries

    def _shed_low(self, reason: str) -> None:
        shed = list(self._low)
        self._low.clear()
        for entry in shed:
            self._fail(entry, ShedError(f"{self._label}: low-priority work shed: {reason}"))
        if shed:
            self._notify(self._on_shed, len(shed), "on_shed")
