"""The one path from image bytes to a model's input tensor.

Training evaluation, export checks, batch jobs and the HTTP service all call
:func:`image_to_tensor`, so the accuracy reported at training time is the
accuracy users get. Nothing else in the project turns bytes into a tensor.

The bytes come from untrusted clients, so decoding is defensive: the format is
taken from the magic numbers (never a file name), Pillow may only use the
matching plugin, sizes are checked from the header before any pixel is decoded,
and every failure inside Pillow becomes an :class:`ImageInputError` (a 4xx),
never a 500. Nothing here touches Pillow's global settings
(``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) or keeps any
mutable state of its own, so the functions are safe to call from many threads.

Pillow still reports some oddities of damaged files through :mod:`warnings`
(for example TIFF's "Corrupt EXIF data"); silencing those would need
``warnings.catch_warnings``, which is not thread-safe, so it is left to the
application. Pillow's ``DecompressionBombWarning`` is not among them: images
that large are refused from their header before Pillow looks at them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import struct
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import (
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
from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
ColorMode = Literal["RGB", "L"]

_PIL_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

#: Formats we decode, by Pillow's plugin name. Anything else is a 415.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)

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


class PreprocessSpec(BaseModel):
    """How a model wants its pixels: travels with the weights, like timm's pretrained_cfg."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[int, int] = Field(description="(height, width) of the model input")
    resize_size: int = Field(gt=0, description="shorter side after resizing, before the centre crop")
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_mode: ColorMode = "RGB"
    background: tuple[int, int, int] = Field(
        default=(255, 255, 255), description="RGB colour that transparent pixels are composited on"
    )
    draft: bool = Field(
        default=True,
        description="decode large JPEGs at reduced scale (libjpeg draft) when the target allows",
    )

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "RGB" else 1

    @property
    def draft_short_side(self) -> int | None:
        """What to pass as ``decode_image(min_short_side=...)``; None when draft is off.

        The largest side the resize can produce: ``resize_size``, or a side of
        ``input_size`` if that is longer (the crop then stretches the image).
        """
        if not self.draft:
            return None
        return max(self.resize_size, *self.input_size)

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values for color_mode {self.color_mode}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std values must be finite")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if min(self.input_size) <= 0:
            raise ValueError("input_size must be positive")
        if self.resize_size < min(self.input_size):
            raise ValueError("resize_size must be at least the smaller side of input_size")
        if not all(0 <= c <= 255 for c in self.background):
            raise ValueError("background values must be in 0..255")
        return self


class DecodeLimits(BaseModel):
    """What an input may cost before we refuse it.

    ``max_pixels`` is capped by Pillow's own ``Image.MAX_IMAGE_PIXELS`` (read,
    never changed), so Pillow's bomb protection never fires before ours.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    min_side: int = Field(default=8, gt=0)


class ImageInputError(ValueError):
    """A client's image cannot be used; ``status_code`` says which 4xx it maps to."""

    status_code = 400
    kind = "invalid_image"


class UnsupportedFormatError(ImageInputError):
    status_code = 415
    kind = "unsupported_format"


class ImageTooLargeError(ImageInputError):
    status_code = 413
    kind = "image_too_large"


# --------------------------------------------------------------------------- format and header


