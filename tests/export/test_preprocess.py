"""The reference preprocessing against torchvision's eval transform on the same PIL image.

Checkpoints were trained and evaluated with ``Resize(resize)`` + ``CenterCrop(crop)``
on PIL images (torchvision is the test oracle here; ``export/`` never imports it).
The reference resizes only the source box the crop covers (``resize(box=...)``),
which samples each kept pixel where the whole-image resize does: nearest is the
whole-image resize, exactly; bilinear and bicubic agree to Pillow's rounding,
more loosely where Pillow runs its two passes in the other order for the box.
A box mapped a pixel off, or a crop off centre, fails these.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from export.preprocess import reference_preprocess
from tests.images import encode, jpeg, photo_like

MODES = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
         "bicubic": InterpolationMode.BICUBIC}
# Landscape, portrait, square, odd sizes, and images smaller than the resize (upscaled);
# 375x500 -> 342 and 257x333 are shapes where Pillow's box resize differs most from the full one.
SIZES = [(500, 375), (375, 500), (333, 257), (257, 333), (300, 300), (1024, 683), (120, 90), (224, 224)]
SPECS = [(256, 224), (342, 299), (232, 224), (256, 256)]


def torchvision_eval(img, resize: int, crop: int, interpolation: str) -> np.ndarray:
    transform = T.Compose([T.Resize(resize, interpolation=MODES[interpolation]), T.CenterCrop(crop)])
    return np.asarray(transform(img), dtype=np.uint8)


@pytest.mark.parametrize("interpolation", sorted(MODES))
@pytest.mark.parametrize("resize, crop", SPECS, ids=lambda v: str(v))
@pytest.mark.parametrize("width, height", SIZES, ids=lambda v: str(v))
def test_reference_is_torchvision_resize_and_centre_crop(width, height, resize, crop, interpolation):
    img = photo_like(width, height, seed=width + height)
    ours = reference_preprocess(io.BytesIO(encode(img, "PNG")), resize, crop, interpolation)
    theirs = torchvision_eval(img, resize, crop, interpolation)
    assert ours.shape == (crop, crop, 3)
    if interpolation == "nearest":
        np.testing.assert_array_equal(ours, theirs)
        return
    difference = np.abs(ours.astype(np.int16) - theirs)
    assert (difference > 1).mean() < 0.005 and difference.mean() < 0.5, (difference.max(), difference.mean())


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize, crop", SPECS, ids=lambda v: str(v))
def test_a_landscape_photo_is_within_one_grey_level_of_torchvision(resize, crop, interpolation):
    """500x375 JPEGs, the common case: Pillow runs the passes in the same order for the box, so only the box's
    float32 rounding shows."""
    data = jpeg(500, 375, seed=7)
    with Image.open(io.BytesIO(data)) as img:
        theirs = torchvision_eval(img.convert("RGB"), resize, crop, interpolation)
    ours = reference_preprocess(io.BytesIO(data), resize, crop, interpolation)
    assert np.abs(ours.astype(np.int16) - theirs).max() <= 1


def test_a_crop_larger_than_the_resized_image_is_padded_as_torchvision_pads_it():
    img = photo_like(300, 200, seed=1)
    ours = reference_preprocess(io.BytesIO(encode(img, "PNG")), 224, 256, "bilinear")
    theirs = torchvision_eval(img, 224, 256, "bilinear")
    np.testing.assert_array_equal(ours, theirs)
