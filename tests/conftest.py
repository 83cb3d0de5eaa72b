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
