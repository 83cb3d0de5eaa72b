"""Model registry: name -> builder and the serving metadata that goes with it.

Every architecture file registers its builders with :func:`register_model`; the
export stage and the tests look models up by name only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
STATE_DICT_LAYOUTS = ("torchvision", "timm")


class UnknownModelError(KeyError):
    """Raised for a model name the registry does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture and how its inputs must be prepared."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    # Whose parameter names the state dict follows ("torchvision" or "timm").
    state_dict_layout: str = "torchvision"
    # Checkpoint keys that belong to training-only heads (auxiliary classifiers)
    # and are dropped, with a note, before the strict load.
    training_only_prefixes: tuple[str, ...] = field(default=())
    description: str = ""
    # (parameters in millions, GMACs for one image) as the checkpoint's model card publishes them; None where
    # no checkpoint is published. ``python -m export --list`` prints them beside our counts, and a test holds
    # the two together.
    published: tuple[float, float] | None = None

    def build(self, num_classes: int | None = None, **options) -> nn.Module:
        classes = self.num_classes if num_classes is None else num_classes
        if classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {classes}")
        return self.builder(num_classes=classes, **options)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(**metadata) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn`` under its own name with ``metadata``.

    A second registration under the same name is refused: two architectures
    silently sharing a name would export the wrong model.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        add_model(ModelSpec(name=fn.__name__, builder=fn, **metadata))
        return fn

    return wrap


def add_model(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is already registered; pick another name")
    if spec.interpolation not in INTERPOLATIONS:
        raise ValueError(f"{spec.name}: interpolation {spec.interpolation!r} is not one of {INTERPOLATIONS}")
    if spec.state_dict_layout not in STATE_DICT_LAYOUTS:
        raise ValueError(f"{spec.name}: state_dict_layout must be one of {STATE_DICT_LAYOUTS}")
    if spec.resize_size < spec.input_size:
        raise ValueError(
            f"{spec.name}: resize_size {spec.resize_size} is smaller than the crop {spec.input_size}"
        )
    _REGISTRY[spec.name] = spec


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models are: {', '.join(list_models())}"
        ) from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int | None = None, **options) -> nn.Module:
    return get_model_spec(name).build(num_classes, **options)
