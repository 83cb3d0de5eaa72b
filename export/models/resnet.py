"""ResNet (He et al., 2015) and SE-ResNet (Hu et al., 2018).

Parameter names follow torchvision's ResNet, which timm's ResNet shares, so
torchvision ``resnet*`` and timm ``seresnet*`` checkpoints load unchanged. SE-ResNet
is a ResNet whose blocks get an attention layer (``attn_layer``), not a separate model.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ._registry import register_model
from .squeeze_excite import AttnLayer, SqueezeExcite, make_attention



def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        attn_layer: Optional[AttnLayer] = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = make_attention(attn_layer, planes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)

        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    # Departs from the paper: the stride sits on the 3x3 conv (conv2), not on the
    # first 1x1, as in torchvision and timm ("ResNet v1.5").
    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        attn_layer: Optional[AttnLayer] = None,
    ) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.se = make_attention(attn_layer, outplanes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)

        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(nn.Module):
    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        attn_layer: Optional[AttnLayer] = None,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, attn_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, attn_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, attn_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, attn_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch then starts at zero and each block as the identity
        # (Goyal et al., 2017, https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int, attn_layer: Optional[AttnLayer]
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, attn_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, attn_layer=attn_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # N x 3 x 224 x 224
        x = self.relu(self.bn1(self.conv1(x)))
        # N x 64 x 112 x 112
        x = self.maxpool(x)
        # N x 64 x 56 x 56
        x = self.layer1(x)
        # N x 64e x 56 x 56  (e = block.expansion: 1 basic, 4 bottleneck)
        x = self.layer2(x)
        # N x 128e x 28 x 28
        x = self.layer3(x)
        # N x 256e x 14 x 14
        x = self.layer4(x)
        # N x 512e x 7 x 7
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 512e
        x = self.fc(x)
        # N x num_classes
        return x


_RESNET: dict[str, Any] = dict(
    family="resnet", state_dict_layout="torchvision", input_size=224, resize_size=256,
    interpolation="bilinear",
)
# Bicubic as timm's seresnet50 config; 224 / 256 is crop_pct 0.875.
_SE_RESNET: dict[str, Any] = dict(
    family="se_resnet", state_dict_layout="timm", input_size=224, resize_size=256,
    interpolation="bicubic",
)


@register_model(**_RESNET, description="ResNet-18 (torchvision layout)", published=(11.69, 1.81))
def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


@register_model(**_RESNET, description="ResNet-34 (torchvision layout)", published=(21.80, 3.66))
def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model(**_RESNET, description="ResNet-50 v1.5 (torchvision layout)", published=(25.56, 4.09))
def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model(**_RESNET, description="ResNet-101 v1.5 (torchvision layout)", published=(44.55, 7.80))
def resnet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kwargs)


@register_model(**_RESNET, description="ResNet-152 v1.5 (torchvision layout)", published=(60.19, 11.51))
def resnet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, **kwargs)


@register_model(**_SE_RESNET, description="SE-ResNet-18 (timm seresnet18 layout)")
def se_resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, attn_layer=SqueezeExcite, **kwargs)


@register_model(**_SE_RESNET, description="SE-ResNet-34 (timm seresnet34 layout)")
def se_resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, attn_layer=SqueezeExcite, **kwargs)


@register_model(**_SE_RESNET, description="SE-ResNet-50 (timm seresnet50 layout)", published=(28.09, 4.09))
def se_resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, attn_layer=SqueezeExcite, **kwargs)


@register_model(**_SE_RESNET, description="SE-ResNet-101 (timm seresnet101 layout)")
def se_resnet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, attn_layer=SqueezeExcite, **kwargs)


@register_model(**_SE_RESNET, description="SE-ResNet-152 (timm seresnet152 layout)")
def se_resnet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, attn_layer=SqueezeExcite, **kwargs)
