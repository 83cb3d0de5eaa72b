"""Reference preprocessing: an image file to the model's uint8 NHWC input.

This is the definition the service reproduces pixel for pixel (a test checks
that it does): EXIF orientation applied, converted to 8-bit RGB (16-bit samples
scaled down, transparency composited over white), shorter side resized
to ``resize`` with the manifest's filter, centre crop of ``crop`` x ``crop``.
Cast and mean/std normalisation happen inside the ONNX graph, not here.

The resize and crop are one Pillow call, ``resize((crop, crop), box=...)``
over the source box the crop covers: the crop's pixels only, sampled where
the whole-image resize samples them (torchvision's ``Resize`` +
``CenterCrop``). Pillow rounds the box to float32, so a sample can differ
by a grey level; and Pillow picks the order of its two one-axis passes from
the sizes it is given, so where the box leads it to the other order (some
portrait shapes) bicubic differs by more at sharp edges, on few samples.
Nearest keeps the whole-image resize: there a box's rounding can move a
sample to the neighbouring pixel.
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


def resized_centre_crop(img: Image.Image, resize: int, crop: int, resample: Image.Resampling) -> Image.Image:
    """Shorter side to ``resize``, centre ``crop`` x ``crop``: only the source box the crop covers is resampled."""
    width, height = img.size
    size = resized_size(width, height, resize)
    left, top, right, bottom = centre_crop_box(*size, crop)
    if resample == Image.Resampling.NEAREST or not (0 <= left and right <= size[0] and 0 <= top and bottom <= size[1]):
        # A box's float edges can move a nearest sample to the next pixel; a crop past the edge is padded.
        return img.resize(size, resample).crop((left, top, right, bottom))
    # Multiplied before dividing: an edge at the image's border maps to it exactly, never past it.
    box = (left * width / size[0], top * height / size[1], right * width / size[0], bottom * height / size[1])
    return img.resize((crop, crop), resample, box=box)


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
        return np.asarray(resized_centre_crop(img, resize, crop, RESAMPLE[interpolation]), dtype=np.uint8)
