"""The guardrail checks themselves, on figures made up to sit either side of each threshold."""

from __future__ import annotations

import pytest

from service.experiments.guardrails import accuracy_test, check_variant, _Figures
from service.experiments.guardrails_config import Guardrails


def rails(**kw) -> Guardrails:
    base = dict(min_images=100, max_accuracy_drop=None, latency_p99_ms=None, error_rate=None, action="pause",
                interval_s=10.0)
    return Guardrails(**(base | kw))


def figs(images: int, correct: int = 0, labelled: int = 0, latency_s: float = 0.01) -> _Figures:
    return _Figures(images, labelled, correct, {f"r{i}": latency_s for i in range(images)})


def test_the_accuracy_test_is_one_sided_and_tolerates_max_drop():
    clearly_worse = accuracy_test(800, 1000, 700, 1000, max_drop=0.02)
    assert clearly_worse["breached"] and clearly_worse["p_value"] < 1e-4  # z = 0.08 / 0.0192 = 4.2
    within_tolerance = accuracy_test(800, 1000, 790, 1000, max_drop=0.02)  # 1 pp drop < 2 pp tolerated
    assert not within_tolerance["breached"]
    better = accuracy_test(700, 1000, 800, 1000, max_drop=0.0)
    assert not better["breached"] and better["p_value"] > 0.99
    noisy = accuracy_test(8, 10, 6, 10, max_drop=0.02)  # 20 pp drop on 10 images: not shown at 5 %
    assert not noisy["breached"]


def test_no_decision_before_min_images_then_the_first_breach():
    g = rails(max_accuracy_drop=0.02, latency_p99_ms=50)
    slow_and_wrong = {"c": figs(100, 90, 100), "v": figs(99, 10, 99, latency_s=0.2)}
    assert check_variant(g, "v", "c", slow_and_wrong, None) is None
    slow_and_wrong["v"] = figs(100, 10, 100, latency_s=0.2)
    guardrail, evidence = check_variant(g, "v", "c", slow_and_wrong, None)
    assert guardrail == "accuracy" and evidence["drop"] == pytest.approx(0.8)


def test_latency_and_error_rate_thresholds():
    g = rails(latency_p99_ms=50, error_rate=0.01)
    assert check_variant(g, "v", "c", {"v": figs(100, latency_s=0.049)}, (100, 1)) is None
    guardrail, evidence = check_variant(g, "v", "c", {"v": figs(100, latency_s=0.051)}, None)
    assert guardrail == "latency_p99_ms" and evidence["p99_ms"] == pytest.approx(51)
    guardrail, evidence = check_variant(g, "v", "c", {"v": figs(100, latency_s=0.01)}, (200, 3))
    assert guardrail == "error_rate" and evidence["error_rate"] == 0.015
    assert check_variant(g, "v", "c", {"v": figs(100)}, (99, 50)) is None  # too few answers counted
