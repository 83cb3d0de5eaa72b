"""The architectures, registered by name.

Importing this package imports every architecture file, which registers its
builders.
"""

from . import googlenet, inception_resnet_v2, inception_v3, inception_v4, resnet  # noqa: F401  (registers models)
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    UnknownModelError,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelSpec",
    "UnknownModelError",
    "build_model",
    "get_model_spec",
    "list_models",
    "register_model",
]
