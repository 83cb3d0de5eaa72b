"""The suite's model exports: each model exported once per test session, whichever test asks first."""

from __future__ import annotations

import shutil
from pathlib import Path

# The default export (fp32 + fp16 behind the gate, batch-norm calibrated) of one model per family and of the
# deepest: the fp16 gate depends on the blocks and on depth (se_resnet152 has the most residual branches, with SE
# and bottlenecks; resnet18 has the basic blocks). The value is the gate's image count: the default 100, and 16
# for SE-ResNet-152, SE-Inception-v3, Inception-v4 and Inception-ResNet-v2, whose 100-image gate takes 15-30 s more
# each on a 2-core CPU; 16 is as strict per image (one disagreement fails the 99% gate). `python -m export` runs
# the 100 (docs/benchmarks.md).
# Every other model goes through the same export at fp32 without calibration (its graph, files and fp32 parity):
# on a 2-core CPU a deep model's full export takes a minute or more, mostly calibration and the gate.
FULL = {"resnet18": 100, "googlenet": 100, "inception_v3": 100,
        "se_resnet152": 16, "se_inception_v3": 16, "inception_v4": 16, "inception_resnet_v2": 16}


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
                 calibrate: bool = True, opset: int | None = None, parity_samples: int | None = None):
        """The ``ExportResult`` of ``name`` exported with these options (``export_model``'s defaults otherwise)."""
        from export.pipeline import ExportOptions, export_model

        defaults = ExportOptions()
        options = ExportOptions(seed=seed, precisions=tuple(precisions or defaults.precisions), calibrate=calibrate,
                                opset=opset or defaults.opset, parity_samples=parity_samples or defaults.parity_samples)
        key = (name, options.seed, options.precisions, options.calibrate, options.opset, options.parity_samples)
        if key not in self._done:
            options.out = self.root / "-".join(
                [name, f"seed{seed}", "+".join(options.precisions), "calibrated" if calibrate else "raw",
                 f"opset{options.opset}", f"gate{options.parity_samples}"])
            self._done[key] = export_model(name, options)
        return self._done[key]

    def checked(self, name: str):
        """The export the suite checks ``name`` with (``tests/export/test_pipeline.py``), shared by every test that
        serves it: the default export for the models in ``FULL``, fp32 without calibration for the others."""
        if name in FULL:
            return self(name, parity_samples=FULL[name])
        return self(name, precisions=("fp32",), calibrate=False)

    def copy(self, result, repo: Path) -> Path:
        """A copy of the model folder of ``result`` (an export of this cache) in ``repo``; its path."""
        return Path(shutil.copytree(result.path.parent, repo / result.manifest.name))
