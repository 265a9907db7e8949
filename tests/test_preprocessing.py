"""Tests for service.preprocessing: the one path from client bytes to a model tensor.

All inputs are real files written here (Pillow, or by hand for headers Pillow
will not write) or real photos from scikit-image.
"""

from __future__ import annotations

import resource
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from service.preprocessing import (
    SUPPORTED_FORMATS,
    DecodeLimits,
    ImageInputError,
    ImageTooLargeError,
    PreprocessSpec,
    UnsupportedFormatError,
    decode_for_spec,
    decode_image,
    detect_format,
    image_to_tensor,
    resize_and_crop,
    to_array,
)
from tests.support.budget import cpu_seconds
from tests.support.images import (
    asymmetric,
    bmp_bomb,
    encode,
    gif_bomb,
    icc_profile,
    jpeg_bomb,
    many_frame_gif,
    photo,
    png_bomb,
    png_bytes,
    png_chunk,
    progressive_scan_bomb,
    stored_for_orientation,
    tiff_bomb,
    tiff_many_strips,
    webp_bomb,
    with_orientation,
)
from tests.support.mutations import anatomy, mutated, real_seeds, sniff

# Mean 0 / std 1 so tensor values are pixel / 255 and easy to reason about.
RGB01 = PreprocessSpec(input_size=(32, 32), resize_size=36, mean=(0.0,) * 3, std=(1.0,) * 3)
GREY01 = PreprocessSpec(
    input_size=(32, 32), resize_size=36, mean=(0.0,), std=(1.0,), color_mode="L"
)
IMAGENET = PreprocessSpec(
    input_size=(224, 224),
    resize_size=256,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
GREEN = (0, 255, 0)


def pixels(data: bytes, **kwargs: object) -> np.ndarray:
    """Decoded pixels as a signed int array, for differences."""
    return np.asarray(decode_image(data, **kwargs), dtype=np.int32)  # type: ignore[arg-type]


def assert_contract(out: np.ndarray, spec: PreprocessSpec) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == (spec.channels, *spec.input_size)
    assert np.isfinite(out).all()


# --------------------------------------------------------------------------- formats


FORMAT_CASES = [
    ("JPEG", {"quality": 95}, 0.03),
    ("JPEG", {"quality": 90, "progressive": True}, 0.03),
    ("PNG", {}, 0.0),
    ("WEBP", {"quality": 90}, 0.03),
    ("WEBP", {"lossless": True}, 0.0),
    ("GIF", {}, 0.05),
    ("BMP", {}, 0.0),
    ("TIFF", {}, 0.0),
    ("TIFF", {"compression": "tiff_deflate"}, 0.0),
    ("AVIF", {"quality": 90}, 0.03),  # Pillow's own encoder (libavif)
    ("HEIF", {"quality": 90}, 0.03),  # pillow-heif's (libheif, x265)
]


@pytest.mark.parametrize(("fmt", "kwargs", "tol"), FORMAT_CASES, ids=lambda v: str(v))
def test_each_format_gives_the_right_tensor(fmt: str, kwargs: dict, tol: float) -> None:
    img = photo((240, 160))
    spec = IMAGENET.model_copy(update={"mean": (0.0,) * 3, "std": (1.0,) * 3})
    data = encode(img, fmt, **kwargs)
    assert detect_format(data) == fmt
    out = image_to_tensor(data, spec)
    assert_contract(out, spec)
    expected = to_array(resize_and_crop(img, spec), spec)
    assert float(np.abs(out - expected).mean()) <= tol + 1e-7


def test_imagenet_normalisation_and_grey_output() -> None:
    data = encode(Image.new("RGB", (64, 64), (255, 0, 0)), "PNG")
    out = image_to_tensor(data, IMAGENET)
    assert_contract(out, IMAGENET)
    expected = (np.array([1.0, 0.0, 0.0]) - IMAGENET.mean) / np.array(IMAGENET.std)
    np.testing.assert_allclose(out[:, 100, 100], expected, rtol=1e-5)
    grey = image_to_tensor(data, GREY01)
    assert grey.shape == (1, 32, 32)
    assert abs(float(grey.mean()) * 255 - 76) <= 1  # ITU-R 601 luma of pure red


def test_non_square_input_size() -> None:
    spec = RGB01.model_copy(update={"input_size": (24, 40), "resize_size": 30})
    out = image_to_tensor(encode(photo((90, 60)), "PNG"), spec)
    assert_contract(out, spec)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, world\n",
        b"<!DOCTYPE html><html><body>not an image</body></html>",
        b'{"image": "base64..."}',
        np.random.default_rng(0).bytes(4096),
        b"%PDF-1.7\n" + b"\0" * 100,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # Pillow would run Ghostscript
    ],
    ids=["empty", "text", "html", "json", "random", "pdf", "svg", "eps"],
)
def test_unsupported_bytes_are_415(data: bytes) -> None:
    with pytest.raises(UnsupportedFormatError) as err:
        image_to_tensor(data, RGB01)
    assert err.value.status_code == 415
    assert err.value.kind == "unsupported_format"
    for fmt in SUPPORTED_FORMATS:
        assert fmt in str(err.value)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "JPEG2000", "PCX"])
