"""The low-priority lane of a :class:`~service.models.batching.Batcher`: shadow traffic's admission, its
shedding, and its yielding to every model's normal traffic.

Low-priority items wait in their own queue, fill what normal items leave of a batch, and are shed first:
refused, or dropped from their queue, once ``shed_depth`` normal items wait. Low-priority items
wait while any other model in the process has normal requests queued (models share the cores: a shadow on
one must not slow the primary on another), and add about ``LOW_BATCH_S`` at most to a batch's run, so that a
primary arriving meanwhile finds a lane soon, and a primary in the same batch is not held back by them.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

from ..errors import ShedError

LOW_BATCH_S = 0.1  # the run time a batch of low-priority items only may take on one lane, from recent batches
YIELD_S = 0.005  # how often yielding low-priority work looks again


class LowPriorityLane:
    """Mixed into ``Batcher``: uses its queues, its entries, its callbacks and its run-time estimate."""

    _live: ClassVar[weakref.WeakSet] = weakref.WeakSet()  # the started batchers of this process

    def _low_room(self, taken: int) -> int:
        """How large a batch that holds ``taken`` normal items may grow with low-priority ones."""
        if any(other._queue for other in list(self._live) if other is not self):
            return taken
        if self._per_image_s is None:
            return taken + 1
        on_one_lane = self._per_image_s * self._instances  # the estimate is per image across the lanes
        return min(self._max_batch_size, taken + max(1, int(LOW_BATCH_S / max(on_one_lane, 1e-6))))

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
