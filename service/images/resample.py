"""Resize, then centre-crop: computing only the pixels the crop keeps, equal to Pillow's full resize pixel for pixel.

Preprocessing resizes the whole image (shorter side to ``resize``) and then
keeps a centre crop; for ResNet's 256 -> 224 that throws away 40% of the
resized pixels, and the resize is half of what decoding a photo costs. Pillow
resizes in two one-axis passes (each rounded to 8 bits), so the same result
can be had from two one-axis ``resize`` calls restricted to the crop, provided
that each restricted pass computes exactly the coefficients of the full one,
and that the passes run in the order Pillow's full resize runs them.

* **Order.** Pillow 13 runs the vertical pass first when the height shrinks
  by more than twice as many pixels as the width (``ImagingResampleInner``,
  python-pillow/Pillow#9549), else the horizontal pass first; earlier
  releases always run the horizontal pass first. Which rule the installed
  Pillow follows is found at import (``vertical_first``), and the restricted
  passes are checked against its full resize on a few small images; where
  either fails, every resize is the full one.
* **Exact coefficients.** A pass restricted to output pixels ``[a, c)`` of
  an axis scaled by ``s`` (input / output size) gets the box ``a*s .. c*s``,
  shifted by the lines cut off the input before it (below); Pillow takes the
  box as float32. Its filter centres, bounds and weights equal the full
  pass's, bit for bit, when ``s`` is a fraction with a power-of-two
  denominator and ``a*s``, ``c*s`` are exact in float32 (then so are the
  shifted edges, which are smaller): every quantity ``precompute_coeffs``
  computes is then exact in double precision. A sufficient condition, not a
  necessary one; with ``resize`` 256 the shorter side's scale, ``n / 256``,
  always meets it, while Inception v3's 342 rarely does. An axis that does
  not is resampled in full and then cropped; where neither does, the full
  resize runs.
* **Inputs.** Before the passes the input is cut (exactly: a crop copies) to
  the lines the kept pixels read along each restricted axis, and the boxes
  are shifted by the cut; Pillow's bounds move by the same whole number of
  lines, and its clamps at 0 and at the image's edge fall on the same lines.

``tests/service/test_resample.py`` compares this with the full resize over
hundreds of geometries and boxes, both pass orders, bilinear and bicubic.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import numpy as np
from PIL import Image

__all__ = ["KNOWN_ORDERS", "resized_crop", "vertical_first"]

# Filter supports (Pillow's Resample.c) of the filters this fast path takes; others run the full resize.
_SUPPORT = {Image.Resampling.BILINEAR: 1.0, Image.Resampling.BICUBIC: 2.0}
_MAX_DENOMINATOR = 1 << 16


def _vertical_first_9549(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Pillow 13 (python-pillow/Pillow#9549): the vertical pass first when the height shrinks by more than twice
    as many pixels as the width."""
    return height - out_height > 0 and height - out_height > 2 * (width - out_width)