def test_formats_pillow_knows_but_we_do_not_accept_are_415(fmt: str) -> None:
    data = encode(photo((32, 32)), fmt)
    with pytest.raises(UnsupportedFormatError):
        decode_image(data)


@pytest.mark.parametrize(
    "prefix",
    [
        b"\xff\xd8\xff\xe0",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\x00\x01\x00\x00WEBPVP8 ",
        b"BM",
        b"II*\x00",
        b"MM\x00*",
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow: "Corrupt EXIF data" on TIFF garbage
def test_right_magic_but_garbage_is_400_not_415(prefix: bytes) -> None:
    data = prefix + np.random.default_rng(1).bytes(512)
    with pytest.raises(ImageInputError) as err:
        image_to_tensor(data, RGB01)
    assert type(err.value) in (ImageInputError, ImageTooLargeError)


def test_error_classes() -> None:
    assert issubclass(UnsupportedFormatError, ImageInputError)
    assert issubclass(ImageTooLargeError, ImageInputError)
    assert issubclass(ImageInputError, ValueError)
    assert (ImageInputError.status_code, UnsupportedFormatError.status_code) == (400, 415)
    assert ImageTooLargeError.status_code == 413
    assert len({ImageInputError.kind, UnsupportedFormatError.kind, ImageTooLargeError.kind}) == 3


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "AVIF", "HEIF"])  # AVIF/HEIF: irot/imir boxes
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_decodes_upright(fmt: str, orientation: int) -> None:
    upright = asymmetric()
    stored = stored_for_orientation(upright, orientation)
    if orientation != 1:  # the test image must really change under every transform
        assert stored.shape != upright.shape or np.abs(stored.astype(int) - upright).mean() > 20
    got = pixels(with_orientation(upright, orientation, fmt))
    assert got.shape == upright.shape
    tol = {"JPEG": 2.0, "HEIF": 2.0, "AVIF": 5.0}.get(fmt, 0.0)  # lossy at default quality; wrong turns are > 20
    assert float(np.abs(got - upright).mean()) <= tol


# --------------------------------------------------------------------------- modes


def test_grey_image_gives_equal_channels() -> None:
    grey = photo((64, 48)).convert("L")
    got = pixels(encode(grey, "PNG"))
    assert got.shape == (48, 64, 3)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.asarray(grey))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize(
    ("alpha", "expected"), [(0, GREEN), (255, (255, 0, 0)), (128, (128, 127, 0))]
)
def test_rgba_composites_on_background(fmt: str, alpha: int, expected: tuple) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(Image.new("RGBA", (16, 16), (255, 0, 0, alpha)), fmt, **kwargs)
    got = pixels(data, background=GREEN)
    assert np.abs(got - np.array(expected)).max() <= 1


def test_spec_background_reaches_the_tensor() -> None:
    data = encode(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG")
    spec = RGB01.model_copy(update={"background": (0, 0, 255)})
    out = image_to_tensor(data, spec)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), [0.0, 0.0, 1.0])


def test_la_composites_on_background() -> None:
    la = Image.merge("LA", (Image.new("L", (16, 16), 200), Image.new("L", (16, 16), 0)))
    la.paste((200, 255), (0, 0, 8, 16))  # left half opaque grey
    got = pixels(encode(la, "PNG"), background=GREEN)
    assert (got[:, :8] == 200).all()
    assert (got[:, 8:] == GREEN).all()


