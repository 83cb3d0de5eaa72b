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


def test_the_control_and_the_last_variant_with_traffic_are_flagged_never_paused():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from service.experiments.config import Experiment, Variant
    from service.experiments.guardrails import GuardrailKeeper
    from service.experiments.runtime import Experiments
    from service.metrics import ExperimentMetrics
    from service.store.records import PredictionRecord
    from service.store.sqlite import SQLiteStore

    g = rails(min_images=5, latency_p99_ms=10, interval_s=0.1)
    # The control takes no traffic in the file (weight 0); b and c split it; every variant is too slow.
    experiment = Experiment("e", (Variant("a", "m", None, 0), Variant("b", "m", None, 1), Variant("c", "m", None, 1)),
                            (), None, guardrails=g)
    with SQLiteStore(":memory:") as store:
        store.record([
            PredictionRecord(f"{v}{i}", 0, "e", v, "primary", "m", 1, (1,), (0.9,), 0.5, 100.0 + i)
            for v in "abc" for i in range(5)
        ])
        experiments = Experiments(None, current={"e": experiment}, configured={"e": experiment})
        state = SimpleNamespace(store=store, experiments=experiments,
                                experiment_metrics=ExperimentMetrics(CollectorRegistry()))
        keeper = GuardrailKeeper(state)
        keeper.evaluate()
        keeper.apply()
        decisions = {d.variant: d for d in store.decisions("e")}
        assert {v: d.action for v, d in decisions.items()} == {"a": "alert", "b": "pause", "c": "alert"}
        assert decisions["a"].evidence["not_paused"] == "the control is never paused"
        assert decisions["c"].evidence["not_paused"] == "the last variant with traffic is never paused"
        assert [v.weight for v in experiments.current["e"].variants] == [0, 0, 1]  # c keeps the traffic
        keeper.evaluate()  # again: nothing new, nothing lifted (no flapping)
        assert len(store.decisions("e")) == 3
        assert [v.weight for v in keeper.overlay({"e": experiment})["e"].variants] == [0, 0, 1]
