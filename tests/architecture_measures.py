"""Shared by the architecture tests: trained-looking batch norm for random models, and measures of our modules
(kernel areas, receptive fields, FLOPs) for the seed notes' claims."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from export.models.squeeze_excite import SqueezeExcite


def kernel_area(conv: nn.Conv2d) -> int:
    """Weights per (input, output) channel pair."""
    return conv.weight.shape[-2] * conv.weight.shape[-1]


def receptive_field(convs: list[nn.Conv2d], size: int = 21) -> tuple[int, int]:
    """Height and width of the input region the centre output depends on.

    Uses |weights| so no two paths can cancel in the gradient.
    """
    x = torch.zeros(1, convs[0].in_channels, size, size, requires_grad=True)
    y = x
    for conv in convs:
        y = F.conv2d(y, conv.weight.detach().abs(), padding=conv.padding)
    y[0, :, size // 2, size // 2].sum().backward()
    support = x.grad[0].abs().sum(0) > 0
    rows = support.any(1).nonzero().flatten()
    cols = support.any(0).nonzero().flatten()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def flops(model: nn.Module, size: int = 224) -> int:
    """Conv / matmul FLOPs from FlopCounterMode, plus the SE layers' elementwise work
    (the pooling sum and the channel-wise multiply), which FlopCounterMode does not count."""
    elementwise = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal elementwise
        elementwise += 2 * inputs[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, SqueezeExcite)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return counter.get_total_flops() + elementwise


def give_trained_looking_batchnorm(model: nn.Module, size: int, seed: int) -> None:
    """Random BN affine parameters, then running stats from one batch.

    With fresh stats (mean 0, var 1) deep random-init nets blow up in eval mode and
    zero-init last BNs (timm's default) would hide the residual branch and SE layer.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.1, generator=gen)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: running stats = this batch's stats
        model.train()(torch.randn(1, 3, size, size, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
