"""Batch-norm calibration for randomly initialised models.

A random model's running statistics are the defaults (mean 0, var 1), which
lets activations grow layer after layer until fp16 overflows and the parity
check means nothing. A few forward passes in train mode over structured images
set them to the statistics the network actually produces.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .synthetic import structured_images


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
