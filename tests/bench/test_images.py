"""bench.images: the JPEGs the load generator sends, the same bytes on every run."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.images import make_jpegs, parse_size, random_pixels
from tests.images import jpeg


def test_default_jpegs_are_unchanged():
    """The default images are the test suite's, byte for byte: figures stay comparable across versions."""
    assert make_jpegs(3) == [jpeg(seed=i) for i in range(3)]


def test_big_jpegs_are_photo_like_and_quality_90():
    (big,) = make_jpegs(1, 2000, 1500)
    image = Image.open(io.BytesIO(big))
    assert image.size == (2000, 1500) and image.format == "JPEG"
    reference = io.BytesIO()
    Image.new("RGB", (8, 8)).save(reference, format="JPEG", quality=90)
    assert image.quantization == Image.open(reference).quantization
    pixels = np.asarray(image, dtype=np.float32)
    assert 30 < pixels.std() < 120  # content, not flat
    assert len(big) > 2000 * 1500 * 0.2  # noisy like a photo: does not compress to nothing
    assert make_jpegs(1, 2000, 1500) == [big]  # deterministic


def test_size_parsing():
    assert parse_size("4032x3024") == (4032, 3024)
    assert parse_size(" 1X1 ") == (1, 1)


@pytest.mark.parametrize("text", ["500", "10x", "x10", "axb", "0x10", "10x0", "-5x5", "70000x10", "10000x10000"])
def test_a_bad_size_says_what_is_wrong(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT|pixels|megapixels"):
        parse_size(text)


def test_pixel_arrays_are_seeded_and_distinct():
    first = random_pixels(3, 4, 5)
    assert [a.shape for a in first] == [(4, 5, 3)] * 3 and all(a.dtype == np.uint8 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, random_pixels(3, 4, 5)))
    assert not np.array_equal(first[0], first[1])
