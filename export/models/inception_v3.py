"""Inception v3 (Szegedy et al., 2015, "Rethinking the Inception Architecture")
and SE-Inception v3 (Hu et al., 2018, "Squeeze-and-Excitation Networks").

Parameter names follow torchvision's ``Inception3`` built with ``aux_logits=False``.
The auxiliary classifier only helps training, so this model has none; its keys in a
torchvision checkpoint (``AuxLogits.*``) are dropped by the loader.

SE-Inception v3 is this model with an attention layer (``attn_layer``) on the output of
every Inception module, as in the SE paper's Figure 2: the same keys plus ``Mixed_*.se.*``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._registry import register_model
from .googlenet import BasicConv2d
from .squeeze_excite import AttnLayer, SqueezeExcite, make_attention


def _attend(se: Optional[nn.Module], x: Tensor) -> Tensor:
    return x if se is None else se(x)


class InceptionA(nn.Module):
    """35 x 35 module."""

    def __init__(
        self, in_channels: int, pool_features: int, attn_layer: Optional[AttnLayer] = None
    ) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)

        # Departs from the paper, which factorises every 5x5 into two 3x3 (its Figure 5):
        # torchvision, like Google's released model, keeps a 5x5 branch beside the
        # factorised one (branch3x3dbl).
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)

        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)

        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)
        self.se = make_attention(attn_layer, 64 + 64 + 96 + pool_features)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return _attend(self.se, torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1))


class InceptionB(nn.Module):
    """Grid reduction 35 x 35 -> 17 x 17."""

    def __init__(self, in_channels: int, attn_layer: Optional[AttnLayer] = None) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)

        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)
        self.se = make_attention(attn_layer, 384 + 96 + in_channels)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return _attend(self.se, torch.cat([branch3x3, branch3x3dbl, branch_pool], 1))


class InceptionC(nn.Module):
    """17 x 17 module: n x n factorised as 1 x n then n x 1, n = 7."""

    def __init__(
        self, in_channels: int, channels_7x7: int, attn_layer: Optional[AttnLayer] = None
    ) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)

        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))

        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))

        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)
        self.se = make_attention(attn_layer, 4 * 192)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)

        branch7x7 = self.branch7x7_1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(branch7x7))

        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))

        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return _attend(self.se, torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1))


class InceptionD(nn.Module):
    """Grid reduction 17 x 17 -> 8 x 8."""

    def __init__(self, in_channels: int, attn_layer: Optional[AttnLayer] = None) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)

        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)
        self.se = make_attention(attn_layer, 320 + 192 + in_channels)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))

        branch7x7x3 = self.branch7x7x3_1(x)
        branch7x7x3 = self.branch7x7x3_3(self.branch7x7x3_2(branch7x7x3))
        branch7x7x3 = self.branch7x7x3_4(branch7x7x3)

        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return _attend(self.se, torch.cat([branch3x3, branch7x7x3, branch_pool], 1))


class InceptionE(nn.Module):
    """8 x 8 module with the expanded filter bank: 1x3 and 3x1 side by side."""

    def __init__(self, in_channels: int, attn_layer: Optional[AttnLayer] = None) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)

        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))

        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))

        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)
        self.se = make_attention(attn_layer, 320 + 2 * 384 + 2 * 384 + 192)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)

        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)

        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)

        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return _attend(self.se, torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1))


class Inception3(nn.Module):
    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.5, attn_layer: Optional[AttnLayer] = None
    ) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32, attn_layer=attn_layer)
        self.Mixed_5c = InceptionA(256, pool_features=64, attn_layer=attn_layer)
        self.Mixed_5d = InceptionA(288, pool_features=64, attn_layer=attn_layer)
        self.Mixed_6a = InceptionB(288, attn_layer=attn_layer)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, attn_layer=attn_layer)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, attn_layer=attn_layer)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, attn_layer=attn_layer)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, attn_layer=attn_layer)
        self.Mixed_7a = InceptionD(768, attn_layer=attn_layer)
        self.Mixed_7b = InceptionE(1280, attn_layer=attn_layer)
        self.Mixed_7c = InceptionE(2048, attn_layer=attn_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.1, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # N x 3 x 299 x 299
        x = self.Conv2d_1a_3x3(x)
        # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)
        # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)
        # N x 64 x 147 x 147
        x = self.maxpool1(x)
        # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)
        # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)
        # N x 192 x 71 x 71
        x = self.maxpool2(x)
        # N x 192 x 35 x 35
        x = self.Mixed_5b(x)
        # N x 256 x 35 x 35
        x = self.Mixed_5c(x)
        # N x 288 x 35 x 35
        x = self.Mixed_5d(x)
        # N x 288 x 35 x 35
        x = self.Mixed_6a(x)
        # N x 768 x 17 x 17
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)
        # N x 768 x 17 x 17
        x = self.Mixed_7a(x)
        # N x 1280 x 8 x 8
        x = self.Mixed_7b(x)
        # N x 2048 x 8 x 8
        x = self.Mixed_7c(x)
        # N x 2048 x 8 x 8
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 2048
        x = self.dropout(x)
        x = self.fc(x)
        # N x num_classes
        return x


# torchvision's pretrained Inception v3 (ported from Google's) expects inputs scaled to
# [-1, 1]; its transform_input flag rebuilds that from ImageNet-normalised inputs.
# Mean = std = 0.5 here gives the same input directly, so no flag in the model.
_INCEPTION_V3_INPUTS: dict[str, Any] = dict(
    input_size=299,
    resize_size=342,
    interpolation="bilinear",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)


@register_model(
    **_INCEPTION_V3_INPUTS,
    family="inception_v3",
    state_dict_layout="torchvision",
    training_only_prefixes=("AuxLogits.",),
    description="Inception v3 (torchvision layout, no auxiliary head)",
    published=(23.83, 5.71),  # torchvision's 27.16M counts the auxiliary head, which is not exported
)
def inception_v3(num_classes: int = 1000, **kwargs: Any) -> Inception3:
    return Inception3(num_classes=num_classes, **kwargs)


# The SE paper reports SE-BN-Inception and SE-Inception-ResNet-v2, not v3, and no SE-Inception v3
# checkpoint is public: it exports random-init, or with weights one trains (--weights).
@register_model(
    **_INCEPTION_V3_INPUTS,
    family="se_inception_v3",
    state_dict_layout="torchvision",
    description="SE-Inception v3 (Inception v3 with SE on every module; no public checkpoint exists)",
)
def se_inception_v3(num_classes: int = 1000, **kwargs: Any) -> Inception3:
    return Inception3(num_classes=num_classes, attn_layer=SqueezeExcite, **kwargs)
