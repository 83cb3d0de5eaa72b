"""Experiments: named, weighted sets of variants, defined in a YAML file.

```yaml
experiments:
  - name: resnet50-vs-se
    sticky_key: X-User-Id          # optional request header; same key -> same variant on every replica
    variants:
      - {name: control, model: resnet50, weight: 90}
      - {name: se, model: se_resnet50, version: 1, weight: 10}
    shadows:                        # optional: run on a copy of each image, never returned
      - {model: inception_v3}
    guardrails: {accuracy: {max_drop: 0.02}}  # optional: see guardrails_config
```

A variant's ``name`` defaults to its model (``model@version`` when pinned).
Weights are integers >= 0 with at least one positive in an experiment; 0 pauses
a variant (it gets no traffic and keeps its history). Problems are reported
with the experiment and variant they concern; nothing is half-applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .guardrails_config import Guardrails, GuardrailsSpec
from .bandit import BanditSpec, BanditState, check_spec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class ExperimentConfigError(ValueError):
    """The experiments file is invalid; the message names the problem."""


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    model: str
    version: int | None = Field(default=None, gt=0)
    weight: int = Field(default=1, ge=0)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.model if self.version is None else f"{self.model}@{self.version}"


class ShadowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    model: str
    version: int | None = Field(default=None, gt=0)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.model if self.version is None else f"{self.model}@{self.version}"


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    variants: list[VariantSpec] = Field(min_length=2)
    shadows: list[ShadowSpec] = Field(default_factory=list)
    sticky_key: str | None = None
    description: str = ""
    guardrails: GuardrailsSpec | None = None  # see service.experiments.guardrails_config
    allocation: Literal["fixed", "thompson"] = "fixed"  # thompson: see service.experiments.bandit
    bandit: BanditSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @field_validator("sticky_key")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER.match(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        return value


class ExperimentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiments: list[ExperimentSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    version: int | None  # None: the model's latest served version
    weight: int


@dataclass(frozen=True)
class Experiment:
    name: str
    variants: tuple[Variant, ...]
    shadows: tuple[Variant, ...]
    sticky_key: str | None
    description: str = ""
    guardrails: Guardrails | None = None
    allocation: str = "fixed"
    bandit: BanditState | None = field(default=None, compare=False, repr=False)  # live shares when thompson

    def describe(self) -> dict:
        def variant(v: Variant) -> dict:
            return {"name": v.name, "model": v.model, "version": v.version, "weight": v.weight}

        total = sum(v.weight for v in self.variants)
        shares = self.bandit.shares if self.bandit else {v.name: v.weight / total for v in self.variants}
        return {
            "name": self.name,
            "description": self.description,
            "sticky_key": self.sticky_key,
            "allocation": self.allocation,
            "variants": [variant(v) | {"share": shares.get(v.name, 0.0)} for v in self.variants],
            "shadows": [{"name": s.name, "model": s.model, "version": s.version} for s in self.shadows],
        }


# (model, version or None) -> does the repository serve it?
ServedCheck = Callable[[str, int | None], str | None]


def parse_experiments(text: str, source: str, is_served: ServedCheck) -> dict[str, Experiment]:
    """Parse and validate; ``is_served`` returns None if (model, version) is served, else why not."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ExperimentConfigError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    try:
        parsed = ExperimentsFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ExperimentConfigError(f"{source}: {problems}") from exc

    experiments: dict[str, Experiment] = {}
    for spec in parsed.experiments:
        where = f"{source}: experiment {spec.name!r}"
        if spec.name in experiments:
            raise ExperimentConfigError(f"{where} is defined twice; experiment names must be unique")
        if is_served(spec.name, None) is None:
            raise ExperimentConfigError(
                f"{where} has the name of a served model; /classify/{spec.name} would be ambiguous, rename it"
            )
        if not any(v.weight > 0 for v in spec.variants):
            raise ExperimentConfigError(f"{where}: every variant has weight 0; at least one must be positive")
        labels = [v.label for v in spec.variants] + [s.label for s in spec.shadows]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ExperimentConfigError(
                f"{where}: variant name(s) {', '.join(duplicates)} used twice; give each variant a distinct name"
            )
        for entry in [*spec.variants, *spec.shadows]:
            problem = is_served(entry.model, entry.version)
            if problem is not None:
                raise ExperimentConfigError(f"{where}, variant {entry.label!r}: {problem}")
        arms = [v for v in spec.variants if v.weight > 0]  # weight 0 pauses a variant, under a bandit too
        if spec.bandit is not None and spec.allocation != "thompson":
            raise ExperimentConfigError(f"{where}: a bandit block needs allocation: thompson (it is {spec.allocation})")
        bandit_spec = spec.bandit or BanditSpec()
        if spec.allocation == "thompson" and (problem := check_spec(bandit_spec, len(arms))):
            raise ExperimentConfigError(f"{where}: {problem}")
        experiments[spec.name] = Experiment(
            name=spec.name,
            variants=tuple(Variant(v.label, v.model, v.version, v.weight) for v in spec.variants),
            shadows=tuple(Variant(s.label, s.model, s.version, 0) for s in spec.shadows),
            sticky_key=spec.sticky_key,
            description=spec.description,
            guardrails=spec.guardrails.freeze() if spec.guardrails else None,
            allocation=spec.allocation,
            bandit=BanditState(spec.name, bandit_spec, [v.label for v in arms], [v.weight for v in arms])
            if spec.allocation == "thompson" else None,
        )
    return experiments


def load_experiments(path: Path, is_served: ServedCheck) -> dict[str, Experiment]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentConfigError(f"cannot read the experiments file {path}: {exc.strerror or exc}") from exc
    return parse_experiments(text, str(path), is_served)
