"""The experiments in force: the current set, its reloads, and the check that their models are served."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..models.served import ModelTable
from .config import Experiment, ServedCheck, load_experiments


def served_check_from_table(table: ModelTable) -> ServedCheck:
    def check(model: str, version: int | None) -> str | None:
        versions = table.versions(model)
        if not versions:
            return f"model {model!r} is not served; served models: {', '.join(table.names()) or 'none'}"
        if version is not None and version not in versions:
            return f"model {model!r} has no served version {version}; served: {', '.join(map(str, sorted(versions)))}"
        return None

    return check


def served_check_from_plan(plan: list[tuple[str, int]]) -> ServedCheck:
    served: dict[str, set[int]] = {}
    for name, version in plan:
        served.setdefault(name, set()).add(version)

    def check(model: str, version: int | None) -> str | None:
        if model not in served:
            return f"model {model!r} is not served; served models: {', '.join(sorted(served)) or 'none'}"
        if version is not None and version not in served[model]:
            return f"model {model!r} has no served version {version}; served: {', '.join(map(str, sorted(served[model])))}"
        return None

    return check


@dataclass
class Experiments:
    path: Path | None
    current: dict[str, Experiment] = field(default_factory=dict)
    loaded_at: float | None = None
    shed: dict[tuple[str, str], int] = field(default_factory=dict)  # (experiment, shadow) -> images shed
    configured: dict[str, Experiment] = field(default_factory=dict)  # as the file says, before guardrail pauses
    # Applies the guardrails' pauses to a freshly loaded set (service.experiments.guardrails installs it).
    overlay: Callable[[dict[str, Experiment]], dict[str, Experiment]] | None = None

    def load(self, check: ServedCheck) -> dict[str, Experiment]:
        """Read and validate the file; replace the current set only if it is entirely valid."""
        if self.path is None:
            return self.current
        experiments = load_experiments(self.path, check)
        self.configured = experiments
        self.current = self.overlay(experiments) if self.overlay else experiments
        self.loaded_at = time.time()
        return experiments

    def get(self, name: str) -> Experiment | None:
        return self.current.get(name)
