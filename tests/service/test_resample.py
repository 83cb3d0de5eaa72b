"""Resize-then-crop restricted to the crop (service/images/resample.py) against Pillow's full resize, pixel for pixel."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from service import resample
from service.images.preprocess import _centre_crop_box, _shorter_side_size
from service.images.resample import _Span, resized_crop, vertical_first

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# (resize, crop): ResNet's, Inception v3's, and a few others.
TARGETS = [(256, 224), (342, 299), (232, 224), (256, 256), (128, 112), (299, 299)]
PHOTOS = [(500, 375), (375, 500), (1008, 756), (756, 1008), (640, 480), (300, 1200), (1200, 300), (512, 512)]


def full(img, size, box, resample_filter):
    return np.asarray(img.resize(size, resample_filter).crop(box))


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Noise: every coefficient and every rounding shows in the output."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def geometries(count: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(count):
        width, height = rng.choice(PHOTOS) if i % 4 == 0 else (rng.randint(16, 1400), rng.randint(16, 1400))
        yield i, width, height, rng.choice(TARGETS), rng.choice(sorted(FILTERS))


def resizes(monkeypatch) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(input size, output size) of every ``Image.resize`` call, from now on."""
    made = []
    real = Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        made.append((self.size, tuple(size)))
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    return made


def test_the_installed_pillow_follows_a_known_pass_order():
    """Else the restricted passes are switched off (every resize is the full one); this says so in CI."""
    assert resample.vertical_first in resample.KNOWN_ORDERS
    if tuple(int(part) for part in Image.__version__.split(".")[:2]) >= (13, 0):
        assert resample.vertical_first is resample._vertical_first_9549


def test_equals_the_full_resize_for_every_geometry():
    cases = Counter()
    for i, width, height, (resize, crop), name in geometries(400):
        img = noise(width, height, i)
        size = _shorter_side_size(width, height, resize)
        box = _centre_crop_box(*size, crop)
        ours = np.asarray(resized_crop(img, size, box, FILTERS[name]))
        np.testing.assert_array_equal(ours, full(img, size, box, FILTERS[name]),
                                      err_msg=f"{width}x{height} -> {size}, crop {box}, {name}")
        if 0 <= box[0] and 0 <= box[1]:
            cases[(vertical_first(width, height, *size), _Span(width, size[0], box[0], box[2], 1.0).exact,
                   _Span(height, size[1], box[1], box[3], 1.0).exact)] += 1
    # Each way through the code ran: both pass orders, a restricted horizontal pass, vertical pass, or both.
    for order in (False, True):
        assert cases[(order, True, False)] >= 5 and cases[(order, True, True)] >= 5, cases
    assert cases[(False, False, True)] >= 20, cases