def _palette_image() -> Image.Image:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (8, 0, 16, 16))  # right half blue, left half index 0 (red)
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF"])
def test_palette_without_transparency(fmt: str) -> None:
    got = pixels(encode(_palette_image(), fmt), background=GREEN)
    assert (got[:, :8] == (255, 0, 0)).all()
    assert (got[:, 8:] == (0, 0, 255)).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_palette_with_transparency(fmt: str) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    img = _palette_image()
    img.info["transparency"] = 0  # WebP's encoder only looks here, not at a save argument
    got = pixels(encode(img, fmt, **kwargs), background=GREEN)
    assert (got[:, :8] == GREEN).all()  # index 0 was transparent red
    assert (got[:, 8:] == (0, 0, 255)).all()


def test_palette_with_partial_alpha_png() -> None:
    img = _palette_image()
    data = encode(img, "PNG", transparency=bytes([128, 255]))  # tRNS: index 0 half transparent
    got = pixels(data, background=GREEN)
    assert np.abs(got[0, 0] - (128, 127, 0)).max() <= 1


def test_grey_png_with_colour_key() -> None:
    img = Image.new("L", (16, 16), 0)
    img.paste(180, (8, 0, 16, 16))
    got = pixels(encode(img, "PNG", transparency=0), background=GREEN)
    assert (got[:, :8] == GREEN).all()
    assert (got[:, 8:] == 180).all()


def test_cmyk_jpeg_decodes_to_its_colour() -> None:
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data  # Pillow writes Adobe-inverted CMYK and reads it back inverted
    got = pixels(data)
    assert np.abs(got - (255, 0, 0)).max() <= 6


def test_cmyk_jpeg_without_adobe_marker_is_plain_cmyk() -> None:
    # Pillow stores CMYK (255, 255, 0, 255) inverted as (0, 0, 255, 0). Without the
    # Adobe marker those bytes must be read as plain CMYK: pure yellow ink.
    data = encode(Image.new("CMYK", (32, 32), (255, 255, 0, 255)), "JPEG", quality=95)
    assert np.abs(pixels(data)).max() <= 6  # with the marker: black
    start = data.index(b"Adobe") - 4  # the APP14 marker and its length come first
    assert data[start : start + 2] == b"\xff\xee"
    length = struct.unpack(">H", data[start + 2 : start + 4])[0]
    stripped = data[:start] + data[start + 2 + length :]
    assert b"Adobe" not in stripped
    assert np.abs(pixels(stripped) - (255, 255, 0)).max() <= 6


def test_cmyk_tiff() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF")
    assert (pixels(data) == (255, 0, 0)).all()


def _gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))


def _assert_grey_gradient(got: np.ndarray) -> None:
    row = got[0] if got.ndim == 2 else got[0, :, 0]
    assert row[0] <= 1 and row[-1] >= 254
    assert abs(int(row[128]) - 128) <= 2  # not clipped to white
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 200  # the gradient survives


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_keeps_its_gradient(fmt: str) -> None:
    img = Image.fromarray(_gradient16())
    assert img.mode == "I;16"
    data = encode(img, fmt)
    _assert_grey_gradient(pixels(data, color_mode="L"))
    rgb = pixels(data)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_16bit_big_endian_png_by_hand() -> None:
    data = png_bytes(256, 8, bit_depth=16, color_type=0, rows=_gradient16().astype(">u2").tobytes())
    _assert_grey_gradient(pixels(data, color_mode="L"))


def test_32bit_int_tiff_with_16bit_values() -> None:
    data = encode(Image.fromarray(_gradient16().astype(np.int32)), "TIFF")
    _assert_grey_gradient(pixels(data, color_mode="L"))


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (-5.0, 7.5)])
def test_float_tiff(lo: float, hi: float) -> None:
    arr = np.tile(np.linspace(lo, hi, 256, dtype=np.float32), (8, 1))
    _assert_grey_gradient(pixels(encode(Image.fromarray(arr), "TIFF"), color_mode="L"))


