"""Experiment definitions and routing: validation messages, splits, stickiness."""

from __future__ import annotations

from collections import Counter

import pytest

from service.experiments.config import Experiment, ExperimentConfigError, Variant, parse_experiments
from service.experiments.routing import choose_variant

SERVED = {"resnet50": {1, 2}, "se_resnet50": {1}, "googlenet": {3}}


def is_served(model, version):
    if model not in SERVED:
        return f"model {model!r} is not served; served models: {', '.join(sorted(SERVED))}"
    if version is not None and version not in SERVED[model]:
        return f"model {model!r} has no served version {version}"
    return None


def parse(text: str):
    return parse_experiments(text, "experiments.yaml", is_served)


VALID = """
experiments:
  - name: ab
    sticky_key: X-User-Id
    variants:
      - {name: control, model: resnet50, weight: 90}
      - {model: se_resnet50, version: 1, weight: 10}
    shadows:
      - {model: googlenet}
"""


def test_a_valid_file_parses_with_default_names():
    (experiment,) = parse(VALID).values()
    assert [v.name for v in experiment.variants] == ["control", "se_resnet50@1"]
    assert experiment.shadows[0].name == "googlenet" and experiment.sticky_key == "X-User-Id"
    assert experiment.describe()["variants"][0]["share"] == 0.9


@pytest.mark.parametrize(
    "text, message",
    [
        ("experiments: [", "not valid YAML"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50}]", "at least 2 items"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50}, {model: vgg16}]", "variant 'vgg16': model 'vgg16' is not served"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50, version: 7}, {model: googlenet}]", "no served version 7"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50, weight: -1}, {model: googlenet}]", "greater than or equal to 0"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50, weight: 0}, {model: googlenet, weight: 0}]", "every variant has weight 0"),
        ("experiments:\n  - name: resnet50\n    variants: [{model: resnet50}, {model: googlenet}]", "has the name of a served model"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50}, {model: googlenet}]\n"
         "  - name: x\n    variants: [{model: resnet50}, {model: googlenet}]", "defined twice"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50}, {model: resnet50}]", "used twice"),
        ("experiments:\n  - name: x\n    variants: [{model: resnet50}, {model: googlenet}]\n    colour: red", "colour"),
        ("experiments:\n  - name: 'bad name!'\n    variants: [{model: resnet50}, {model: googlenet}]", "letters, digits"),
        ("experiments:\n  - name: x\n    sticky_key: 'X User'\n    variants: [{model: resnet50}, {model: googlenet}]", "header name"),
    ],
    ids=["yaml", "one-variant", "unknown-model", "unknown-version", "negative-weight", "all-zero", "name-collision",
         "duplicate-experiment", "duplicate-variant", "unknown-field", "bad-name", "bad-header"],
)
def test_invalid_definitions_name_the_problem(text, message):
    with pytest.raises(ExperimentConfigError, match=message):
        parse(text)


def test_an_empty_file_means_no_experiments():
    assert parse("") == {} and parse("experiments: []") == {}


def _experiment(*weights: int, name: str = "ab") -> Experiment:
    return Experiment(name, tuple(Variant(f"v{i}", "resnet50", None, w) for i, w in enumerate(weights)), (), "X-User-Id")


def test_a_90_10_split_over_10000_keys_lands_within_one_percent():
    counts = Counter(choose_variant(_experiment(90, 10), f"user-{i}").name for i in range(10_000))
    assert abs(counts["v0"] / 10_000 - 0.9) <= 0.01 and abs(counts["v1"] / 10_000 - 0.1) <= 0.01


def test_sticky_keys_never_move_and_replicas_agree():
    first = [choose_variant(_experiment(50, 30, 20), f"k{i}").name for i in range(2000)]
    again = [choose_variant(_experiment(50, 30, 20), f"k{i}").name for i in range(2000)]  # another "replica"
    assert first == again


def test_changing_one_weight_moves_only_the_keys_it_must():
    before = {i: choose_variant(_experiment(40, 30, 30), f"k{i}").name for i in range(5000)}
    after = {i: choose_variant(_experiment(40, 30, 60), f"k{i}").name for i in range(5000)}
    moved = [(before[i], after[i]) for i in before if before[i] != after[i]]
    assert moved and all(to == "v2" for _, to in moved), "keys only move to the variant whose weight grew"
    share = sum(1 for v in after.values() if v == "v2") / 5000
    assert abs(share - 60 / 130) < 0.02


def test_a_zero_weight_variant_gets_nothing():
    experiment = _experiment(1, 0, 1)
    assert "v1" not in {choose_variant(experiment, f"k{i}").name for i in range(3000)}
    assert "v1" not in {choose_variant(experiment, None).name for _ in range(3000)}


def test_without_a_key_the_split_is_weighted_random():
    import random

    rng = random.Random(1)
    counts = Counter(choose_variant(_experiment(75, 25), None, rng).name for _ in range(10_000))
    assert abs(counts["v0"] / 10_000 - 0.75) < 0.02
