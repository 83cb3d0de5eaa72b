"""Statistics for A/B reports: binomial intervals, two-proportion tests, sample sizes.

Pure Python (``math`` and ``statistics.NormalDist`` for the normal quantile);
no scipy. Proportions are given as counts (``successes``, ``n``) so that the
degenerate cases (``n == 0``, all or no successes) are handled here once:

* ``wilson_interval(k, 0)`` is ``(0.0, 1.0)``: no data, no information.
* ``two_proportion_test`` returns ``(0.0, 1.0)`` when the pooled variance is 0
  (either group empty, or every observation a success, or none).
* ``difference_interval`` returns ``(-1.0, 1.0)`` when either group is empty.

Differences are always *first minus second* (``p1 - p2``); the report passes
(treatment, control) to get "treatment minus control".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np

_STD_NORMAL = NormalDist()

__all__ = [
    "Verdict",
    "decide",
    "difference_interval",
    "format_p",
    "normal_quantile",
    "percentiles",
    "required_sample_size",
    "two_proportion_test",
    "verdict",
    "wilson_interval",
]


def normal_quantile(q: float) -> float:
    """Inverse CDF of the standard normal distribution (``scipy.stats.norm.ppf``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q!r}")
    return _STD_NORMAL.inv_cdf(q)


def _two_sided_z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return normal_quantile(0.5 + confidence / 2.0)


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes!r}, n={n!r}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Same as ``scipy.stats.binomtest(successes, n).proportion_ci(method="wilson")``
    (no continuity correction). ``n == 0`` gives ``(0.0, 1.0)``.
    """
    _check_counts(successes, n)
    z = _two_sided_z(confidence)
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 2.0 * (n + z2)
    center = (2.0 * n * p + z2) / denom
    half = z * math.sqrt(z2 + 4.0 * n * p * (1.0 - p)) / denom
    # At 0 and n the bound is exactly 0 or 1; rounding would leave 1 - 1e-16 and p outside.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return (low, high)


def two_proportion_test(s1: int, n1: int, s2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of ``p1 == p2``; returns ``(z, two_sided_p)``.

    ``z = (p1 - p2) / sqrt(P (1 - P) (1/n1 + 1/n2))`` with the pooled
    ``P = (s1 + s2) / (n1 + n2)``; ``p = erfc(|z| / sqrt 2)``, i.e.
    ``2 (1 - Phi(|z|))`` without cancellation in the tail. Its p-value equals a
    chi-square test on the 2x2 table without continuity correction. Returns
    ``(0.0, 1.0)`` when the pooled variance is 0 (an empty group, or all
    observations successes, or none).
    """
    _check_counts(s1, n1)
    _check_counts(s2, n2)
    if n1 == 0 or n2 == 0:
        return (0.0, 1.0)
    pooled = (s1 + s2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if var <= 0.0:
        return (0.0, 1.0)
    z = (s1 / n1 - s2 / n2) / math.sqrt(var)
    return (z, math.erfc(abs(z) / math.sqrt(2.0)))


def difference_interval(s1: int, n1: int, s2: int, n2: int,
                        confidence: float = 0.95) -> tuple[float, float]:
    """Interval for ``p1 - p2``: Newcombe's hybrid score interval (1998, method 10).

    Built from the two Wilson intervals ``(l1, u1)`` and ``(l2, u2)``::

        low  = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)

    with ``d = p1 - p2``. Unlike the Wald interval it behaves at 0 % and 100 %
    and with small groups. Either group empty gives ``(-1.0, 1.0)``.
    """
    _check_counts(s1, n1)
    _check_counts(s2, n2)
    if n1 == 0 or n2 == 0:
        return (-1.0, 1.0)
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, confidence)
    l2, u2 = wilson_interval(s2, n2, confidence)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (max(-1.0, low), min(1.0, high))


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float | None]:
    """Percentiles ``qs`` (0..100) of ``values``, interpolated linearly between closest ranks
    (``numpy.percentile``'s ``method="linear"``); ``None`` for every q when ``values`` is empty."""
    xs = np.asarray(values, dtype=np.float64).ravel()
    if xs.size:
        return np.percentile(xs, qs, method="linear").tolist()
    if not all(0 <= q <= 100 for q in qs):
        raise ValueError(f"percentiles must be in [0, 100], got {list(qs)!r}")
    return [None for _ in qs]


