"""Shared fixtures: each model exported once per test session, and the repositories built from those exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


class Exports:
    """Exports keyed by the options that decide their files: a model asked for twice with the same name, seed,
    precisions, calibration and opset is exported once per session, whichever test asks first (an export takes
    seconds for resnet18 and minutes for the deep models on a 2-core CPU).

    Each export is the only model of its own repository folder. Nothing may change those folders: a test that
    changes a repository gets a copy (``copy``)."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict[tuple, object] = {}

    def __call__(self, name: str, *, seed: int = 0, precisions: tuple[str, ...] | None = None,
                 calibrate: bool = True, opset: int | None = None):
        """The ``ExportResult`` of ``name`` exported with these options (``export_model``'s defaults otherwise)."""
        from export.pipeline import ExportOptions, export_model

        defaults = ExportOptions()
        options = ExportOptions(seed=seed, precisions=tuple(precisions or defaults.precisions), calibrate=calibrate,
                                opset=opset or defaults.opset)
        key = (name, options.seed, options.precisions, options.calibrate, options.opset)
        if key not in self._done:
            options.out = self.root / "-".join(
                [name, f"seed{seed}", "+".join(options.precisions), "calibrated" if calibrate else "raw",
                 f"opset{options.opset}"])
            self._done[key] = export_model(name, options)
        return self._done[key]

    def copy(self, result, repo: Path) -> Path:
        """A copy of the model folder of ``result`` (an export of this cache) in ``repo``; its path."""
        return Path(shutil.copytree(result.path.parent, repo / result.manifest.name))


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def exported_repo(exports) -> Path:
    """A model repository holding resnet18 v1 (fp32 + fp16, random init, seed 0). Read only."""
    return exports("resnet18").path.parents[1]


@pytest.fixture(scope="session")
def experiment_repo(exports, tmp_path_factory) -> Path:
    """resnet18 (as above), googlenet and inception_v3 (299x299 input): three architectures to compare. Read
    only."""
    out = tmp_path_factory.mktemp("experiment-models")
    exports.copy(exports("resnet18"), out)
    for name in ("googlenet", "inception_v3"):
        exports.copy(exports(name, precisions=("fp32",), calibrate=False), out)
    return out
