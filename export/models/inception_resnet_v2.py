"""Inception-ResNet-v2 (Szegedy et al., 2016, "Inception-v4, Inception-ResNet and the Impact of
Residual Connections on Learning", https://arxiv.org/abs/1602.07261).

Parameter names follow timm's ``inception_resnet_v2``, a port of Google's released TF-slim
model, so its checkpoints load unchanged. Where that model departs from the paper's figures,
this one follows the model: an Inception-v3-like stem whose ``mixed_5b`` gives 320 channels
at 35 x 35 (the paper: the Inception-v4 stem, 384), and 1088 / 2080 channels at 17 x 17 /
8 x 8 (the paper's Figures 17 and 19: 1154 / 2048).

The residual blocks take an optional attention layer (``attn_layer``) on the residual branch
before the sum, as ResNet's blocks do; the registered model has none.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ._registry import register_model
from .googlenet import BasicConv2d
from .squeeze_excite import AttnLayer, make_attention


class Mixed5b(nn.Module):
    """Stem, end: 35 x 35 x 192 -> 35 x 35 x 320, an Inception-A-like module."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(192, 96, kernel_size=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(192, 48, kernel_size=1),
            BasicConv2d(48, 64, kernel_size=5, padding=2),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(192, 64, kernel_size=1),
            BasicConv2d(64, 96, kernel_size=3, padding=1),
            BasicConv2d(96, 96, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            # TF's "SAME" average pooling divides by the pixels inside the image.
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
            BasicConv2d(192, 64, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class _Residual(nn.Module):
    """The Inception-ResNet block (Figures 16, 17, 19): relu(x + scale * conv2d(branches(x))).

    ``conv2d`` is the 1 x 1 "linear" conv back to the block's width: a bias and no batch norm,
    as the paper puts batch norm on the conv layers but not on the sums. ``scale`` (0.1 to 0.3,
    the paper's Section 3.3) keeps the residuals small: unscaled, the paper's networks with over
    1000 filters died early in training.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _add_up(
        self, branch_channels: int, channels: int, attn_layer: Optional[AttnLayer], no_relu: bool = False
    ) -> None:
        # Called after the branches are built, so the state dict lists keys in timm's order.
        self.conv2d = nn.Conv2d(branch_channels, channels, kernel_size=1)
        self.se = make_attention(attn_layer, channels)
        self.relu = None if no_relu else nn.ReLU()

    def branches(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2d(self.branches(x))
        if self.se is not None:
            out = self.se(out)
        out = out * self.scale + x
        if self.relu is not None:
            out = self.relu(out)
        return out


class Block35(_Residual):
    """35 x 35 residual block (Inception-ResNet-A, Figure 16)."""

    def __init__(self, scale: float = 1.0, attn_layer: Optional[AttnLayer] = None) -> None:
        super().__init__(scale)
        self.branch0 = BasicConv2d(320, 32, kernel_size=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(320, 32, kernel_size=1),
            BasicConv2d(32, 32, kernel_size=3, padding=1),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(320, 32, kernel_size=1),
            BasicConv2d(32, 48, kernel_size=3, padding=1),
            BasicConv2d(48, 64, kernel_size=3, padding=1),
        )
        self._add_up(32 + 32 + 64, 320, attn_layer)

    def branches(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class Mixed6a(nn.Module):
    """Grid reduction 35 x 35 -> 17 x 17 (Reduction-A, Figure 7, k, l, m, n = 256, 256, 384, 384)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(320, 384, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(
            BasicConv2d(320, 256, kernel_size=1),
            BasicConv2d(256, 256, kernel_size=3, padding=1),
            BasicConv2d(256, 384, kernel_size=3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class Block17(_Residual):
    """17 x 17 residual block (Inception-ResNet-B, Figure 17): 7 x 7 as 1 x 7 then 7 x 1."""

    def __init__(self, scale: float = 1.0, attn_layer: Optional[AttnLayer] = None) -> None:
        super().__init__(scale)
        self.branch0 = BasicConv2d(1088, 192, kernel_size=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(1088, 128, kernel_size=1),
            BasicConv2d(128, 160, kernel_size=(1, 7), padding=(0, 3)),
            BasicConv2d(160, 192, kernel_size=(7, 1), padding=(3, 0)),
        )
        self._add_up(192 + 192, 1088, attn_layer)

    def branches(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x)], 1)


class Mixed7a(nn.Module):
    """Grid reduction 17 x 17 -> 8 x 8 (Reduction-B, Figure 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(
            BasicConv2d(1088, 256, kernel_size=1),
            BasicConv2d(256, 384, kernel_size=3, stride=2),
        )
        self.branch1 = nn.Sequential(
            BasicConv2d(1088, 256, kernel_size=1),
            BasicConv2d(256, 288, kernel_size=3, stride=2),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(1088, 256, kernel_size=1),
            BasicConv2d(256, 288, kernel_size=3, padding=1),
            BasicConv2d(288, 320, kernel_size=3, stride=2),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class Block8(_Residual):
    """8 x 8 residual block (Inception-ResNet-C, Figure 19): 3 x 3 as 1 x 3 then 3 x 1."""

    def __init__(
        self, scale: float = 1.0, no_relu: bool = False, attn_layer: Optional[AttnLayer] = None
    ) -> None:
        super().__init__(scale)
        self.branch0 = BasicConv2d(2080, 192, kernel_size=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(2080, 192, kernel_size=1),
            BasicConv2d(192, 224, kernel_size=(1, 3), padding=(0, 1)),
            BasicConv2d(224, 256, kernel_size=(3, 1), padding=(1, 0)),
        )
        self._add_up(192 + 256, 2080, attn_layer, no_relu=no_relu)

    def branches(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x)], 1)


class InceptionResNetV2(nn.Module):
    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.2, attn_layer: Optional[AttnLayer] = None
    ) -> None:
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, kernel_size=3)
        self.conv2d_2b = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, kernel_size=1)
        self.conv2d_4a = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool_5a = nn.MaxPool2d(3, stride=2)
        self.mixed_5b = Mixed5b()
        self.repeat = nn.Sequential(*[Block35(scale=0.17, attn_layer=attn_layer) for _ in range(10)])
        self.mixed_6a = Mixed6a()
        self.repeat_1 = nn.Sequential(*[Block17(scale=0.10, attn_layer=attn_layer) for _ in range(20)])
        self.mixed_7a = Mixed7a()
        self.repeat_2 = nn.Sequential(*[Block8(scale=0.20, attn_layer=attn_layer) for _ in range(9)])
        # As in the released model: one more 8 x 8 block, unscaled and without ReLU, before
        # the last 1 x 1 conv (which has its own).
        self.block8 = Block8(scale=1.0, no_relu=True, attn_layer=attn_layer)
        self.conv2d_7b = BasicConv2d(2080, 1536, kernel_size=1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # The paper's Figure 15: dropout (keep 0.8) before the classifier.
        self.dropout = nn.Dropout(p=dropout)
        self.classif = nn.Linear(1536, num_classes)
        # No init loop: PyTorch's default initialisation, as timm's.

    def forward(self, x: Tensor) -> Tensor:
        # N x 3 x 299 x 299
        x = self.conv2d_1a(x)
        # N x 32 x 149 x 149
        x = self.conv2d_2a(x)
        # N x 32 x 147 x 147
        x = self.conv2d_2b(x)
        # N x 64 x 147 x 147
        x = self.maxpool_3a(x)
        # N x 64 x 73 x 73
        x = self.conv2d_3b(x)
        # N x 80 x 73 x 73
        x = self.conv2d_4a(x)
        # N x 192 x 71 x 71
        x = self.maxpool_5a(x)
        # N x 192 x 35 x 35
        x = self.mixed_5b(x)
        # N x 320 x 35 x 35
        x = self.repeat(x)
        # N x 320 x 35 x 35
        x = self.mixed_6a(x)
        # N x 1088 x 17 x 17
        x = self.repeat_1(x)
        # N x 1088 x 17 x 17
        x = self.mixed_7a(x)
        # N x 2080 x 8 x 8
        x = self.repeat_2(x)
        x = self.block8(x)
        # N x 2080 x 8 x 8
        x = self.conv2d_7b(x)
        # N x 1536 x 8 x 8
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 1536
        x = self.dropout(x)
        x = self.classif(x)
        # N x num_classes
        return x


# timm's inception_resnet_v2 config (Google's weights): inputs in [-1, 1], i.e. mean = std = 0.5;
# bicubic, crop_pct 0.8975, so the shorter side is resized to floor(299 / 0.8975) = 333.
@register_model(
    family="inception_resnet_v2",
    input_size=299,
    resize_size=333,
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    state_dict_layout="timm",
    description="Inception-ResNet-v2 (timm inception_resnet_v2 layout)",
    published=(55.8, 13.2),
)
def inception_resnet_v2(num_classes: int = 1000, **kwargs: Any) -> InceptionResNetV2:
    return InceptionResNetV2(num_classes=num_classes, **kwargs)
