"""The service's decoding against the export stage's reference preprocessing."""

from __future__ import annotations

import io
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from export.preprocess import reference_preprocess
from service.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError
from service.images.preprocess import PreprocessSpec, check_media_type, decode_for, decode_image, media_type_of
from tests.images import encode, jpeg, photo_like, variants

SPECS = [
    PreprocessSpec(resize=256, crop=224, interpolation="bilinear", max_pixels=50_000_000),
    PreprocessSpec(resize=342, crop=299, interpolation="bilinear", max_pixels=50_000_000),
    PreprocessSpec(resize=256, crop=224, interpolation="bicubic", max_pixels=50_000_000),
]
VARIANTS = variants()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize}-{s.crop}-{s.interpolation}")
@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_decode_equals_the_reference_exactly(kind, spec):
    data = VARIANTS[kind]
    ours = decode_image(data, spec)
    reference = reference_preprocess(io.BytesIO(data), spec.resize, spec.crop, spec.interpolation)
    assert ours.dtype == np.uint8 and ours.shape == (spec.crop, spec.crop, 3)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("resize, crop", [(256, 224), (342, 299), (232, 224), (224, 256)], ids=lambda v: str(v))
@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (300, 1000), (1000, 300), (257, 333), (90, 120)],
                         ids=lambda v: str(v))
def test_every_shape_equals_the_reference_exactly(width, height, resize, crop, interpolation):
    """Landscape, portrait, thin, upscaled, and a crop larger than the resized image (padded)."""
    data = encode(photo_like(width, height, seed=width), "PNG")
    spec = PreprocessSpec(resize=resize, crop=crop, interpolation=interpolation, max_pixels=50_000_000)
    reference = reference_preprocess(io.BytesIO(data), resize, crop, interpolation)
    np.testing.assert_array_equal(decode_image(data, spec), reference)


def test_exif_orientation_is_applied():
    spec = SPECS[0]
    upright = decode_image(VARIANTS["jpeg"], spec)
    rotated = decode_image(VARIANTS["jpeg-exif-rotated"], spec)
    assert not np.array_equal(upright, rotated)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (300, 300), (10, 200, 30, 0))
    out = decode_image(encode(img, "PNG"), SPECS[0])
    assert (out == 255).all()


def test_large_jpeg_uses_draft_decoding_close_to_the_reference():
    data = jpeg(2400, 1800, seed=3)
    spec = SPECS[0]
    ours = decode_image(data, spec).astype(np.int16)
    reference = reference_preprocess(io.BytesIO(data), spec.resize, spec.crop, spec.interpolation).astype(np.int16)
    assert not np.array_equal(ours, reference)  # the DCT-scaled path really ran
    assert np.abs(ours - reference).mean() < 3.0


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", InvalidImageError, "empty"),
        (b"definitely not an image", InvalidImageError, "not an image in a supported format"),
        (jpeg()[:3000], InvalidImageError, "truncated or corrupt"),
        (encode(photo_like(64, 64), "PNG")[:200], InvalidImageError, "truncated or corrupt"),
        (b"%PDF-1.7\n...", UnsupportedMediaTypeError, "PDF images are not supported"),
        (encode(photo_like(64, 64), "ICO"), UnsupportedMediaTypeError, "ICO"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedMediaTypeError, "SVG"),
        (b"\x00\x00\x00\x1cftypheic" + b"\x00" * 32, UnsupportedMediaTypeError, "HEIC"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "pdf", "ico", "svg", "heic"],
)
def test_bad_images_raise_errors_that_say_what_happened(data, error, message):
    with pytest.raises(error, match=message):
        decode_image(data, SPECS[0])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decompression bomb needs no more than its header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    spec = PreprocessSpec(resize=256, crop=224, interpolation="bilinear", max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match="1500x1000 = 1500000 pixels, over the limit of 1000000"):
        decode_image(_png_header_only(1500, 1000), spec)


def test_pillow_decompression_bomb_check_is_an_error_too():
    spec = PreprocessSpec(resize=256, crop=224, interpolation="bilinear", max_pixels=10**12)
    with pytest.raises(ImageTooLargeError):
        decode_image(_png_header_only(40_000, 40_000), spec)


@pytest.mark.parametrize("content_type", ["text/plain", "image/svg+xml", "application/json", "video/mp4"])
def test_unsupported_declared_types_are_415(content_type):
    with pytest.raises(UnsupportedMediaTypeError, match="is not supported"):
        check_media_type(media_type_of(content_type))


@pytest.mark.parametrize(
    "content_type", [None, "image/jpeg", "image/PNG; charset=binary", "application/octet-stream",
                     "application/x-www-form-urlencoded"]
)
def test_image_and_generic_types_are_accepted(content_type):
    check_media_type(media_type_of(content_type))


def _with_orientation(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["jpeg", "png-rgba", "png-palette"])
def test_every_exif_orientation_equals_the_reference(kind, orientation):
    """Orientation is applied in place on the decoded image: the same pixels as the reference's copy."""
    base = photo_like(320, 240, seed=orientation)
    img = {
        "jpeg": base,
        "png-rgba": base.convert("RGBA"),
        "png-palette": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
    }[kind]
    data = _with_orientation(img, "JPEG" if kind == "jpeg" else "PNG", orientation)
    spec = SPECS[1]  # 320x240 -> 456x342: upscaled, then cropped to 299
    ours = decode_image(data, spec)
    reference = reference_preprocess(io.BytesIO(data), spec.resize, spec.crop, spec.interpolation)
    np.testing.assert_array_equal(ours, reference)
    upright = decode_image(_with_orientation(img, "JPEG" if kind == "jpeg" else "PNG", 1), spec)
    assert np.array_equal(ours, upright) == (orientation == 1)


def test_decode_for_several_specs_equals_decoding_for_each():
    data = VARIANTS["jpeg-exif-rotated"]
    first, second, third = decode_for(data, SPECS[0], SPECS[2], SPECS[1])
    assert np.array_equal(first, decode_image(data, SPECS[0]))
    assert np.array_equal(second, decode_image(data, SPECS[2]))
    assert np.array_equal(third, decode_image(data, SPECS[1]))
    assert not np.array_equal(first, second)  # bilinear and bicubic really differ
    same = decode_for(data, SPECS[0], SPECS[0])
    assert same[0] is same[1]  # equal specs share one array


def test_decode_for_keeps_the_primarys_draft_scale():
    """A shadow needing more pixels must not change the primary's input (draft is chosen for it alone)."""
    data = jpeg(2400, 1800, seed=3)
    small, large = SPECS[0], PreprocessSpec(resize=480, crop=448, interpolation="bilinear", max_pixels=50_000_000)
    primary, shadow = decode_for(data, small, large)
    np.testing.assert_array_equal(primary, decode_image(data, small))
    assert shadow.shape == (448, 448, 3)
    # 2400x1800 is drafted to 600x450 for the primary, so the shadow's 480 is an upscale of that,
    # not the 1200x900 draft decode_image picks for resize=480 alone.
    assert not np.array_equal(shadow, decode_image(data, large))
