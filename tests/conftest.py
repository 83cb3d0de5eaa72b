"""Shared fixtures: small model repositories exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def exported_repo(tmp_path_factory) -> Path:
    """A model repository holding resnet18 v1 (fp32 + fp16, random init, seed 0)."""
    from export.pipeline import ExportOptions, export_model

    out = tmp_path_factory.mktemp("models")
    export_model("resnet18", ExportOptions(out=out, seed=0))
    return out


@pytest.fixture(scope="session")
def experiment_repo(exported_repo, tmp_path_factory) -> Path:
    """resnet18 (as above), googlenet and inception_v3 (299x299 input): three architectures to compare."""
    import shutil

    from export.pipeline import ExportOptions, export_model

    out = tmp_path_factory.mktemp("experiment-models")
    shutil.copytree(exported_repo / "resnet18", out / "resnet18")
    for name in ("googlenet", "inception_v3"):
        export_model(name, ExportOptions(out=out, seed=0, precisions=("fp32",), calibrate=False))
    return out
