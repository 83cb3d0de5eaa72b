"""Choosing a variant: deterministic for a sticky key, weighted random otherwise.

Keyed choice is weighted rendezvous hashing: each variant scores
``-weight / ln(u)``, ``u`` a uniform number from a hash of (experiment,
variant, key), and the highest score wins. The same key picks the same variant
on every replica with no shared state, each variant gets ``weight / total`` of
the keys, and changing one variant's weight moves only keys to or from that
variant (never between two others).
"""

from __future__ import annotations

import hashlib
import math
import random
import time

from .config import Experiment, Variant

# Under allocation: thompson the weights are the bandit's current shares, and a sticky key is salted with its
# time window (service.experiments.bandit), so keys stay put within a window while the shares move.

_TWO_64 = float(2**64)


def _uniform(experiment: str, variant: str, key: str) -> float:
    digest = hashlib.blake2b(f"{experiment}\x00{variant}\x00{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_64  # in (0, 1)


def choose_variant(experiment: Experiment, key: str | None, rng: random.Random | None = None,
                   now: float | None = None) -> Variant:
    weights = {v.name: float(v.weight) for v in experiment.variants}
    if experiment.bandit is not None:
        shares, key = experiment.bandit.route_weights(key, time.time() if now is None else now)
        # A variant at weight 0 (paused in the YAML or by a guardrail) gets nothing, whatever its posterior says.
        weights = {v.name: shares.get(v.name, 0.0) if v.weight > 0 else 0.0 for v in experiment.variants}
    candidates = [v for v in experiment.variants if weights[v.name] > 0]
    if key is None:
        rng = rng or random
        return rng.choices(candidates, weights=[weights[v.name] for v in candidates])[0]
    return max(candidates, key=lambda v: -weights[v.name] / math.log(_uniform(experiment.name, v.name, key)))