def test_16bit_rgb_png_by_hand() -> None:
    rgb16 = np.zeros((8, 8, 3), ">u2")
    rgb16[..., 0], rgb16[..., 1] = 65535, 32896  # red full, green half
    data = png_bytes(8, 8, bit_depth=16, color_type=2, rows=rgb16.tobytes())
    got = pixels(data)
    assert np.abs(got - (255, 128, 0)).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_1bit_image(fmt: str) -> None:
    checker = (np.indices((16, 16)).sum(axis=0) // 4 % 2).astype(bool)
    img = Image.fromarray(checker)
    assert img.mode == "1"
    got = pixels(encode(img, fmt), color_mode="L")
    np.testing.assert_array_equal(got, checker * 255)


def test_lab_tiff_is_converted_colorimetrically() -> None:
    data = encode(Image.new("LAB", (16, 16), (128, 128, 128)), "TIFF")  # L=50%, neutral
    got = pixels(data)
    assert np.ptp(got[0, 0]) <= 2 and 110 <= got[0, 0, 0] <= 130


# --------------------------------------------------------------------------- ICC profiles


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP"])
def test_icc_profile_is_converted_to_srgb(fmt: str) -> None:
    img = Image.new("RGB", (16, 16), (128, 128, 128))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    got = pixels(encode(img, fmt, icc_profile=icc_profile(1.0), **kwargs))
    assert np.abs(got - 188).max() <= 3  # linear-light 0.5 is sRGB 188
    assert np.abs(pixels(encode(img, fmt, **kwargs)) - 128).max() <= 3


def test_grey_icc_profile() -> None:
    img = Image.new("L", (16, 16), 128)
    got = pixels(encode(img, "PNG", icc_profile=icc_profile(1.0, gray=True)), color_mode="L")
    assert np.abs(got - 188).max() <= 2


def test_icc_profile_keeps_alpha() -> None:
    img = Image.new("RGBA", (16, 16), (128, 128, 128, 255))
    img.paste((128, 128, 128, 0), (0, 0, 8, 16))
    got = pixels(encode(img, "PNG", icc_profile=icc_profile(1.0)), background=GREEN)
    assert (got[:, :8] == GREEN).all()
    assert np.abs(got[:, 8:] - 188).max() <= 3


@pytest.mark.parametrize(
    ("mode", "profile"),
    [
        ("RGB", b"this is not an ICC profile" * 8),
        ("RGB", icc_profile(1.0)[:200]),  # cut short
        ("L", icc_profile(1.0)),  # an RGB profile on a grey image
    ],
    ids=["garbage", "truncated", "mismatched"],
)
def test_broken_icc_profile_is_ignored(
    mode: str, profile: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    img = Image.new(mode, (16, 16), 128 if mode == "L" else (128, 128, 128))
    with caplog.at_level("DEBUG", logger="service.preprocessing"):
        got = pixels(encode(img, "PNG", icc_profile=profile))
    assert (got == 128).all()
    assert "ICC profile ignored" in caplog.text


def test_srgb_profile_changes_nothing() -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = photo((64, 48))
    got = pixels(encode(img, "PNG", icc_profile=srgb))
    np.testing.assert_array_equal(got, np.asarray(img))


# --------------------------------------------------------------------------- limits


BOMBS = {
    "png": lambda: png_bomb(100_000, 100_000),
    "png-between-limits": lambda: png_bomb(10_000, 10_000),  # 100 MP: Pillow would only warn
    "png-over-ours": lambda: png_bomb(8_000, 8_000),  # 64 MP: under Pillow's limit, over ours
    "gif": lambda: gif_bomb(65_535, 65_535),
    "gif-frame": lambda: gif_bomb(65_535, 65_535, in_frame=True),
    "tiff": lambda: tiff_bomb(100_000, 100_000),
    "tiff-width-out-of-line": lambda: tiff_bomb(3_000_000, 40, width_out_of_line=True),
    "jpeg": lambda: jpeg_bomb(65_500, 65_500),
    "bmp": lambda: bmp_bomb(100_000, 100_000),
    "bmp-negative-width": lambda: bmp_bomb(-33_000, 30),
    "webp": lambda: webp_bomb(16_383, 16_383),
}


@pytest.mark.parametrize("name", BOMBS)
def test_pixel_bombs_are_refused_quickly_with_413(name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < 1024
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cpu_seconds() as cpu, pytest.raises(ImageTooLargeError) as err:
            image_to_tensor(data, IMAGENET)
    assert cpu.seconds < 0.25  # refused from the header: no pixel is decoded
    assert err.value.status_code == 413
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_limit_caps_ours_and_its_warning_never_escapes() -> None:
    # Even with our limit raised far above Pillow's, a 100 MP header is refused by us,
    # so Pillow's DecompressionBombWarning (or Error) never reaches the caller.
    limits = DecodeLimits(max_pixels=10**12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (png_bomb(10_000, 10_000), png_bomb(20_000, 20_000)):
            with pytest.raises(ImageTooLargeError):
                decode_image(data, limits=limits)


def test_pillow_global_state_is_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for data in (png_bomb(100_000, 100_000), encode(photo((64, 48)), "JPEG")[:-100]):
        with pytest.raises(ImageInputError):
            decode_image(data)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


@pytest.mark.parametrize("size", [(1, 1), (20_000, 1), (1, 20_000), (7, 100)])
def test_too_small_side_is_refused(size: tuple[int, int]) -> None:
    w, h = size
    data = png_bytes(w, h, rows=bytes(w * h))
    with pytest.raises(ImageInputError) as err:
        image_to_tensor(data, RGB01)
    assert type(err.value) is ImageInputError
    assert err.value.status_code == 400


def test_min_side_is_inclusive_and_configurable() -> None:
    data = png_bytes(8, 8, rows=bytes(64))
    assert_contract(image_to_tensor(data, RGB01), RGB01)
    with pytest.raises(ImageInputError):
        image_to_tensor(data, RGB01, DecodeLimits(min_side=9))


def test_oversize_bytes_are_413() -> None:
    data = encode(photo((64, 48)), "PNG")
    with pytest.raises(ImageTooLargeError) as err:
        image_to_tensor(data, RGB01, DecodeLimits(max_bytes=len(data) - 1))
    assert err.value.status_code == 413
    assert_contract(image_to_tensor(data, RGB01, DecodeLimits(max_bytes=len(data))), RGB01)
    huge = b"\xff\xd8\xff" + bytes(DecodeLimits().max_bytes)
    with cpu_seconds() as cpu, pytest.raises(ImageTooLargeError):
        image_to_tensor(huge, RGB01)
    assert cpu.seconds < 0.25


TRUNCATIONS = [
    ("JPEG", {}),
    ("JPEG", {"progressive": True}),
    ("PNG", {}),
    ("WEBP", {}),
    ("GIF", {}),
    ("TIFF", {}),
    ("BMP", {}),
    ("AVIF", {}),
    ("HEIF", {}),
]


@pytest.mark.parametrize(("fmt", "kwargs"), TRUNCATIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_truncated_files_are_refused(fmt: str, kwargs: dict, keep: float) -> None:
    data = encode(photo((120, 80)), fmt, **kwargs)
    with pytest.raises(ImageInputError) as err:
        image_to_tensor(data[: int(len(data) * keep)], RGB01)
    assert err.value.status_code == 400


@pytest.mark.parametrize("cut", [1, 2, 16])
def test_jpeg_missing_its_last_bytes_is_refused(cut: int) -> None:
    data = encode(photo((120, 80)), "JPEG")
    with pytest.raises(ImageInputError):
        image_to_tensor(data[:-cut], RGB01)


def test_many_frames_only_the_first_is_decoded_quickly() -> None:
    data, first = many_frame_gif(5000)
    with cpu_seconds() as cpu:
        got = pixels(data)
    assert cpu.seconds < 0.25
    assert (got == first).all()


def test_animated_webp_and_apng_use_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)] * 20]
    for fmt, kwargs in (("WEBP", {"lossless": True}), ("PNG", {})):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
        assert (pixels(data) == (255, 0, 0)).all()


def test_multipage_tiff_uses_the_first_page() -> None:
    pages = [Image.new("L", (16, 16), v) for v in (10, 200, 90)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert (pixels(data, color_mode="L") == 10).all()


STRUCTURE_ABUSE = {
    # Each costs Pillow's pure-Python header parsers between 0.5 and 5 seconds.
    "jpeg-junk": lambda: b"\xff\xd8\xff\xe0\x00\x04\x00\x00" + b"\x12" * 10_000_000,
    "jpeg-fill": lambda: b"\xff\xd8" + b"\xff" * 10_000_000,
    "jpeg-segments": lambda: b"\xff\xd8" + b"\xff\xe1\x00\x02" * 2_500_000,
    "png-chunks": lambda: png_bytes(
        16, 16, rows=bytes(256), extra=(png_chunk(b"teXt", b"") * 800_000,)
    ),
    "gif-junk": lambda: gif_bomb(16, 16)[: 13 + 6] + b"\x12" * 10_000_000,
    "gif-subblocks": lambda: gif_bomb(16, 16)[: 13 + 6] + b"\x21\xfe" + b"\x01x" * 5_000_000,
    "tiff-tags": lambda: b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 60_000) + bytes(720_000),
    "tiff-strips": lambda: tiff_many_strips(100_000),
    "jpeg-scans": lambda: progressive_scan_bomb(200),
}


@pytest.mark.parametrize("name", STRUCTURE_ABUSE)
def test_pathological_headers_are_refused_quickly(name: str) -> None:
    data = STRUCTURE_ABUSE[name]()
    with cpu_seconds() as cpu, pytest.raises(ImageInputError, match="malformed"):
        image_to_tensor(data, RGB01)
    assert cpu.seconds < 0.2


def test_structure_budgets_leave_ordinary_files_alone() -> None:
    assert_contract(image_to_tensor(tiff_many_strips(4000), GREY01), GREY01)
    assert_contract(image_to_tensor(progressive_scan_bomb(20), RGB01), RGB01)
    motion_photo = encode(photo((64, 48)), "JPEG") + b"\xff\xda" * 1000  # trailing data
    assert_contract(image_to_tensor(motion_photo, RGB01), RGB01)


def test_large_rle_bmp_is_refused() -> None:
    header = struct.pack("<IiiHHIIiiII", 40, 4000, 4000, 1, 8, 1, 0, 0, 0, 256, 0)
    rle = b"\x01\x07" * 2_500_000
    data = b"BM" + struct.pack("<IHHI", 54 + 1024 + len(rle), 0, 0, 54 + 1024)
    data += header + bytes(1024) + rle
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


# --------------------------------------------------------------------------- draft and resize


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(photo((3200, 2128), which="coffee"), "JPEG", quality=90)


def test_draft_decode_is_close_to_full_decode(large_jpeg: bytes) -> None:
    spec = IMAGENET.model_copy(update={"mean": (0.0,) * 3, "std": (1.0,) * 3})
    reduced = decode_for_spec(large_jpeg, spec)
    assert 2 * 256 <= min(reduced.size) < 2128  # libjpeg scaled it down, not below 2x resize
    fast = image_to_tensor(large_jpeg, spec)
    full = image_to_tensor(large_jpeg, spec.model_copy(update={"draft": False}))
    assert_contract(fast, spec)
    assert float(np.abs(fast - full).mean()) < 0.01


def test_decode_image_keeps_twice_min_short_side(large_jpeg: bytes) -> None:
    img = decode_image(large_jpeg, min_short_side=150)
    assert 300 <= min(img.size) < 600
    assert decode_image(large_jpeg).size == (3200, 2128)


def test_draft_respects_exif_rotation() -> None:
    stored = stored_for_orientation(np.asarray(photo((1600, 1000))), 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes())
    img = decode_image(data, min_short_side=100)
    assert img.size == (400, 250)  # stored 1000x1600, decoded at 1/4, turned upright
    upright = np.asarray(photo((400, 250)), dtype=int)
    assert float(np.abs(np.asarray(img, dtype=int) - upright).mean()) < 8


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos", "hamming"])
@pytest.mark.parametrize("resize_size", [224, 256, 300])
def test_resize_and_crop_matches_resize_then_crop(interpolation: str, resize_size: int) -> None:
    img = photo()  # 451 x 300
    spec = IMAGENET.model_copy(update={"interpolation": interpolation, "resize_size": resize_size})
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    left, top = round((new_w - 224) / 2.0), round((new_h - 224) / 2.0)
    resample = getattr(Image.Resampling, interpolation.upper())
    reference = img.resize((new_w, new_h), resample).crop((left, top, left + 224, top + 224))
    got = np.asarray(resize_and_crop(img, spec), dtype=int)
    assert np.abs(got - np.asarray(reference, dtype=int)).max() <= 1


def test_resize_and_crop_of_a_thin_strip_is_cheap() -> None:
    strip = Image.new("L", (8, 4_000_000), 77)  # resizing all of it would be 256 x 128M pixels
    with cpu_seconds() as cpu:
        out = resize_and_crop(strip, GREY01)
    assert cpu.seconds < 1.0
    assert out.size == (32, 32) and (np.asarray(out) == 77).all()


# --------------------------------------------------------------------------- API contract


def test_decode_image_returns_a_loaded_image_in_the_mode() -> None:
    data = encode(photo((64, 48)), "JPEG")
    for raw in (data, bytearray(data), memoryview(data)):
        img = decode_image(raw, "L")
        assert img.mode == "L" and img.size == (64, 48)
        assert img.im is not None  # loaded: no lazy decode left
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_to_array_refuses_a_mode_that_does_not_fit_the_spec() -> None:
    with pytest.raises(ValueError, match="to_array needs"):
        to_array(Image.new("RGBA", (32, 32)), RGB01)


@pytest.mark.parametrize(
    "update",
    [
        {"mean": (float("nan"), 0.0, 0.0)},
        {"std": (float("inf"), 1.0, 1.0)},
        {"std": (0.0, 1.0, 1.0)},
        {"background": (0, 0, 256)},
    ],
)
def test_spec_refuses_values_that_would_break_the_tensor(update: dict) -> None:
    with pytest.raises(ValueError):
        PreprocessSpec(**{**RGB01.model_dump(), **update})


def test_draft_short_side() -> None:
    assert IMAGENET.draft_short_side == 256
    assert IMAGENET.model_copy(update={"draft": False}).draft_short_side is None
    wide = IMAGENET.model_copy(update={"input_size": (224, 320)})
    assert wide.draft_short_side == 320


def test_concurrent_calls_match_sequential_ones() -> None:
    inputs = [
        encode(photo((200, 150)), "JPEG"),
        encode(photo((150, 200), which="coffee"), "PNG"),
        encode(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "WEBP", lossless=True),
        encode(Image.fromarray(_gradient16()), "TIFF"),
        encode(photo((90, 60)).convert("P"), "GIF"),
        with_orientation(asymmetric(), 6, "JPEG"),
        encode(photo((200, 150)), "HEIF"),
        with_orientation(asymmetric(), 5, "AVIF"),
    ] * 4
    expected = [image_to_tensor(d, IMAGENET) for d in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda d: image_to_tensor(d, IMAGENET), inputs))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- fuzzing


def _seed_files() -> list[bytes]:
    small = photo((40, 30))
    rgba = small.convert("RGBA")
    rgba.putalpha(180)
    return [
        encode(small, "JPEG", quality=80),
        encode(small, "JPEG", progressive=True),
        with_orientation(asymmetric(24, 16), 6, "JPEG"),
        encode(small, "PNG"),
        encode(rgba, "PNG", icc_profile=icc_profile(1.0)),
        encode(Image.fromarray(_gradient16()[:, ::8]), "PNG"),
        encode(small, "WEBP", quality=70),
        encode(rgba, "WEBP", lossless=True),
        encode(small.convert("P"), "GIF", transparency=3),
        encode(small, "TIFF"),
        encode(small, "TIFF", compression="tiff_deflate"),
        encode(small, "BMP"),
        encode(small, "AVIF", quality=70),
        encode(rgba, "AVIF"),
        encode(small, "HEIF", quality=70),
        with_orientation(asymmetric(24, 16), 6, "HEIF"),
    ]


SEEDS = _seed_files()
MAGIC_VALUES = [b"\x00\x00", b"\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", bytes(4)]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real image file with a few bit flips, cuts, splices and overwrites."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        n = len(data)
        # Half the edits land in the headers, mostly past the magic numbers.
        header = st.integers(min(12, n - 1), min(n, 96) - 1)
        pos = draw(st.one_of(header, st.integers(0, n - 1)))
        op = draw(st.sampled_from(["flip", "cut", "splice", "overwrite", "magic", "delete", "dup"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "splice":
            donor = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(donor) - 1))
            data[pos:pos] = donor[start : start + draw(st.integers(1, 512))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif op == "magic":
            chunk = draw(st.sampled_from(MAGIC_VALUES))
            data[pos : pos + len(chunk)] = chunk
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            length = draw(st.integers(1, 256))
            data[pos:pos] = data[pos : pos + length]
    return bytes(data)


# Smaller pixel limit than production so that a mutated header claiming tens of
# megapixels costs milliseconds; the contract is the same for any limits.
FUZZ_LIMITS = DecodeLimits(max_pixels=2_000_000)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore")  # Pillow reports damaged metadata through warnings
@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,  # hypothesis measures wall-clock time; the bound below is on CPU time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=mutated_images(), grey=st.booleans())
def test_fuzzed_files_return_a_tensor_or_an_image_input_error(data: bytes, grey: bool) -> None:
    spec = GREY01 if grey else RGB01
    with cpu_seconds() as cpu:
        try:
            out = image_to_tensor(data, spec, FUZZ_LIMITS)
        except ImageInputError as exc:
            out = exc
    assert cpu.seconds < 2.0, f"{cpu.seconds:.2f} s of CPU for {len(data)} bytes starting {data[:24]!r}"
    if isinstance(out, ImageInputError):
        assert 400 <= out.status_code < 500
        return
    assert_contract(out, spec)


def test_seed_files_all_decode() -> None:
    for data in SEEDS:
        assert_contract(image_to_tensor(data, RGB01), RGB01)


# --------------------------------------------------------------------------- structure-aware fuzzing

STRUCTURED_SEEDS = real_seeds()
STRUCTURED_CASES = 5000  # about 10 s on the 2-core machine
CASE_SECONDS = 2.0  # of CPU time per case


@contextmanager
def address_space_limit(headroom: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``headroom`` bytes (Linux only).

    Pillow allocates pixels with malloc, which tracemalloc does not see; under
    RLIMIT_AS an allocation that the decode limits failed to bound raises
    MemoryError instead of quietly succeeding on a big machine.
    """
    status = Path("/proc/self/status")
    if not sys.platform.startswith("linux") or not status.exists():
        yield
        return
    vm_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_kib * 1024 + headroom
    resource.setrlimit(resource.RLIMIT_AS, (min(limit, hard) if hard != resource.RLIM_INFINITY else limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_seed_corpus_covers_every_format_and_is_read_structurally() -> None:
    formats = Counter(sniff(data) for data in STRUCTURED_SEEDS.values())
    assert set(formats) == set(SUPPORTED_FORMATS)
    for name, data in STRUCTURED_SEEDS.items():
        body = anatomy(data)
        assert body.fields and body.chunks, name  # the mutator sees the file's structure
        assert_contract(image_to_tensor(data, RGB01), RGB01)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore")  # Pillow reports damaged metadata through warnings
@pytest.mark.slow
def test_structured_fuzz_returns_a_tensor_or_an_image_input_error_in_bounded_time_and_memory() -> None:
    """Thousands of real photos with damaged headers, chunks and fields: the contract of image_to_tensor.

    Each case: a finite float32 tensor of the spec's shape or an ImageInputError with a 4xx status,
    never another exception, under CASE_SECONDS of CPU, within 1 GiB more address space than before.
    """
    outcomes: Counter[str] = Counter()
    slowest = (0.0, b"")

    @settings(max_examples=STRUCTURED_CASES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=mutated(list(STRUCTURED_SEEDS.values())), grey=st.booleans())
    def case(data: bytes, grey: bool) -> None:
        nonlocal slowest
        spec = GREY01 if grey else RGB01
        with cpu_seconds() as cpu:
            try:
                out: np.ndarray | ImageInputError = image_to_tensor(data, spec, FUZZ_LIMITS)
            except ImageInputError as exc:
                out = exc
        if isinstance(out, ImageInputError):
            assert 400 <= out.status_code < 500 and str(out)
            outcomes[out.kind] += 1
        else:
            assert_contract(out, spec)
            outcomes["tensor"] += 1
        assert cpu.seconds < CASE_SECONDS, f"{cpu.seconds:.2f} s of CPU for {len(data)} bytes starting {data[:24]!r}"
        slowest = max(slowest, (cpu.seconds, data[:24]))

    with address_space_limit(1 << 30):
        case()
    # Not degenerate: many mutants still decode (damage reached the pixels) and many are refused.
    total = sum(outcomes.values())
    assert total >= STRUCTURED_CASES * 0.9, outcomes
    assert outcomes["tensor"] > total * 0.1 and outcomes["invalid_image"] > total * 0.1, outcomes
    print(f"outcomes: {dict(outcomes)}; slowest case {slowest[0] * 1000:.0f} ms of CPU")
