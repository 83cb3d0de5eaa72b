"""The experiment statistics against scipy, numpy and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.experiments.stats import (
    decide,
    difference_interval,
    format_p,
    percentiles,
    required_sample_size,
    two_proportion_test,
    verdict,
    wilson_interval,
)

import scipy.stats as scipy_stats  # noqa: E402  (a test dependency)


# ---------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (56, 70), (48, 80),
                                 (1, 1000), (999, 1000), (517, 1000), (12345, 20000)])
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_matches_scipy(k, n, confidence):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(k, n, confidence)
    assert low == pytest.approx(ci.low, rel=1e-12, abs=1e-15)
    assert high == pytest.approx(ci.high, rel=1e-12, abs=1e-15)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 5)[0] == 0.0
    assert wilson_interval(5, 5)[1] == 1.0
    for bad in [(-1, 5), (6, 5), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


# ---------------------------------------------------------------- two-proportion test


def test_two_proportion_by_hand():
    # 56/70 = 0.8 against 48/80 = 0.6; pooled P = 104/150.
    pooled = 104 / 150
    se = math.sqrt(pooled * (1 - pooled) * (1 / 70 + 1 / 80))
    z_hand = (0.8 - 0.6) / se
    p_hand = 2 * (1 - 0.5 * (1 + math.erf(abs(z_hand) / math.sqrt(2))))
    z, p = two_proportion_test(56, 70, 48, 80)
    assert z == pytest.approx(z_hand, rel=1e-12)
    assert z == pytest.approx(2.650171951, rel=1e-9)
    assert p == pytest.approx(p_hand, rel=1e-9)
    # The difference is first minus second: swapping flips z, not p.
    z2, p2 = two_proportion_test(48, 80, 56, 70)
    assert (z2, p2) == pytest.approx((-z, p), rel=1e-12)


@pytest.mark.parametrize("s1,n1,s2,n2", [(56, 70, 48, 80), (10, 40, 20, 40), (400, 1000, 430, 1000),
                                         (3, 30, 1, 31), (700, 1000, 701, 1000), (5000, 10000, 4700, 10000)])
def test_two_proportion_matches_chi_square(s1, n1, s2, n2):
    table = np.array([[s1, n1 - s1], [s2, n2 - s2]])
    chi2, p_chi, dof, _ = scipy_stats.chi2_contingency(table, correction=False)
    z, p = two_proportion_test(s1, n1, s2, n2)
    assert dof == 1
    assert z * z == pytest.approx(chi2, rel=1e-9)
    assert p == pytest.approx(p_chi, rel=1e-9, abs=1e-300)
    assert p == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), rel=1e-9, abs=1e-300)


def test_two_proportion_far_tail_keeps_precision():
    z, p = two_proportion_test(900, 1000, 100, 1000)
    assert p > 0.0
    assert p == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), rel=1e-9)


def test_two_proportion_degenerate():
    assert two_proportion_test(0, 0, 5, 10) == (0.0, 1.0)
    assert two_proportion_test(10, 10, 20, 20) == (0.0, 1.0)  # pooled variance 0
    assert two_proportion_test(0, 10, 0, 20) == (0.0, 1.0)
    with pytest.raises(ValueError):
        two_proportion_test(11, 10, 0, 10)


# ---------------------------------------------------------------- difference interval


@pytest.mark.parametrize("s1,n1,s2,n2,low,high", [
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10 (hybrid score).
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
])
def test_difference_interval_newcombe_table(s1, n1, s2, n2, low, high):
    got = difference_interval(s1, n1, s2, n2)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("s1,n1,s2,n2", [(56, 70, 48, 80), (0, 15, 3, 12), (40, 40, 0, 40), (7, 9, 600, 1000)])
def test_difference_interval_from_scipy_wilson(s1, n1, s2, n2):
    c1 = scipy_stats.binomtest(s1, n1).proportion_ci(method="wilson")
    c2 = scipy_stats.binomtest(s2, n2).proportion_ci(method="wilson")
    p1, p2 = s1 / n1, s2 / n2
    low = p1 - p2 - math.hypot(p1 - c1.low, c2.high - p2)
    high = p1 - p2 + math.hypot(c1.high - p1, p2 - c2.low)
    got = difference_interval(s1, n1, s2, n2)
    assert got == pytest.approx((max(-1, low), min(1, high)), rel=1e-9, abs=1e-12)
    assert got[0] <= p1 - p2 <= got[1]
    assert -1.0 <= got[0] and got[1] <= 1.0


def test_difference_interval_empty_group():
    assert difference_interval(0, 0, 3, 10) == (-1.0, 1.0)
    assert difference_interval(3, 10, 0, 0) == (-1.0, 1.0)


# ---------------------------------------------------------------- percentiles


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 101, 1000])
def test_percentiles_match_numpy(size):
    rng = np.random.default_rng(size)
    values = rng.lognormal(-3, 0.5, size).tolist()
    qs = [0, 1, 25, 33.3, 50, 90, 99, 99.9, 100]
    got = percentiles(values, qs)
    expected = np.percentile(values, qs)
    assert got == pytest.approx(expected.tolist(), rel=1e-12, abs=0)
    assert all(isinstance(v, float) for v in got)


def test_percentiles_small_by_hand_and_empty():
    assert percentiles([0.01, 0.02, 0.03, 0.05]) == pytest.approx([0.025, 0.044, 0.0494], rel=1e-12)
    assert percentiles([3.0, 1.0, 2.0], [0, 50, 100]) == [1.0, 2.0, 3.0]
    assert percentiles([], [50, 90]) == [None, None]
    for values in ([1.0], []):
        with pytest.raises(ValueError):
            percentiles(values, [101])


# ---------------------------------------------------------------- sample size


def test_required_sample_size_by_hand():
    # Fleiss without continuity correction: 0.10 vs 0.15, alpha 0.05 two-sided, power 0.8.
    z_a, z_b = scipy_stats.norm.ppf(0.975), scipy_stats.norm.ppf(0.8)
    pbar = 0.125
    n = (z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(0.1 * 0.9 + 0.15 * 0.85)) ** 2 / 0.05 ** 2
    assert n == pytest.approx(685.6, abs=0.1)
    assert required_sample_size(0.10, 0.15) == math.ceil(n) == 686
    assert required_sample_size(0.15, 0.10) == 686
    # A larger difference, stricter alpha and more power.
    assert required_sample_size(0.5, 0.6) == 388
    assert required_sample_size(0.5, 0.6, alpha=0.01, power=0.9) > required_sample_size(0.5, 0.6)


def test_required_sample_size_rejects_equal_rates():
    with pytest.raises(ValueError):
        required_sample_size(0.7, 0.7)
    with pytest.raises(ValueError):
        required_sample_size(1.2, 0.7)


# ---------------------------------------------------------------- verdict


def test_verdict_too_little_data():
    text = verdict(20, 25, 5, 40, name_a="A", name_b="B")
    assert text == "not enough data yet: need ~5 more labelled requests per variant"
    d = decide(0, 0, 0, 0)
    assert d.kind == "insufficient_data" and d.needed_per_variant == 30 and d.p_value is None
    assert verdict(29, 29, 0, 29, min_n=30).startswith("not enough data yet: need ~1 more")


def test_verdict_significant_names_the_winner():
    _, p = two_proportion_test(90, 100, 70, 100)
    assert p < 0.001
    assert verdict(90, 100, 70, 100, name_a="A", name_b="B") == "variant A more accurate, p<0.001"
    # 60/100 against 75/100: p = 0.024 (by chi-square on the table as well).
    _, p = two_proportion_test(60, 100, 75, 100)
    p_chi = scipy_stats.chi2_contingency([[60, 40], [75, 25]], correction=False)[1]
    assert p == pytest.approx(p_chi, rel=1e-9)
    assert verdict(60, 100, 75, 100, name_a="ctl", name_b="se") == "variant se more accurate, p=0.024"
    d = decide(60, 100, 75, 100, name_b="se")
    assert d.kind == "significant" and d.winner == "se" and d.p_value == pytest.approx(p)


def test_verdict_underpowered_asks_for_more():
    # 0.50 vs 0.55 at 100 each: not significant; detecting 5 points needs ~1562 per group.
    d = decide(50, 100, 55, 100)
    assert d.kind == "insufficient_data"
    assert d.needed_per_variant == required_sample_size(0.5, 0.55) - 100
    assert d.text == f"not enough data yet: need ~{required_sample_size(0.5, 0.55) - 100} more labelled requests per variant"


def test_verdict_no_difference():
    # Same accuracy: nothing to wait for.
    _, p = two_proportion_test(700, 1000, 700, 1000)
    assert verdict(700, 1000, 700, 1000) == "no significant difference (p=1)"
    # Below min_effect (0.3 points): no amount of data would make it matter.
    _, p = two_proportion_test(700, 1000, 703, 1000)
    assert verdict(700, 1000, 703, 1000) == f"no significant difference ({format_p(p)})"
    assert format_p(p) == "p=0.88"
    d = decide(700, 1000, 703, 1000)
    assert d.kind == "no_difference" and d.needed_per_variant is None


def test_verdict_respects_alpha():
    # p = 0.024: significant at 0.05, not at a Bonferroni 0.0167 (and then it asks for more data).
    assert decide(60, 100, 75, 100, alpha=0.05).kind == "significant"
    assert decide(60, 100, 75, 100, alpha=0.05 / 3).kind == "insufficient_data"


def test_format_p():
    assert format_p(0.003) == "p=0.003"
    assert format_p(0.41) == "p=0.41"
    assert format_p(0.0004) == "p<0.001"
    assert format_p(0.0496) == "p=0.0496"  # "0.05" would read as not significant
    assert format_p(0.0504) == "p=0.05"  # not significant either way
    assert format_p(0.04996) == "p=0.04996"
    assert format_p(0.0123) == "p=0.012"
