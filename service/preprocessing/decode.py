"""Decoding: Pillow limited to the sniffed format's plugin, EXIF orientation, modes, ICC, alpha, JPEG draft.

Every failure inside Pillow becomes an :class:`ImageInputError` (a 4xx), never a 500. Nothing here
touches Pillow's global settings or keeps mutable state, so it is safe to call from many threads.
AVIF is Pillow's own plugin (libavif, in Pillow's wheels); HEIF/HEIC is pillow-heif's (libheif),
registered once at import, which is the one change this module makes to Pillow's plugin registry.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator

import numpy as np
import pillow_heif
from PIL import (
    AvifImagePlugin,  # registers the plugin; its SUPPORTED says whether libavif is there
    BmpImagePlugin,  # noqa: F401 - imported to register the plugins we allow, and only those
    GifImagePlugin,  # noqa: F401
    Image,
    ImageChops,
    ImageCms,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from service.preprocessing.sniff import SUPPORTED_FORMATS, detect_format, probe_header
from service.preprocessing.spec import (
    ColorMode,
    DecodeLimits,
    ImageInputError,
    ImageTooLargeError,
    PreprocessSpec,
    UnsupportedFormatError,
)

logger = logging.getLogger(__name__)

# Registers the "HEIF" plugin (heic, heix, mif1, ... brands), with libheif's security limits on.
# Idempotent; pillow-heif's decode options stay at their defaults (transformations applied).
pillow_heif.register_heif_opener()
if not AvifImagePlugin.SUPPORTED:  # a Pillow built without libavif: AVIF files become 400s, say why
    logger.warning("this Pillow has no AVIF codec (PIL.features.check('avif') is false)")

# EXIF orientation -> the transpose that makes the stored pixels upright.
_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Embedded profiles that are sRGB already: converting them to sRGB is a no-op we skip.
_SRGB_DESCRIPTIONS = frozenset({"sRGB IEC61966-2.1", "sRGB IEC61966-2-1", "sRGB built-in", "sRGB"})


@contextlib.contextmanager
def _client_errors(what: str) -> Iterator[None]:
    """Turn whatever Pillow raises into an ImageInputError: bad bytes are a 4xx, not a 500.

    Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError,
    IndexError, ... on damaged files; the detail is logged, not sent to clients.
    """
    try:
        yield
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image is too large to decode: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLargeError("image is too large to decode in the available memory") from exc
    except Exception as exc:  # any decoder failure is the client's bad input
        logger.debug("%s failed", what, exc_info=True)
        raise ImageInputError(f"{what} failed: the image data is corrupt or truncated") from exc


def _effective_max_pixels(limits: DecodeLimits) -> int:
    pillow_max = Image.MAX_IMAGE_PIXELS
    return limits.max_pixels if pillow_max is None else min(limits.max_pixels, int(pillow_max))


def _check_size(width: int, height: int, limits: DecodeLimits, *, check_min: bool = True) -> None:
    max_pixels = _effective_max_pixels(limits)
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height}; the limit is {max_pixels} pixels")
    if check_min and min(width, height) < limits.min_side:
        raise ImageInputError(
            f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels"
        )


def _check_planes(pixels: int, limits: DecodeLimits) -> None:
    # HEIF/AVIF grid tiles pad the image (a 48 MP iPhone photo: 50.3 MP of tiles), and an alpha
    # plane is decoded beside it: twice the limit for one plane leaves room for that, not for bombs.
    if pixels > 2 * _effective_max_pixels(limits):
        raise ImageTooLargeError(f"decoding the image means a plane of {pixels} pixels (tiles or alpha); "
                                 f"the limit is {_effective_max_pixels(limits)} pixels")


def _apply_draft(img: Image.Image, min_short_side: int | None) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side stays >= 2 * min_short_side.

    Twice the target, so the exact resize that follows still downsamples and
    averages out the blockiness of DCT-domain scaling.
    """
    if not min_short_side or img.format not in ("JPEG", "MPO"):
        return
    w, h = img.size
    target = 2 * min_short_side
    if min(w, h) < 2 * target:
        return  # not even a 1/2 reduction would keep the target
    scale = target / min(w, h)
    requested = (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))
    img.draft(None, requested)  # Pillow picks the largest 1/k with both sides >= requested
    logger.debug("JPEG draft decode %dx%d -> %dx%d", w, h, *img.size)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF (or XMP) orientation; a broken EXIF block is ignored, not fatal."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # metadata is optional, the pixels are fine
        logger.debug("unreadable EXIF; orientation ignored", exc_info=True)
        return img
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit L by the data's range; Pillow's convert would clip to white.

    Unsigned 16-bit maps 0..65535 onto 0..255. 32-bit int and float have no
    fixed range, so: values already in 0..255 stay, int values in 0..65535 are
    treated as 16-bit, floats in 0..1 are scaled by 255, anything else is
    min-max stretched.
    """
    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)  # v * 255 / 65535, rounded; no ties exist
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    arr = np.asarray(img).astype(np.float32)
    arr[~np.isfinite(arr)] = 0.0
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr *= 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif img.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        arr /= 257.0
    elif hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    np.rint(arr, out=arr)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    return ImageCms.profileToProfile(
        img, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), outputMode="RGB"
    )


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Bring any Pillow mode to one of L, LA, RGB, RGBA, CMYK, keeping transparency."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        if mode in ("L", "RGB") and "transparency" in img.info:
            return img.convert("RGBA")  # a tRNS colour key
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        return img.convert("RGBA" if img.has_transparency_data else "RGB")
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_to_8bit(img)
    if mode == "LAB":
        return _lab_to_rgb(img)
    return img.convert("RGB")  # RGBX, YCbCr, HSV; raises for anything Pillow cannot convert


def _apply_icc(img: Image.Image, icc: bytes) -> Image.Image:
    """Convert from the embedded ICC profile to sRGB; a broken profile is ignored, not fatal.

    Alpha is split off and put back, so it never goes through the colour transform.
    """
    has_alpha = img.mode in ("LA", "RGBA")
    base_mode = img.mode[:-1] if has_alpha else img.mode
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if base_mode == "RGB" and ImageCms.getProfileDescription(src).strip() in _SRGB_DESCRIPTIONS:
            return img  # already sRGB: the transform would be an expensive no-op
        base = img.convert(base_mode) if has_alpha else img
        out = ImageCms.profileToProfile(base, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # damaged or mismatched profiles are common; the pixels are still usable
        logger.debug("ICC profile ignored (unreadable, or not for %s)", base_mode, exc_info=True)
        return img
    if out is None:  # only with inPlace=True; keeps type checkers honest
        return img
    if has_alpha:
        out.putalpha(img.getchannel("A"))
    return out


def _invert_non_adobe_cmyk(img: Image.Image) -> Image.Image:
    # Pillow always reads CMYK JPEGs as Adobe-inverted. That is right when the
    # Adobe APP14 marker is present (what Photoshop and libjpeg write); without
    # it the data is plain CMYK, so undo Pillow's inversion (libvips does the same).
    if img.mode == "CMYK" and img.format in ("JPEG", "MPO") and "adobe" not in img.info:
        return ImageChops.invert(img)
    return img


def _to_color_mode(
    img: Image.Image, color_mode: ColorMode, background: tuple[int, int, int]
) -> Image.Image:
    """CMYK fix-up, mode normalisation, ICC to sRGB, alpha over ``background``, ``color_mode``."""
    icc = img.info.get("icc_profile")
    img = _normalise_mode(_invert_non_adobe_cmyk(img))
    if icc:
        img = _apply_icc(img, icc)
    if img.mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(canvas, rgba)
    return img if img.mode == color_mode else img.convert(color_mode)


def decode_image(
    data: bytes,
    color_mode: ColorMode = "RGB",
    *,
    limits: DecodeLimits | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    min_short_side: int | None = None,
) -> Image.Image:
    """Decode bytes to a fully loaded, upright, sRGB image in ``color_mode``.

    ``min_short_side`` is the shorter side the caller will resize to: a JPEG
    may then be decoded at reduced scale (1/2, 1/4, 1/8) as long as its shorter
    side stays at least ``2 * min_short_side``, and the returned image is
    smaller than the file's dimensions. Only the first frame of animated or
    multi-page files is decoded. Raises :class:`ImageInputError` (or a
    subclass) for anything a client could have sent wrong.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"decode_image needs bytes, not {type(data).__name__}")
    limits = limits or DecodeLimits()
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = detect_format(data)
    if fmt is None:
        raise UnsupportedFormatError(
            "unsupported or unrecognised image format; supported formats: "
            + ", ".join(SUPPORTED_FORMATS)
        )
    claimed = probe_header(data, fmt)
    if claimed is not None:  # bombs are refused before Pillow sees them
        _check_size(claimed.width, claimed.height, limits, check_min=False)
        _check_planes(claimed.largest_plane, limits)
    with _client_errors(f"reading the {fmt} header"):
        img = Image.open(io.BytesIO(data), formats=[fmt])
        _check_size(*img.size, limits)
        _apply_draft(img, min_short_side)
    with _client_errors(f"decoding the {fmt} image"):
        img.load()  # raises on truncation unless someone set ImageFile.LOAD_TRUNCATED_IMAGES
    with _client_errors(f"converting the {fmt} image"):
        # HEIF: libheif has already applied the irot/imir boxes, and pillow-heif has set the EXIF
        # orientation to 1 (HEIF readers must ignore it), so nothing is left to do. AVIF: Pillow
        # leaves the pixels as stored and turns irot/imir into the EXIF orientation it reports.
        if fmt != "HEIF":
            img = _upright(img)
        img = _to_color_mode(img, color_mode, tuple(background))  # type: ignore[arg-type]
    return img


def decode_for_spec(
    data: bytes, spec: PreprocessSpec, limits: DecodeLimits | None = None
) -> Image.Image:
    """The decode step of :func:`image_to_tensor`, for callers that transform images themselves."""
    return decode_image(
        data,
        spec.color_mode,
        limits=limits,
        background=spec.background,
        min_short_side=spec.draft_short_side,
    )

