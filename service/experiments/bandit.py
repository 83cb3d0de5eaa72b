"""Bandit allocation (``allocation: thompson``): shares that follow top-1 feedback, with a floor and a warm-up.

Each arm (a variant with weight > 0) has a Beta(1 + correct, 1 + wrong)
posterior on its top-1 accuracy, counted from the store's feedback (a uniform
prior). Its share of the traffic is its probability of being the best arm,
estimated by Monte Carlo from ``draws`` samples of every posterior, then
floored: ``share = floor + (1 - arms * floor) * p_best``, so no arm starves
and the shares sum to 1. Until every arm has ``warmup_images`` labelled images
the shares are the YAML weights (fixed allocation).

Posteriors are refreshed in the background every ``refresh_s`` seconds, never
on the request path. Every worker and replica reads the same store, and the
Monte Carlo generator is seeded from the counts, so workers that see the same
feedback compute exactly the same shares.

Sticky keys hash (key, window) with window = floor(now / sticky_window_s)
(weighted rendezvous hashing, the shares as weights, see ``routing``): within
a window a key keeps its variant while the shares move little, and only keys
whose score order changes move. At a window boundary a key may switch
variant. A longer window means more consistency for a user, and slower
adaptation of what keyed traffic sees.

Regret (``expected_regret``) is the expected number of top-1 errors the
allocation cost against always serving the best arm, under today's
posteriors: the sum over labelled images of (best posterior mean - the
serving arm's posterior mean).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..store.records import ExperimentData

log = logging.getLogger(__name__)


class BanditSpec(BaseModel):
    """The ``bandit:`` block of an experiment (only with ``allocation: thompson``)."""

    model_config = ConfigDict(extra="forbid")
    floor: float = Field(0.05, ge=0.0, lt=1.0, description="Least share of every arm")
    warmup_images: int = Field(200, ge=0, description="Labelled images each arm needs before the bandit steers")
    refresh_s: float = Field(5.0, gt=0.0, description="Seconds between posterior refreshes from the store")
    sticky_window_s: float = Field(3600.0, gt=0.0, description="A sticky key may change variant once a window")
    draws: int = Field(1000, ge=100, le=100_000, description="Monte Carlo draws per refresh")


def check_spec(spec: BanditSpec, arms: int) -> str | None:
    """Why this bandit cannot run over ``arms`` arms, or None."""
    if spec.floor * arms > 1.0 + 1e-12:
        return (f"bandit.floor {spec.floor:g} times {arms} variants is {spec.floor * arms:g} > 1: "
                f"the floors alone would exceed all the traffic; use a floor <= {1.0 / arms:.4g}")
    return None


def thompson_shares(successes: Sequence[int], failures: Sequence[int], floor: float, draws: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shares, p_best, samples): each arm's floored share, its probability of being best, and the
    ``draws x arms`` posterior samples (for intervals)."""
    a = 1.0 + np.asarray(successes, dtype=float)
    b = 1.0 + np.asarray(failures, dtype=float)
    samples = rng.beta(a, b, size=(draws, len(a)))
    p_best = np.bincount(samples.argmax(axis=1), minlength=len(a)) / draws
    return floor + (1.0 - len(a) * floor) * p_best, p_best, samples


def _seed(name: str, successes: Sequence[int], failures: Sequence[int]) -> int:
    """The same counts give the same draws in every worker (so they agree on the shares)."""
    text = f"{name}|{list(successes)}|{list(failures)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass
class _Counts:
    served: int = 0
    correct: int = 0
    labelled: int = 0


