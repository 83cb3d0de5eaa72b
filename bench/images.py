"""What the load generator sends: photo-like JPEGs and random pixel arrays, the same bytes on every run."""

from __future__ import annotations

import argparse
import io
import re

import numpy as np
from PIL import Image

_NOISE_TILE = 1024  # the noise is drawn for at most this many rows and columns, then repeated
_MAX_PIXELS = 50_000_000  # --size bound: the client shares the machine with the server


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes, gradients and texture: compresses and decodes like a photo.

    The same recipe as the test suite's generator (tests/images.py), copied so
    the benchmark does not depend on the tests, and the same pixels up to
    1024x1024. Larger images (a 4032x3024 phone photo) are rendered in bands,
    and their Gaussian noise is one 1024x1024 tile repeated: drawing it per
    pixel is most of the cost, and a repeat every 1024 pixels changes neither
    the JPEG's size nor its decoding cost (JPEG codes each 8x8 block on its
    own).
    """
    rng = np.random.default_rng(seed)  # drawn in the same order as tests/images.py
    waves = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        waves.append((fx, fy, phase))
    discs = []
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        discs.append((cx, cy, r, rng.uniform(0, 255, 3)))
    tile_h, tile_w = min(height, _NOISE_TILE), min(width, _NOISE_TILE)
    noise = rng.normal(0, 12, (tile_h, tile_w, 3))
    xx = np.arange(width, dtype=np.float32)[None, :]
    out = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, tile_h):  # one band of rows at a time: bounded memory
        y1 = min(height, y0 + tile_h)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        img = np.empty((y1 - y0, width, 3), np.float32)
        for c, (fx, fy, phase) in enumerate(waves):
            img[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
        for cx, cy, r, colour in discs:  # each disc only within its bounding box
            xa, xb = max(0, int(cx - r) - 1), min(width, int(cx + r) + 2)
            ya, yb = max(y0, int(cy - r) - 1), min(y1, int(cy + r) + 2)
            if xa < xb and ya < yb:
                mask = (xx[:, xa:xb] - cx) ** 2 + (yy[ya - y0:yb - y0] - cy) ** 2 < r * r
                img[ya - y0:yb - y0, xa:xb][mask] = colour
        for x0 in range(0, width, tile_w):
            x1 = min(width, x0 + tile_w)
            img[:, x0:x1] += noise[:y1 - y0, :x1 - x0]
        out[y0:y1] = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def make_jpegs(count: int = 8, width: int = 500, height: int = 375, quality: int = 90, seed: int = 0) -> list[bytes]:
    """``count`` distinct photo-like JPEGs, the same bytes on every run."""
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photo_like(width, height, seed + i).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (e.g. ``4032x3024``) as ``(width, height)``; ``argparse`` type for ``--size``."""
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT in pixels, e.g. 4032x3024; got {text!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if not (1 <= width <= 65_500 and 1 <= height <= 65_500):  # JPEG's limit on each side
        raise argparse.ArgumentTypeError(f"each side must be 1 to 65500 pixels; got {text!r}")
    if width * height > _MAX_PIXELS:
        raise argparse.ArgumentTypeError(
            f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the {_MAX_PIXELS / 1e6:.0f} allowed"
        )
    return width, height


def random_pixels(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct uint8 ``[H, W, 3]`` arrays, the same on every run (v2 pixel inputs)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]

