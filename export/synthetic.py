"""Deterministic structured test images (not pure noise).

Used to calibrate batch-norm statistics of randomly initialised models and as
the parity set: gradients, stripes, discs, checkerboards and smoothed noise
give activations closer to real photos than white noise does, so fp16/fp32
comparisons on them mean something.
"""

from __future__ import annotations

import numpy as np

_KINDS = ("gradient", "stripes", "disc", "checker", "blobs")


def structured_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` RGB images as uint8 NHWC ``[count, size, size, 3]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        kind = _KINDS[i % len(_KINDS)]
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3
        elif kind == "stripes":
            freq, angle = rng.uniform(2, 20), rng.uniform(0, np.pi)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        elif kind == "disc":
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.45)
            t = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.float32)
        elif kind == "checker":
            n = int(rng.integers(2, 16))
            t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
        else:
            t = _smooth_noise(rng, size)
        img = c0 + (c1 - c0) * t[..., None]
        img += rng.normal(0, 6, img.shape)  # a little sensor noise
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0, 1, (8, 8)).astype(np.float32)
    idx = np.linspace(0, 7, size)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, 7)
    frac = (idx - lo).astype(np.float32)
    rows = coarse[lo] * (1 - frac)[:, None] + coarse[hi] * frac[:, None]
    return rows[:, lo] * (1 - frac)[None, :] + rows[:, hi] * frac[None, :]
