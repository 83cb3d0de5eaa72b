"""Parameter and multiply-accumulate counts, measured on the model itself."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, input_size: int) -> float:
    """Billions of multiply-accumulates for one image (torchvision's "GFLOPS")."""
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, 3, input_size, input_size))
        # FlopCounterMode counts a multiply-add as two operations.
        return counter.get_total_flops() / 2 / 1e9
    finally:
        model.train(was_training)