def test_a_landscape_photo_is_resampled_only_where_the_crop_keeps_it(monkeypatch):
    """500x375 to 341x256, crop 224: the vertical pass makes only the 224x224 kept pixels, and no call makes the
    whole 341x256 image."""
    made = resizes(monkeypatch)
    img = noise(500, 375, 0)
    ours = np.asarray(resized_crop(img, (341, 256), (58, 16, 282, 240), Image.Resampling.BILINEAR))
    outputs = [output for _, output in made]
    assert (341, 256) not in outputs and outputs[-1] == (224, 224), made
    monkeypatch.undo()
    np.testing.assert_array_equal(ours, full(img, (341, 256), (58, 16, 282, 240), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("box", [(58, 16, 282, 240), (-10, -10, 300, 300)], ids=["inside", "outside"])
def test_other_filters_and_crops_outside_the_image_get_the_full_resize(box):
    img = noise(500, 375, 1)
    for resample_filter in (Image.Resampling.NEAREST, Image.Resampling.LANCZOS, Image.Resampling.BILINEAR):
        np.testing.assert_array_equal(np.asarray(resized_crop(img, (341, 256), box, resample_filter)),
                                      full(img, (341, 256), box, resample_filter))


def test_a_pillow_that_follows_no_known_order_is_found_out(monkeypatch):
    monkeypatch.setattr(resample, "KNOWN_ORDERS", (lambda *geometry: not vertical_first(*geometry), lambda *_: True))
    assert resample._installed_pass_order() is None


def test_with_the_older_pass_order_too_it_equals_two_passes_in_that_order(monkeypatch):
    """As on a Pillow before 13, which always resizes horizontally first: emulated by two one-axis calls, for the
    geometries where a pass is restricted (elsewhere the installed Pillow's own full resize runs)."""
    monkeypatch.setattr(resample, "vertical_first", resample._horizontal_always)
    restricted = 0
    for i, width, height, (resize, crop), name in geometries(100, seed=1):
        size = _shorter_side_size(width, height, resize)
        box = _centre_crop_box(*size, crop)
        if min(box) < 0 or not (_Span(width, size[0], box[0], box[2], 1.0).exact
                                or _Span(height, size[1], box[1], box[3], 1.0).exact):
            continue
        restricted += 1
        img = noise(width, height, i)
        older = img.resize((size[0], height), FILTERS[name]).resize(size, FILTERS[name]).crop(box)
        np.testing.assert_array_equal(np.asarray(resized_crop(img, size, box, FILTERS[name])), np.asarray(older),
                                      err_msg=f"{width}x{height} -> {size}, crop {box}, {name}")
    assert restricted >= 30


def test_without_a_known_pass_order_every_resize_is_the_full_one(monkeypatch):
    monkeypatch.setattr(resample, "vertical_first", None)
    made = resizes(monkeypatch)
    resized_crop(noise(500, 375, 2), (341, 256), (58, 16, 282, 240), Image.Resampling.BILINEAR)
    assert made == [((500, 375), (341, 256))]


def test_a_pass_is_restricted_only_where_its_box_is_exact():
    assert _Span(375, 256, 16, 240, 1.0).exact  # 375/256: a power-of-two fraction, edges exact in float32
    assert not _Span(500, 341, 58, 282, 1.0).exact  # 500/341: the box's edges would round
    # 2812/1100: both edges exact (1406, 2812), but the shifted centres 1406 + (n + 0.5) * 2812/1100 round unlike
    # (550 + n + 0.5) * 2812/1100, and some integer coefficients come out 1/2^22 apart.
    assert not _Span(2812, 1100, 550, 1100, 2.0).exact
    # bicubic, support s = 2 * 375/256: rows int(16.5 * 375/256 - s + 0.5) = 21 to int(239.5 * 375/256 + s + 0.5) = 354
    assert _Span(375, 256, 16, 240, 2.0).reads() == (21, 354)


def boxes(rng: random.Random, width: int, height: int):
    """Any box inside a ``width`` x ``height`` output: anywhere, 1 pixel, touching an edge, the whole of it."""
    left, top = rng.randrange(width), rng.randrange(height)
    yield left, top, rng.randint(left + 1, width), rng.randint(top + 1, height)
    yield left, top, left + 1, top + 1
    yield 0, top, rng.randint(1, width), height
    yield 0, 0, width, height


def test_equals_the_full_resize_for_any_box_and_odd_sizes():
    """Not only centre crops of photos: tiny and very thin images, 1-pixel outputs, upscaling."""
    rng = random.Random(2)
    sizes = [((3000, 5), (750, 5)), ((5, 3000), (5, 750)), ((3000, 5), (6000, 10)), ((1, 1), (256, 256)),
             ((2, 2), (1, 1)), ((7, 300), (1, 64)), ((640, 480), (512, 384)), ((300, 200), (1024, 256))]
    for _ in range(40):
        width, height = rng.randint(1, 600), rng.randint(1, 600)
        sizes.append(((width, height), (rng.choice([rng.randint(1, 700), width * 2, max(1, width // 4)]),
                                        rng.choice([256, 128, rng.randint(1, 700)]))))
    for i, ((width, height), size) in enumerate(sizes):
        img = noise(width, height, i)
        for box in boxes(rng, *size):
            for name, resample_filter in FILTERS.items():
                np.testing.assert_array_equal(np.asarray(resized_crop(img, size, box, resample_filter)),
                                              full(img, size, box, resample_filter),
                                              err_msg=f"{width}x{height} -> {size}, box {box}, {name}")


def test_a_box_in_floats_is_taken_as_the_plain_crop_takes_it():
    img = noise(500, 375, 3)
    for box in ((58.0, 16.0, 282.0, 240.0), (58.4, 16.0, 282.4, 240.0)):
        np.testing.assert_array_equal(np.asarray(resized_crop(img, (341, 256), box, Image.Resampling.BILINEAR)),
                                      full(img, (341, 256), box, Image.Resampling.BILINEAR))


def test_each_pass_reads_only_the_lines_the_crop_needs(monkeypatch):
    """What the speed-up rests on: the first pass gets the input cut to the kept pixels' lines along each
    restricted axis (landscape 500x375: rows; a tall 300x1000, vertical pass first: columns)."""
    made = resizes(monkeypatch)
    resized_crop(noise(500, 375, 4), (341, 256), (58, 16, 282, 240), Image.Resampling.BILINEAR)
    assert made[0][0] == (500, 329), made  # rows 23..352 of 375: what output rows 16..240 read
    made.clear()
    assert vertical_first(300, 1000, 256, 853)
    resized_crop(noise(300, 1000, 5), (256, 853), (16, 314, 240, 538), Image.Resampling.BILINEAR)
    first_input = made[0][0]
    assert first_input[0] < 300 and first_input[1] == 1000, made  # columns cut; rows not (1000/853 is not exact)


def test_restricted_passes_that_disagree_with_pillow_are_found_out(monkeypatch):
    """The import-time self-test: a restricted pass one input line off (as if Pillow computed its bounds otherwise)
    switches the fast path off."""
    assert resample._agrees_with_pillow()
    monkeypatch.setattr(_Span, "reads", lambda span: (max(0, int((span.start + 0.5) * span.scale) - 1), span.size))
    assert not resample._agrees_with_pillow()
