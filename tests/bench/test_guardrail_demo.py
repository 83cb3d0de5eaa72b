"""bench/guardrail_demo.py with tiny settings: the worse variant gets paused, and the script says so."""

from __future__ import annotations

import pytest

from bench import guardrail_demo


@pytest.fixture(scope="module")
def demo_repo(exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-models")
    for name in ("resnet18", "googlenet"):  # the suite's own exports: no second export of the same models
        exports.copy(exports.checked(name), out)
    return out


def test_the_demo_pauses_the_worse_variant_and_prints_the_evidence(demo_repo, capsys):
    status = guardrail_demo.main(["--models-dir", str(demo_repo), "--min-images", "25", "--timeout", "60",
                                  "--control-accuracy", "0.9", "--challenger-accuracy", "0.2"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "guardrail accuracy: challenger pause at" in out
    assert "p_value:" in out and "threshold: 0.02" in out and "verdict:" in out
    assert "20 requests after the decision were served by: ['control']" in out