class BanditState:
    """One thompson experiment's live allocation; mutable, replaced with the experiment on reload."""

    def __init__(self, experiment: str, spec: BanditSpec, arms: Sequence[str], weights: Sequence[int]) -> None:
        self.experiment, self.spec = experiment, spec
        self.arms = tuple(arms)
        total = float(sum(weights))
        self.weights = {a: w / total for a, w in zip(self.arms, weights)}
        self.shares: dict[str, float] = dict(self.weights)  # the warm-up's until the first refresh says otherwise
        self.phase = "warmup"
        self.counts = {a: _Counts() for a in self.arms}
        self.p_best: dict[str, float | None] = {a: None for a in self.arms}
        self.intervals: dict[str, tuple[float, float]] = {a: (0.025, 0.975) for a in self.arms}  # Beta(1, 1)
        self.refreshed_at: float | None = None
        self._next_refresh = 0.0
        self._refreshing = False

    # ---------------------------------------------------------------- the request path

    def route_weights(self, key: str | None, now: float) -> tuple[dict[str, float], str | None]:
        """The shares to route by, and the sticky key salted with its time window."""
        if key is None:
            return self.shares, None
        window = math.floor(now / self.spec.sticky_window_s)
        return self.shares, f"{key}\x00w{window}"

    def maybe_refresh(self, store: Any, spawn: Callable[..., None], now: float) -> None:
        """Start a background refresh when one is due; cheap, and never waits for the store."""
        if store is None or self._refreshing or now < self._next_refresh:
            return
        self._refreshing = True  # set before spawning: the next request must not start a second one
        self._next_refresh = now + self.spec.refresh_s
        spawn(self._refresh(store), daemon=True)

    async def _refresh(self, store: Any) -> None:
        try:
            data = await asyncio.to_thread(store.experiment_data, self.experiment)
            self.update(data, time.time())
        except Exception as exc:  # a store outage keeps the last shares; the next refresh retries
            log.warning("bandit %s: posteriors not refreshed, shares kept: %s", self.experiment, exc)
        finally:
            self._refreshing = False

    # ---------------------------------------------------------------- posteriors

    def update(self, data: ExperimentData, now: float) -> None:
        """Recount the arms from the prediction log and recompute the shares."""
        counts = {a: _Counts() for a in self.arms}
        for lp in data.primaries:
            c = counts.get(lp.prediction.variant)
            if c is None:  # a paused or removed variant: not an arm
                continue
            c.served += 1
            if lp.label is not None:
                c.labelled += 1
                c.correct += int(lp.prediction.top5[:1] == (lp.label,))
        self.set_counts({a: (c.correct, c.labelled - c.correct) for a, c in counts.items()}, now,
                        served={a: c.served for a, c in counts.items()})

    def set_counts(self, feedback: dict[str, tuple[int, int]], now: float,
                   served: dict[str, int] | None = None) -> None:
        """Recompute from (successes, failures) per arm."""
        successes = [feedback.get(a, (0, 0))[0] for a in self.arms]
        failures = [feedback.get(a, (0, 0))[1] for a in self.arms]
        for a, s, f in zip(self.arms, successes, failures):
            self.counts[a] = _Counts((served or {}).get(a, s + f), s, s + f)
        rng = np.random.default_rng(_seed(self.experiment, successes, failures))
        shares, p_best, samples = thompson_shares(successes, failures, self.spec.floor, self.spec.draws, rng)
        low, high = np.quantile(samples, [0.025, 0.975], axis=0)
        self.p_best = {a: float(p) for a, p in zip(self.arms, p_best)}
        self.intervals = {a: (float(lo), float(hi)) for a, lo, hi in zip(self.arms, low, high)}
        if min(s + f for s, f in zip(successes, failures)) < self.spec.warmup_images:
            self.phase, self.shares = "warmup", dict(self.weights)
        else:
            self.phase, self.shares = "thompson", {a: float(s) for a, s in zip(self.arms, shares)}
        self.refreshed_at = now

    def describe(self) -> dict[str, Any]:
        """The report's ``bandit`` block: settings, phase, each arm's posterior and share, and regret."""
        means = {a: (1 + c.correct) / (2 + c.labelled) for a, c in self.counts.items()}
        best = max(means.values())
        arms = []
        for a in self.arms:
            c = self.counts[a]
            arms.append({
                "name": a, "alpha": 1 + c.correct, "beta": 1 + c.labelled - c.correct, "mean": means[a],
                "low": self.intervals[a][0], "high": self.intervals[a][1],
                "served": c.served, "labelled": c.labelled, "p_best": self.p_best[a], "share": self.shares[a],
            })
        return {
            "allocation": "thompson", "phase": self.phase, "refreshed_at": self.refreshed_at,
            "settings": self.spec.model_dump(),
            "arms": arms,
            "expected_regret": math.fsum(self.counts[a].labelled * (best - means[a]) for a in self.arms),
        }
