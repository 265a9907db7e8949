"""Which format the bytes are, and how large the image claims to be, before Pillow decodes a pixel.

The format is taken from the magic numbers (never a file name). The header probes read the declared
size so that pixel bombs are refused from the header, and refuse a few layouts that Pillow would
spend seconds on in Python (parser-crawl budgets below). AVIF and HEIF boxes are read in ``bmff``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import NamedTuple

from service.preprocessing.bmff import ftyp_format, primary_layout
from service.preprocessing.spec import ImageInputError, ImageTooLargeError

#: Formats we decode, by Pillow's plugin name (HEIF, which iPhones save as .heic, is pillow-heif's).
#: Anything else is a 415.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")

#: File name suffixes of those formats, for listing folders (batch jobs, ImageFolder data sets); the
#: format itself is always taken from the bytes.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"})

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


def detect_format(data: bytes) -> str | None:
    """Pillow format name from the magic numbers, or None; file names and MIME types lie."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":  # ISO BMFF: the brands say AVIF or HEIF (or a video, refused)
        return ftyp_format(bytes(data[:1024]))
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


_PROBES: dict[str, Callable[[bytes], tuple[int, ...] | None]] = {
    "JPEG": _jpeg_size,
    "PNG": _png_size,
    "GIF": _gif_size,
    "TIFF": _tiff_size,
    "BMP": _bmp_size,
    "WEBP": _webp_size,
    "AVIF": lambda data: primary_layout(data, "AVIF"),
    "HEIF": lambda data: primary_layout(data, "HEIF"),
}


class Claimed(NamedTuple):
    """What a header says decoding will cost: the image's size and its largest decoded plane."""

    width: int
    height: int
    largest_plane: int  # width * height, or more for HEIF/AVIF grid tiles and auxiliary planes


def probe_header(data: bytes, fmt: str) -> Claimed | None:
    """The size the header claims, read without Pillow; None if it cannot tell.

    This refuses a decompression bomb (a tiny file claiming huge dimensions)
    before Pillow allocates anything or emits its own bomb warning, and
    refuses headers whose structure would make Pillow's pure-Python parsers
    crawl. Pillow's size after opening stays the authoritative check.
    """
    try:
        size = _PROBES[fmt](data)
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        if isinstance(exc, ImageInputError):
            raise
        return None
    if size is None:
        return None
    width, height, *plane = size
    return Claimed(width, height, plane[0] if plane else width * height)
