from pathlib import Path

from service.experiments.config import load_experiments

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "experiments.example.yaml"


def test_the_example_experiments_file_is_valid():
    served = {"resnet50", "se_resnet50", "inception_v3"}
    experiments = load_experiments(EXAMPLE, lambda m, v: None if m in served else f"{m} not served")
    (experiment,) = experiments.values()
    assert [v.weight for v in experiment.variants] == [90, 10] and experiment.shadows[0].model == "inception_v3"
    assert experiment.guardrails is not None and experiment.allocation == "fixed"
