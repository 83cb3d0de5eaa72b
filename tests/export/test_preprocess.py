"""The reference preprocessing is torchvision's eval transform on the same PIL image.

Checkpoints were trained and evaluated with ``Resize(resize)`` + ``CenterCrop(crop)``
on PIL images, so the reference must give those pixels exactly (torchvision is
the test oracle here; ``export/`` never imports it). A faster variant that is
only close (for example resizing just the crop region with ``resize(box=...)``)
fails this.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

from export.preprocess import reference_preprocess
from tests.images import encode, photo_like

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
def test_reference_equals_torchvision_resize_and_centre_crop(width, height, resize, crop, interpolation):
    img = photo_like(width, height, seed=width + height)
    ours = reference_preprocess(io.BytesIO(encode(img, "PNG")), resize, crop, interpolation)
    assert ours.shape == (crop, crop, 3)
    np.testing.assert_array_equal(ours, torchvision_eval(img, resize, crop, interpolation))
