"""Reference preprocessing: an image file to the model's uint8 NHWC input.

This is the definition the service's fast path must reproduce (a test checks
that it does): EXIF orientation applied, converted to 8-bit RGB (16-bit samples
scaled down, transparency composited over white), shorter side resized
to ``resize`` with the manifest's filter, centre crop of ``crop`` x ``crop``.
Cast and mean/std normalisation happen inside the ONNX graph, not here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resize`` (torchvision's rounding)."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def centre_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, the way a viewer would show it."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def reference_preprocess(path_or_file, resize: int, crop: int, interpolation: str) -> np.ndarray:
    """Decode one image into a ``[crop, crop, 3]`` uint8 array."""
    with Image.open(path_or_file) as img:
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img = img.resize(resized_size(*img.size, resize), RESAMPLE[interpolation])
        img = img.crop(centre_crop_box(*img.size, crop))
        return np.asarray(img, dtype=np.uint8)