def detect_format(data: bytes) -> str | None:
    """Pillow format name from the magic numbers, or None; file names and MIME types lie."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    return None


# Budgets for the header walk. Pillow parses headers in Python, byte by byte or
# chunk by chunk, so a 20 MB file of junk or of tiny chunks costs it seconds.
# Real files are far below these; beyond them the file is refused as malformed.
_MAX_HEADER_STEPS = 10_000  # JPEG segments, GIF blocks before the first frame
_MAX_HEADER_JUNK = 256 * 1024  # JPEG bytes between segments, GIF bytes between blocks
_MAX_PNG_CHUNKS = 100_000  # whole file: Pillow walks the chunks after the image data too
_MAX_TIFF_TAGS = 4096  # entries in the first IFD
_MAX_TIFF_STRIPS = 65_536  # Pillow handles uncompressed strips one by one in Python
_MAX_JPEG_SCANS = 100  # libjpeg re-walks the whole image per progressive scan; real files use ~10
_MAX_BMP_RLE_BYTES = 4 * 1024 * 1024  # Pillow decodes BMP RLE in pure Python

_NOT_FF = re.compile(rb"[^\xff]")
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _u16(data: bytes, pos: int, order: str) -> int:
    return struct.unpack_from(order + "H", data, pos)[0]


def _u32(data: bytes, pos: int, order: str) -> int:
    return struct.unpack_from(order + "I", data, pos)[0]


def _malformed(fmt: str, what: str) -> ImageInputError:
    return ImageInputError(f"malformed {fmt} file: {what}")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the marker segments up to the first scan; the largest frame header counts.
    # find() and a regex scan in C, so junk and 0xFF fill runs cost linear time.
    best: tuple[int, int] | None = None
    pos, junk, segments = 2, 0, 0
    while True:
        ff = data.find(b"\xff", pos)
        m = _NOT_FF.search(data, ff + 1) if ff >= 0 else None  # the marker ends a 0xFF run
        # Pillow steps through junk and fill bytes one by one, up to the end if need be.
        junk += (m.start() - 1 if m is not None else len(data)) - pos
        if junk > _MAX_HEADER_JUNK:
            raise _malformed("JPEG", "too much junk between segments")
        if m is None:
            break
        marker, pos = data[m.start()], m.start() + 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue  # no length field
        if marker == 0xDA:  # start of the first scan: the header is over
            _check_jpeg_scans(data, pos)
            break
        if marker == 0xD9:
            break
        segments += 1
        if segments > _MAX_HEADER_STEPS:
            raise _malformed("JPEG", "too many segments")
        if marker in _JPEG_SOF:
            h, w = _u16(data, pos + 3, ">"), _u16(data, pos + 5, ">")
            if best is None or w * h > best[0] * best[1]:
                best = (w, h)
        pos += _u16(data, pos, ">")
    return best


def _check_jpeg_scans(data: bytes, first_scan: int) -> None:
    # Entropy-coded data never holds FF DA or FF D9, so between the first scan and
    # the end-of-image marker every FF DA starts a scan. Data after EOI (a motion
    # photo's video, say) is not counted.
    end = data.find(b"\xff\xd9", first_scan)
    scans = 1 + data.count(b"\xff\xda", first_scan, len(data) if end < 0 else end)
    if scans > _MAX_JPEG_SCANS:
        raise _malformed("JPEG", f"{scans} scans")


def _png_size(data: bytes) -> tuple[int, int] | None:
    size = (_u32(data, 16, ">"), _u32(data, 20, ">")) if data[12:16] == b"IHDR" else None
    pos, n = 8, len(data)
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 8 > n or data[pos + 4 : pos + 8] == b"IEND":
            return size
        pos += 12 + _u32(data, pos, ">")
    raise _malformed("PNG", "too many chunks")


def _gif_size(data: bytes) -> tuple[int, int]:
    # Pillow grows the canvas to cover the first frame, so read that frame's extent too.
    w, h = _u16(data, 6, "<"), _u16(data, 8, "<")
    flags = data[10]
    pos = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    n, steps, junk = len(data), 0, 0
    while pos < n:
        block = data[pos]
        if block == 0x21:  # extension: label, then data sub-blocks
            pos += 2
            while pos < n and data[pos]:
                pos += data[pos] + 1
                steps += 1
                if steps > _MAX_HEADER_STEPS:
                    raise _malformed("GIF", "too many blocks before the first frame")
            pos += 1
        elif block == 0x2C:  # image descriptor of the first frame
            x0, y0, fw, fh = struct.unpack_from("<4H", data, pos + 1)
            return max(w, x0 + fw), max(h, y0 + fh)
        elif block == 0x3B:
            break
        else:  # Pillow skips unknown bytes one at a time
            junk += 1
            if junk > _MAX_HEADER_JUNK:
                raise _malformed("GIF", "too much junk between blocks")
            pos += 1
    return w, h


_TIFF_INTS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF
        ifd = struct.unpack_from(order + "Q", data, 8)[0]
        count = struct.unpack_from(order + "Q", data, ifd)[0]
        entry0, entry_len, inline, pointer = ifd + 8, 20, 8, "Q"
    else:
        ifd = _u32(data, 4, order)
        count = _u16(data, ifd, order)
        entry0, entry_len, inline, pointer = ifd + 2, 12, 4, "I"
    if count > _MAX_TIFF_TAGS:
        raise _malformed("TIFF", f"{count} tags in the first directory")
    dims: dict[int, int] = {}
    for i in range(min(count, (len(data) - entry0) // entry_len)):
        pos = entry0 + i * entry_len
        tag, typ = _u16(data, pos, order), _u16(data, pos + 2, order)
        if tag not in (256, 257, 273, 324) or typ not in _TIFF_INTS:
            continue
        fmt = order + _TIFF_INTS[typ]
        n_values = struct.unpack_from(order + pointer, data, pos + 4)[0]
        if tag in (273, 324):  # strip or tile offsets
            if n_values > _MAX_TIFF_STRIPS:
                raise _malformed("TIFF", f"{n_values} strips or tiles")
            continue
        value_at = pos + 4 + inline
        if n_values * struct.calcsize(fmt) > inline:  # stored elsewhere; Pillow uses the first
            value_at = struct.unpack_from(order + pointer, data, value_at)[0]
        value = abs(struct.unpack_from(fmt, data, value_at)[0])
        dims[tag] = max(dims.get(tag, 0), value)  # duplicated tags: assume the worst
    if 256 in dims and 257 in dims:
        return dims[256], dims[257]
    return None


def _bmp_size(data: bytes) -> tuple[int, int]:
    if _u32(data, 14, "<") == 12:  # OS/2 BITMAPCOREHEADER
        return _u16(data, 18, "<"), _u16(data, 20, "<")
    # As Pillow reads them: width unsigned; a height with top byte 0xFF means top-down.
    w, h = _u32(data, 18, "<"), _u32(data, 22, "<")
    if data[25] == 0xFF:
        h = 2**32 - h
    if _u32(data, 30, "<") in (1, 2) and len(data) > _MAX_BMP_RLE_BYTES:
        raise ImageTooLargeError(
            f"RLE-compressed BMP files over {_MAX_BMP_RLE_BYTES} bytes are not accepted"
        )
    return w, h


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25:
        bits = _u32(data, 21, "<")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30:
        return _u16(data, 26, "<") & 0x3FFF, _u16(data, 28, "<") & 0x3FFF
    return None


_PROBES = {
    "JPEG": _jpeg_size,
    "PNG": _png_size,
    "GIF": _gif_size,
    "TIFF": _tiff_size,
    "BMP": _bmp_size,
    "WEBP": _webp_size,
}


def _probe_header(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) the header claims, read without Pillow; None if it cannot tell.

    This refuses a decompression bomb (a tiny file claiming huge dimensions)
    before Pillow allocates anything or emits its own bomb warning, and
    refuses headers whose structure would make Pillow's pure-Python parsers
    crawl. Pillow's size after opening stays the authoritative check.
    """
    try:
        return _PROBES[fmt](data)
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        if isinstance(exc, ImageInputError):
            raise
        return None


