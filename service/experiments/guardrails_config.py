"""The ``guardrails`` block of an experiment in the YAML file, and its frozen form.

```yaml
guardrails:
  min_images: 500                   # no decision before this many primary images per variant
  accuracy: {max_drop: 0.02}        # top-1 vs the control, one-sided test at the report's alpha
  latency_p99_ms: 80                # per variant, p99 of the logged request latencies
  error_rate: 0.01                  # per variant, share of answers that were 5xx (504 included)
  action: pause                     # pause (weight 0 until the YAML changes) | alert (metric + log only)
  interval_s: 10                    # how often the checks run
```

Every key is optional, but at least one check (accuracy, latency_p99_ms,
error_rate) must be given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AccuracySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # < 1: a drop of 1 or more can never be shown, so the check would never fire.
    max_drop: float = Field(ge=0.0, lt=1.0, description="Largest tolerated fall in top-1 accuracy vs the control")


class GuardrailsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_images: int = Field(default=500, ge=1)
    accuracy: AccuracySpec | None = None
    latency_p99_ms: float | None = Field(default=None, gt=0)
    error_rate: float | None = Field(default=None, ge=0.0, lt=1.0)
    action: Literal["pause", "alert"] = "pause"
    interval_s: float = Field(default=10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _some_check(self) -> GuardrailsSpec:
        if self.accuracy is None and self.latency_p99_ms is None and self.error_rate is None:
            raise ValueError("guardrails need at least one check: accuracy, latency_p99_ms or error_rate")
        return self

    def freeze(self) -> Guardrails:
        return Guardrails(
            min_images=self.min_images, max_accuracy_drop=self.accuracy.max_drop if self.accuracy else None,
            latency_p99_ms=self.latency_p99_ms, error_rate=self.error_rate, action=self.action,
            interval_s=self.interval_s,
        )


@dataclass(frozen=True)
class Guardrails:
    min_images: int
    max_accuracy_drop: float | None
    latency_p99_ms: float | None
    error_rate: float | None
    action: Literal["pause", "alert"]
    interval_s: float

    def fingerprint(self, variant: object) -> str:
        """Of this block and one variant's spec (a dataclass): a decision holds while both stay as they were."""
        text = json.dumps({"guardrails": asdict(self), "variant": asdict(variant)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]  # 64 bits: distinct enough for one variant's history
