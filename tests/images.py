"""Small test images made on the fly (nothing downloaded): photo-like content in every format and mode."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes, gradients and texture: compresses and decodes like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


# Made once per test process: tests ask for the same few images again and again, and each takes a
# noticeable fraction of a second to draw and encode. Bytes cannot be changed by the caller.
@functools.lru_cache(maxsize=None)
def jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=quality)


def variants(seed: int = 0) -> dict[str, bytes]:
    """One image in each format and pixel mode the service must handle."""
    return dict(_variants(seed))  # a dict of its own for each caller


@functools.lru_cache(maxsize=None)
def _variants(seed: int) -> dict[str, bytes]:
    base = photo_like(320, 240, seed)
    rgba = base.convert("RGBA")
    alpha = np.zeros((240, 320), np.uint8)
    alpha[40:200, 60:260] = 255
    rgba.putalpha(Image.fromarray(alpha))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return {
        "jpeg": encode(base, "JPEG", quality=90),
        "jpeg-exif-rotated": encode(base, "JPEG", quality=90, exif=exif.tobytes()),
        "jpeg-gray": encode(base.convert("L"), "JPEG", quality=90),
        "jpeg-cmyk": encode(base.convert("CMYK"), "JPEG", quality=90),
        "png": encode(base, "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-palette-transparent": encode(palette, "PNG", transparency=0),
        "png-16bit-gray": encode(gray16, "PNG"),
        "webp": encode(base, "WEBP", quality=90),
        "gif": encode(base.convert("P"), "GIF"),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
        "portrait": encode(photo_like(240, 320, seed), "PNG"),
    }
