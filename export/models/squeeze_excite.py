"""Squeeze-and-Excitation channel attention (Hu et al., 2018).

The layout follows timm's ``SEModule`` so that timm SE-ResNet checkpoints load
unchanged: the two fully connected layers are 1x1 convolutions with bias,
named ``fc1`` and ``fc2``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn
from torch import Tensor


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``divisor``."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, divisor: int = 8) -> None:
        super().__init__()
        # Departs from the paper's plain C / r: timm rounds the bottleneck width to
        # a multiple of 8 (at least 8), e.g. 64 / 16 -> 8 in SE-ResNet-18/34's first stage.
        reduced = make_divisible(channels / reduction, divisor)
        self.fc1 = nn.Conv2d(channels, reduced, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        # N x C x 1 x 1
        s = self.fc2(self.relu(self.fc1(s)))
        return x * self.gate(s)


# An attention layer as blocks and modules take it: built for a channel count (SqueezeExcite is one).
AttnLayer = Callable[[int], nn.Module]


def make_attention(attn_layer: Optional[AttnLayer], channels: int) -> Optional[nn.Module]:
    """The layer for ``channels``, or None: no module, so a model without attention keeps its plain state dict."""
    return attn_layer(channels) if attn_layer is not None else None


__all__ = ["AttnLayer", "SqueezeExcite", "make_attention", "make_divisible"]
