"""What the experiment store holds and hands back; plain data, no database types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["primary", "shadow"]


@dataclass(frozen=True)
class PredictionRecord:
    """One image of one request, as served by one variant (the primary) or run as a shadow."""

    request_id: str
    image_index: int  # position of the image in its request (0 for single-image requests)
    experiment: str
    variant: str  # the variant's name in the experiment
    role: Role
    model: str
    version: int
    top5: tuple[int, ...]  # class indices, best first (fewer if the model has fewer classes)
    top5_scores: tuple[float, ...]  # softmax probabilities matching top5
    latency_s: float  # primary: request arrival to response; shadow: its own queue + inference time
    created_at: float  # unix time (time.time()), for retention and time series


@dataclass(frozen=True)
class FeedbackRecord:
    request_id: str
    image_index: int
    label: int  # true class index
    received_at: float  # unix time


@dataclass(frozen=True)
class LabelledPrediction:
    """A primary prediction joined with its feedback, if any arrived."""

    prediction: PredictionRecord
    label: int | None = None
    labelled_at: float | None = None


@dataclass(frozen=True)
class ShadowPair:
    """A primary and one shadow on the same image."""

    primary: PredictionRecord
    shadow: PredictionRecord


@dataclass
class ExperimentData:
    """Everything the report needs for one experiment (within retention)."""

    experiment: str
    primaries: list[LabelledPrediction] = field(default_factory=list)
    shadow_pairs: list[ShadowPair] = field(default_factory=list)
    shadow_shed: dict[str, int] = field(default_factory=dict)  # shadow variant -> images shed (from metrics)
