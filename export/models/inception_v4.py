"""Inception-v4 (Szegedy et al., 2016, "Inception-v4, Inception-ResNet and the Impact of
Residual Connections on Learning", https://arxiv.org/abs/1602.07261).

Parameter names follow timm's ``inception_v4`` (a port of Google's released TF-slim model),
so its checkpoints load unchanged: the layers sit in one ``features`` sequence, indexed as in
timm, and the classifier is ``last_linear``. The released model has no auxiliary head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ._registry import register_model
from .googlenet import BasicConv2d


def _avg_pool() -> nn.AvgPool2d:
    # TF's "SAME" average pooling divides by the pixels inside the image, not by 9 at the borders.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Mixed3a(nn.Module):
    """Stem, 147 x 147 -> 73 x 73: max pool beside a stride-2 conv (the paper's Figure 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxpool = nn.MaxPool2d(3, stride=2)
        self.conv = BasicConv2d(64, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.maxpool(x), self.conv(x)], 1)


class Mixed4a(nn.Module):
    """Stem, 73 x 73 -> 71 x 71: a plain branch beside one with a factorised 7 x 7."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(
            BasicConv2d(160, 64, kernel_size=1),
            BasicConv2d(64, 96, kernel_size=3),
        )
        self.branch1 = nn.Sequential(
            BasicConv2d(160, 64, kernel_size=1),
            BasicConv2d(64, 64, kernel_size=(1, 7), padding=(0, 3)),
            BasicConv2d(64, 64, kernel_size=(7, 1), padding=(3, 0)),
            BasicConv2d(64, 96, kernel_size=3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x)], 1)


class Mixed5a(nn.Module):
    """Stem, 71 x 71 -> 35 x 35: a stride-2 conv beside max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = BasicConv2d(192, 192, kernel_size=3, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.maxpool(x)], 1)


