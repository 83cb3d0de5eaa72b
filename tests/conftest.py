"""Shared fixtures: each model exported once per test session, and the repositories built from those exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.exports import Exports


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def exported_repo(exports) -> Path:
    """A model repository holding resnet18 v1 (fp32 + fp16, random init, seed 0). Read only."""
    return exports("resnet18").path.parents[1]


@pytest.fixture(scope="session")
def experiment_repo(exports, tmp_path_factory) -> Path:
    """resnet18 (as above), googlenet and inception_v3 (299x299 input): three architectures to compare, as
    test_pipeline checks them. Read only."""
    out = tmp_path_factory.mktemp("experiment-models")
    for name in ("resnet18", "googlenet", "inception_v3"):
        exports.copy(exports.checked(name), out)
    return out
