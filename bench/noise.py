"""Patience with other work on a shared machine: wait for quiet before a step, re-measure a noisy point."""

from __future__ import annotations

import time

from .cpu_meter import machine_busy_cores


def settle(max_wait_s: float, quiet_cores: float = 0.3) -> dict:
    """Wait (at most ``max_wait_s``) until other work on the machine uses under ``quiet_cores``.

    Runs between steps, when nothing of ours is running, so what is busy is
    someone else. Returns what it saw; the step runs anyway after the wait.
    """
    started = time.monotonic()
    busy = machine_busy_cores(1.0)
    while busy >= quiet_cores and time.monotonic() - started < max_wait_s:
        busy = machine_busy_cores(2.0)
    waited = time.monotonic() - started
    if busy >= quiet_cores:
        print(f"  note: the machine is busy with other work ({busy:.2f} cores) after waiting {waited:.0f}s; "
              "figures from this step are noisy", flush=True)
    return {"other_cores_before": round(busy, 2), "waited_s": round(waited, 1)}


class NoiseGuard:
    """Bounded patience with other work on a shared machine.

    Before each step it waits (``settle_s`` at most) for the machine to be
    quiet; a measurement during which other processes used more than
    ``threshold`` cores is taken again, up to ``retries`` times, keeping the
    cleanest. Once ``budget_s`` has passed since the guard was made (one per
    repeat), there is no more waiting or re-measuring, so a busy machine makes
    the run noisier, not endless.
    """

    def __init__(self, budget_s: float, settle_s: float, retries: int, threshold: float = 0.15) -> None:
        self.deadline = time.monotonic() + budget_s
        self.settle_s, self.retries, self.threshold = settle_s, retries, threshold

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def settle(self) -> dict:
        return settle(min(self.settle_s, self.left()))

    def measure(self, label: str, fn):
        best, attempts = None, 0
        while True:
            report = fn()
            attempts += 1
            other = report["cpu"]["other_cores"]
            if best is None or other < best["cpu"]["other_cores"]:
                best = report
            if other <= self.threshold or attempts > self.retries or self.left() <= 0:
                break
            print(f"  other work used {other:.2f} cores during {label}; measuring it again", flush=True)
            self.settle()
        best["attempts"] = attempts
        return best
