"""Making a randomly initialised model numerically representative.

A random model's running statistics are the defaults (mean 0, var 1), which
lets activations grow layer after layer until fp16 overflows and the parity
check means nothing. A few forward passes in train mode over structured images
set them to the statistics the network actually produces.

Residual branches are also damped (last batch-norm scale 0.2, in the spirit of
torchvision's ``zero_init_residual``): with unit-scale branches the residual
stream grows with depth until fp16 and fp32 of a deep random ResNet disagree on
the top class for many images (docs/benchmarks.md). A deep network without
residual branches (Inception) is chaotic at random init instead: a small
difference at the input (fp16 rounding) grows module after module until it is
as large as the signal. Its batch-norm biases are set to +2 before calibrating,
so nearly every ReLU passes its input and the network is close to linear, where
a difference no longer grows (docs/benchmarks.md). Checkpoints are loaded
instead of all this.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .models.resnet import BasicBlock, Bottleneck
from .synthetic import structured_images

RESIDUAL_BRANCH_SCALE = 0.2
ACTIVE_BIAS = 2.0


def damp_residual_branches(model: nn.Module, scale: float = RESIDUAL_BRANCH_SCALE) -> int:
    """Set the last batch-norm scale of every residual branch; returns how many."""
    count = 0
    for block in model.modules():
        if isinstance(block, BasicBlock):
            nn.init.constant_(block.bn2.weight, scale)
        elif isinstance(block, Bottleneck):
            nn.init.constant_(block.bn3.weight, scale)
        else:
            continue
        count += 1
    return count


def activate_plain_networks(model: nn.Module, bias: float = ACTIVE_BIAS) -> int:
    """Set every batch-norm bias to ``bias`` (in units of the normalised activation) in a network with no
    ResNet blocks to damp (the Inception family; Inception-ResNet scales its own residuals); returns how
    many. Call before ``calibrate_batchnorm``."""
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        return 0
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    for m in norms:
        nn.init.constant_(m.bias, bias)
    return len(norms)


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    seed: int,
    batches: int = 4,
    batch_size: int = 16,
) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved_momentum = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all calibration batches
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    model.train()
    try:
        for b in range(batches):
            images = structured_images(batch_size, input_size, seed=seed * 1000 + b)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
            model((x - mean_t) / std_t)
    finally:
        for m, momentum in saved_momentum.items():
            m.momentum = momentum
        model.eval()