def _horizontal_always(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Pillow before 13: always the horizontal pass first."""
    return False


# The pass orders of the Pillow releases this module knows; the installed one is found at import.
KNOWN_ORDERS = (_vertical_first_9549, _horizontal_always)


@dataclass(frozen=True)
class _Span:
    """One axis: ``size`` input pixels resized to ``out`` and kept ``[start, stop)`` of the output."""

    size: int
    out: int
    start: int
    stop: int
    support: float

    @property
    def scale(self) -> float:
        return self.size / self.out

    @cached_property  # read several times per image, on the decode path: computed once (exact rationals: ~6 us)
    def exact(self) -> bool:
        """A pass restricted to ``[start, stop)`` by a box computes the full pass's coefficients bit for bit."""
        scale = Fraction(self.size, self.out)
        if scale.denominator & (scale.denominator - 1) or scale.denominator > _MAX_DENOMINATOR:
            return False  # not a power-of-two fraction: a shifted box's centres can round differently
        # Both edges exact in float32 (then so is their difference, which Pillow divides by the output size).
        return all(float(np.float32(k * self.scale)) == k * scale for k in (self.start, self.stop))

    def reads(self) -> tuple[int, int]:
        """The input lines that output pixels ``[start, stop)`` read: Pillow's bounds, computed as it does."""
        support = self.support * max(self.scale, 1.0)
        first = int((self.start + 0.5) * self.scale - support + 0.5)
        last = int((self.stop - 1 + 0.5) * self.scale + support + 0.5)
        return max(first, 0), min(last, self.size)


def resized_crop(img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int],
                 resample: Image.Resampling) -> Image.Image:
    """``img.resize(size, resample).crop(box)``, equal pixel for pixel, resampling only what the crop keeps where
    that is exact (module docstring)."""
    support = _SUPPORT.get(resample)
    width, height = img.size
    if any(edge != int(edge) for edge in box):  # a fractional box: Pillow's crop rounds it; leave that to it
        return img.resize(size, resample).crop(box)
    left, top, right, bottom = (int(edge) for edge in box)
    if (support is None or vertical_first is None or img.mode != "RGB"
            or not (0 <= left < right <= size[0] and 0 <= top < bottom <= size[1])):
        return img.resize(size, resample).crop(box)
    x = _Span(width, size[0], left, right, support)
    y = _Span(height, size[1], top, bottom, support)
    if not (x.exact or y.exact):
        return img.resize(size, resample).crop(box)

    # Cut the input to the lines the kept pixels read, along each axis whose pass is restricted.
    x0, x1 = x.reads() if x.exact else (0, width)
    y0, y1 = y.reads() if y.exact else (0, height)
    if (x0, y0, x1, y1) != (0, 0, width, height):
        img = img.crop((x0, y0, x1, y1))

    def horizontal(im: Image.Image) -> Image.Image:
        rows = im.size[1]
        if x.exact:  # vertical untouched: Pillow runs the horizontal pass alone
            return im.resize((right - left, rows), resample,
                             box=(left * x.scale - x0, 0, right * x.scale - x0, rows))
        return im.resize((size[0], rows), resample).crop((left, 0, right, rows))

    def vertical(im: Image.Image) -> Image.Image:
        columns = im.size[0]
        if y.exact:
            return im.resize((columns, bottom - top), resample,
                             box=(0, top * y.scale - y0, columns, bottom * y.scale - y0))
        return im.resize((columns, size[1]), resample).crop((0, top, columns, bottom))

    if vertical_first(width, height, *size):
        return horizontal(vertical(img))
    return vertical(horizontal(img))


def _installed_pass_order():
    """The rule of ``KNOWN_ORDERS`` that the installed Pillow follows, on either side of each rule's threshold
    (noise, bicubic: the two orders round differently), or None."""
    rng = np.random.default_rng(0)
    probes = []
    # (width, height, out width, out height): height shrinks by 2x+1, 2x and 2x-1 the width's pixels, and less.
    for geometry in ((40, 61, 30, 40), (40, 60, 30, 40), (40, 59, 30, 40), (61, 40, 40, 30), (30, 200, 20, 50)):
        width, height, out_width, out_height = geometry
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        full = np.asarray(img.resize((out_width, out_height), Image.Resampling.BICUBIC))
        by_rows = img.resize((out_width, height), Image.Resampling.BICUBIC)
        horizontal_then = np.asarray(by_rows.resize((out_width, out_height), Image.Resampling.BICUBIC))
        by_columns = img.resize((width, out_height), Image.Resampling.BICUBIC)
        vertical_then = np.asarray(by_columns.resize((out_width, out_height), Image.Resampling.BICUBIC))
        if np.array_equal(horizontal_then, vertical_then):
            return None  # this probe cannot tell the orders apart: trust no rule
        if np.array_equal(full, vertical_then):
            probes.append((geometry, True))
        elif np.array_equal(full, horizontal_then):
            probes.append((geometry, False))
        else:
            return None  # neither order: not two one-axis passes as this module assumes
    return next((rule for rule in KNOWN_ORDERS if all(rule(*g) == first for g, first in probes)), None)


def _agrees_with_pillow() -> bool:
    """Restricted passes equal the full resize on a few small photos' geometries (both pass orders, each axis
    restricted), with the installed Pillow: a release that changed how it computes its coefficients shows here."""
    rng = np.random.default_rng(1)
    for (width, height), size, box in (
        ((100, 75), (85, 64), (10, 4, 66, 60)),  # horizontal pass first, rows restricted
        ((64, 300), (64, 300), (4, 20, 60, 280)),  # no resize: copies
        ((96, 400), (64, 266), (4, 105, 60, 161)),  # vertical pass first, columns restricted
        ((96, 128), (48, 64), (0, 5, 48, 59)),  # both axes restricted
    ):
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for resample in _SUPPORT:
            if not np.array_equal(np.asarray(resized_crop(img, size, box, resample)),
                                  np.asarray(img.resize(size, resample).crop(box))):
                return False
    return True


# Found once, at import (a few milliseconds): with a Pillow that follows no known rule, or whose restricted passes
# differ from its full resize, every resize is the full one.
vertical_first = _installed_pass_order()
if vertical_first is not None and not _agrees_with_pillow():
    vertical_first = None