class InceptionA(nn.Module):
    """35 x 35 module (Figure 4): 5 x 5 factorised as two 3 x 3."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(384, 96, kernel_size=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(384, 64, kernel_size=1),
            BasicConv2d(64, 96, kernel_size=3, padding=1),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(384, 64, kernel_size=1),
            BasicConv2d(64, 96, kernel_size=3, padding=1),
            BasicConv2d(96, 96, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(_avg_pool(), BasicConv2d(384, 96, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class ReductionA(nn.Module):
    """Grid reduction 35 x 35 -> 17 x 17 (Figure 7, k, l, m, n = 192, 224, 256, 384)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(384, 384, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(
            BasicConv2d(384, 192, kernel_size=1),
            BasicConv2d(192, 224, kernel_size=3, padding=1),
            BasicConv2d(224, 256, kernel_size=3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class InceptionB(nn.Module):
    """17 x 17 module (Figure 5): 7 x 7 factorised as 1 x 7 then 7 x 1."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(1024, 384, kernel_size=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(1024, 192, kernel_size=1),
            BasicConv2d(192, 224, kernel_size=(1, 7), padding=(0, 3)),
            BasicConv2d(224, 256, kernel_size=(7, 1), padding=(3, 0)),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(1024, 192, kernel_size=1),
            BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0)),
            BasicConv2d(192, 224, kernel_size=(1, 7), padding=(0, 3)),
            BasicConv2d(224, 224, kernel_size=(7, 1), padding=(3, 0)),
            BasicConv2d(224, 256, kernel_size=(1, 7), padding=(0, 3)),
        )
        self.branch3 = nn.Sequential(_avg_pool(), BasicConv2d(1024, 128, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class ReductionB(nn.Module):
    """Grid reduction 17 x 17 -> 8 x 8 (Figure 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(
            BasicConv2d(1024, 192, kernel_size=1),
            BasicConv2d(192, 192, kernel_size=3, stride=2),
        )
        self.branch1 = nn.Sequential(
            BasicConv2d(1024, 256, kernel_size=1),
            BasicConv2d(256, 256, kernel_size=(1, 7), padding=(0, 3)),
            BasicConv2d(256, 320, kernel_size=(7, 1), padding=(3, 0)),
            BasicConv2d(320, 320, kernel_size=3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class InceptionC(nn.Module):
    """8 x 8 module (Figure 6) with the expanded filter bank: 1 x 3 and 3 x 1 side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(1536, 256, kernel_size=1)

        self.branch1_0 = BasicConv2d(1536, 384, kernel_size=1)
        self.branch1_1a = BasicConv2d(384, 256, kernel_size=(1, 3), padding=(0, 1))
        self.branch1_1b = BasicConv2d(384, 256, kernel_size=(3, 1), padding=(1, 0))

        # 3 x 1 then 1 x 3, as in the released model whose weights timm serves.
        self.branch2_0 = BasicConv2d(1536, 384, kernel_size=1)
        self.branch2_1 = BasicConv2d(384, 448, kernel_size=(3, 1), padding=(1, 0))
        self.branch2_2 = BasicConv2d(448, 512, kernel_size=(1, 3), padding=(0, 1))
        self.branch2_3a = BasicConv2d(512, 256, kernel_size=(1, 3), padding=(0, 1))
        self.branch2_3b = BasicConv2d(512, 256, kernel_size=(3, 1), padding=(1, 0))

        self.branch3 = nn.Sequential(_avg_pool(), BasicConv2d(1536, 256, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        branch0 = self.branch0(x)

        branch1 = self.branch1_0(x)
        branch1 = torch.cat([self.branch1_1a(branch1), self.branch1_1b(branch1)], 1)

        branch2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        branch2 = torch.cat([self.branch2_3a(branch2), self.branch2_3b(branch2)], 1)

        return torch.cat([branch0, branch1, branch2, self.branch3(x)], 1)


class InceptionV4(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        # One sequence, as timm's: checkpoint keys are features.<index>.*
        self.features = nn.Sequential(
            # N x 3 x 299 x 299
            BasicConv2d(3, 32, kernel_size=3, stride=2),
            # N x 32 x 149 x 149
            BasicConv2d(32, 32, kernel_size=3),
            # N x 32 x 147 x 147
            BasicConv2d(32, 64, kernel_size=3, padding=1),
            # N x 64 x 147 x 147
            Mixed3a(),
            # N x 160 x 73 x 73
            Mixed4a(),
            # N x 192 x 71 x 71
            Mixed5a(),
            # N x 384 x 35 x 35
            *[InceptionA() for _ in range(4)],
            # N x 384 x 35 x 35
            ReductionA(),
            # N x 1024 x 17 x 17
            *[InceptionB() for _ in range(7)],
            # N x 1024 x 17 x 17
            ReductionB(),
            # N x 1536 x 8 x 8
            *[InceptionC() for _ in range(3)],
            # N x 1536 x 8 x 8
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # The paper's Figure 9: dropout (keep 0.8) before the classifier.
        self.dropout = nn.Dropout(p=dropout)
        self.last_linear = nn.Linear(1536, num_classes)
        # No init loop: PyTorch's default initialisation, as timm's.

    def forward(self, x: Tensor) -> Tensor:
        # N x 3 x 299 x 299
        x = self.features(x)
        # N x 1536 x 8 x 8
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 1536
        x = self.dropout(x)
        x = self.last_linear(x)
        # N x num_classes
        return x


# timm's inception_v4 config (Google's weights): inputs in [-1, 1], i.e. mean = std = 0.5;
# bicubic, crop_pct 0.875, so the shorter side is resized to floor(299 / 0.875) = 341.
@register_model(
    family="inception_v4",
    input_size=299,
    resize_size=341,
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    state_dict_layout="timm",
    description="Inception-v4 (timm inception_v4 layout)",
    published=(42.7, 12.3),
)
def inception_v4(num_classes: int = 1000, **kwargs: Any) -> InceptionV4:
    return InceptionV4(num_classes=num_classes, **kwargs)
