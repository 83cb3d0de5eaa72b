"""Loading user checkpoints into our architectures, strictly.

Accepted: ``.pth``/``.pt`` (a state dict, or one nested under ``state_dict`` or
``model``, as training scripts save them) and ``.safetensors``. Keys saved from
``nn.DataParallel``/DDP (``module.`` prefix) are unwrapped. Keys of
training-only heads the registry names (auxiliary classifiers) are dropped and
reported. Anything else that does not match fails with every missing,
unexpected and mis-shaped key listed. Nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded into the requested architecture."""


@dataclass
class LoadReport:
    dropped_keys: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise WeightsError(
            f"checkpoint {path.name}: unsupported file type {path.suffix!r}; "
            f"use one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint must not be able to run code on load.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, truncated archive
        raise WeightsError(f"checkpoint {path.name} could not be read: {exc}") from exc
    return _unwrap(obj, path.name)


def _unwrap(obj, name: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not _is_state_dict(obj):
        nested = next((k for k in _NESTING_KEYS if k in obj), None)
        if nested is None:
            raise WeightsError(
                f"checkpoint {name} holds a dict that is not a state dict and has none of the keys "
                f"{', '.join(_NESTING_KEYS)}; its top-level keys are: {', '.join(map(str, list(obj)[:10]))}"
            )
        obj = obj[nested]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"checkpoint {name} does not contain a state dict (found {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], training_only_prefixes: tuple[str, ...] = ()
) -> LoadReport:
    """Load ``state_dict`` into ``model`` with ``strict=True`` semantics."""
    report = LoadReport()
    kept = {}
    for key, value in state_dict.items():
        if key.startswith(training_only_prefixes):
            report.dropped_keys.append(key)
        else:
            kept[key] = value

    expected = model.state_dict()
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(kept[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(kept) & set(expected)
        if kept[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        raise WeightsError(_mismatch_message(missing, unexpected, misshaped))
    model.load_state_dict(kept, strict=True)
    return report


def _mismatch_message(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    parts = ["checkpoint does not match the architecture"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            parts.append(f"{len(keys)} {title}:\n  " + "\n  ".join(shown))
    if misshaped and not missing and not unexpected and all(k.startswith("fc.") for k in misshaped):
        parts.append("hint: a fine-tuned checkpoint with another class count needs --num-classes")
    return "\n".join(parts)