# --------------------------------------------------------------------------- decoding


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
    claimed = _probe_header(data, fmt)
    if claimed is not None:  # bombs are refused before Pillow sees them
        _check_size(*claimed, limits, check_min=False)
    with _client_errors(f"reading the {fmt} header"):
        img = Image.open(io.BytesIO(data), formats=[fmt])
        _check_size(*img.size, limits)
        _apply_draft(img, min_short_side)
    with _client_errors(f"decoding the {fmt} image"):
        img.load()  # raises on truncation unless someone set ImageFile.LOAD_TRUNCATED_IMAGES
    with _client_errors(f"converting the {fmt} image"):
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


# --------------------------------------------------------------------------- resize and tensor


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize_size`` and centre-crop ``spec.input_size``.

    Only the crop window is resampled (Pillow's ``box``): the same mapping as
    resizing the whole image and cropping, up to 1 grey level of rounding (the
    "box" filter may also settle exact ties the other way), but memory and time
    are spent on the output only; an 8x5_000_000 strip would otherwise be
    resized to 256x160_000_000 first. No ``reducing_gap``: it would shave a
    few ms off large non-JPEG inputs at the price of changing the filter the
    spec names.
    """
    w, h = img.size
    th, tw = spec.input_size
    scale = spec.resize_size / min(w, h)
    new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
    left, top = round((new_w - tw) / 2.0), round((new_h - th) / 2.0)
    if (new_w, new_h) == (w, h):
        return img.crop((left, top, left + tw, top + th))
    sx, sy = w / new_w, h / new_h
    box = (
        max(0.0, left * sx),
        max(0.0, top * sy),
        min(float(w), (left + tw) * sx),
        min(float(h), (top + th) * sy),
    )
    return img.resize((tw, th), _PIL_RESAMPLE[spec.interpolation], box=box, reducing_gap=None)


def to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Scale to [0, 1], normalise with the spec's mean/std, return float32 CHW."""
    if img.mode != spec.color_mode:
        raise ValueError(f"to_array needs a {spec.color_mode} image, got mode {img.mode}")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def image_to_tensor(data: bytes, spec: PreprocessSpec, limits: DecodeLimits | None = None) -> np.ndarray:
    """Bytes -> float32 (C, H, W) array ready for the model. The only such function.

    For any bytes it returns a finite array of shape ``(spec.channels, *spec.input_size)``
    or raises :class:`ImageInputError` (or a subclass).
    """
    img = decode_for_spec(data, spec, limits)
    try:
        return to_array(resize_and_crop(img, spec), spec)
    except MemoryError as exc:
        raise ImageTooLargeError("image is too large to resize in the available memory") from exc