def required_sample_size(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Observations per group to detect ``p1 != p2`` with a two-sided pooled z-test.

    Normal approximation without continuity correction (Fleiss)::

        n = (z_{1-alpha/2} sqrt(2 pbar qbar) + z_{power} sqrt(p1 q1 + p2 q2))^2 / (p1 - p2)^2

    with ``pbar = (p1 + p2) / 2``, rounded up. ``p1 == p2`` raises ``ValueError``
    (no finite sample detects a zero difference).
    """
    for name, p in (("p1", p1), ("p2", p2)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError("alpha and power must be in (0, 1)")
    if p1 == p2:
        raise ValueError("p1 == p2: no finite sample size detects a zero difference")
    z_a = normal_quantile(1.0 - alpha / 2.0)
    z_b = normal_quantile(power)
    pbar = (p1 + p2) / 2.0
    num = z_a * math.sqrt(2.0 * pbar * (1.0 - pbar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    n = (num / (p1 - p2)) ** 2
    return max(1, math.ceil(n - 1e-9))  # 1e-9: don't round 686.0000000001 up to 687


VerdictKind = Literal["insufficient_data", "significant", "no_difference"]


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    text: str
    p_value: float | None  # None when the test was not looked at (too little data)
    needed_per_variant: int | None  # "need ~N more", for kind == "insufficient_data"
    winner: str | None  # the more accurate variant, for kind == "significant"


def format_p(p: float, alpha: float = 0.05) -> str:
    """``"p=0.003"``, ``"p=0.41"``, ``"p<0.001"``: two significant digits, more if
    rounding would move the shown value across ``alpha``."""
    if p < 0.001:
        return "p<0.001"
    for digits in range(2, 7):
        text = f"{p:.{digits}g}"
        if (float(text) < alpha) == (p < alpha):
            return f"p={text}"
    return f"p={p!r}"


def decide(s_a: int, n_a: int, s_b: int, n_b: int, *, name_a: str = "A", name_b: str = "B",
           alpha: float = 0.05, power: float = 0.8, min_n: int = 30,
           min_effect: float = 0.01) -> Verdict:
    """:func:`verdict` as a :class:`Verdict` (kind, text, p-value, N, winner); same rules."""
    _check_counts(s_a, n_a)
    _check_counts(s_b, n_b)
    if min_n < 1:
        raise ValueError("min_n must be >= 1")
    smaller = min(n_a, n_b)
    if smaller < min_n:
        need = min_n - smaller
        return Verdict("insufficient_data", _need_text(need), None, need, None)
    p_a, p_b = s_a / n_a, s_b / n_b
    _, p = two_proportion_test(s_a, n_a, s_b, n_b)
    if p < alpha:
        winner = name_a if p_a > p_b else name_b
        return Verdict("significant", f"variant {winner} more accurate, {format_p(p, alpha)}",
                       p, None, winner)
    if p_a != p_b and abs(p_a - p_b) >= min_effect:
        need = required_sample_size(p_a, p_b, alpha, power) - smaller
        if need > 0:
            return Verdict("insufficient_data", _need_text(need), p, need, None)
    return Verdict("no_difference", f"no significant difference ({format_p(p, alpha)})", p, None, None)


def verdict(s_a: int, n_a: int, s_b: int, n_b: int, *, name_a: str = "A", name_b: str = "B",
            alpha: float = 0.05, power: float = 0.8, min_n: int = 30,
            min_effect: float = 0.01) -> str:
    """The verdict between variant A (``s_a`` correct top-1 of ``n_a`` labelled
    requests; the control) and variant B (``s_b`` of ``n_b``), as one line of text.

    Rules, in order (A is the control, B the treatment; counts are labelled requests):

    1. **Too little data.** If either variant has fewer than ``min_n`` labelled
       requests: ``"not enough data yet: need ~N more labelled requests per
       variant"`` with ``N = min_n - min(n_a, n_b)``. No test is looked at
       (peeking at tiny samples is how false winners are declared).
    2. **Significant.** Pooled two-proportion z-test; if ``p < alpha``:
       ``"variant B more accurate, p=0.003"``, naming the variant with the
       higher observed accuracy.
    3. **Underpowered.** Not significant, but the observed difference
       ``|p_a - p_b|`` is at least ``min_effect`` (default 0.01, one point of
       accuracy: the smallest difference worth acting on): ``N`` is
       ``required_sample_size(p_a, p_b, alpha, power)`` minus the smaller
       group's size; if ``N > 0``: ``"not enough data yet: need ~N more
       labelled requests per variant"``.
    4. **Otherwise** (observed difference below ``min_effect``, or the groups
       already as large as the observed difference needs):
       ``"no significant difference (p=0.41)"``.

    The p-value is shown with two significant digits (``"p<0.001"`` below
    0.001; more digits if rounding would cross ``alpha``). One test is made
    per call; with several treatments the caller lowers ``alpha`` (the report
    uses Bonferroni, ``0.05 / (k - 1)``). It is a fixed-horizon test looked at
    repeatedly as data arrive, so an early "significant" deserves a
    confirming look later.
    """
    return decide(s_a, n_a, s_b, n_b, name_a=name_a, name_b=name_b, alpha=alpha, power=power,
                  min_n=min_n, min_effect=min_effect).text


def _need_text(need: int) -> str:
    return f"not enough data yet: need ~{need} more labelled requests per variant"
