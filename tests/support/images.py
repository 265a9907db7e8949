"""Helpers that write real image files: photos, digits and hand-built headers for the decoder tests.

Everything is built with Pillow or by hand (PNG chunks, ICC profiles, bomb
headers) so the tests control exactly which bytes the decoder sees.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """Save ``img`` as ``fmt`` and return the file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(size: tuple[int, int] | None = None, which: str = "chelsea") -> Image.Image:
    """A real photo (scikit-image's chelsea or coffee), optionally resized to (width, height)."""
    img = Image.fromarray(getattr(skdata, which)())
    return img if size is None else img.resize(size, Image.Resampling.BICUBIC)


def asymmetric(width: int = 48, height: int = 32) -> np.ndarray:
    """An RGB array that no flip or rotation maps onto itself: four flat quadrants plus a mark.

    Flat blocks keep JPEG's error small, so orientations can be compared with a tolerance.
    """
    arr = np.zeros((height, width, 3), np.uint8)
    hh, hw = height // 2, width // 2
    arr[:hh, :hw] = (220, 30, 30)
    arr[:hh, hw:] = (30, 200, 30)
    arr[hh:, :hw] = (30, 30, 220)
    arr[hh:, hw:] = (230, 230, 40)
    arr[: height // 4, : width // 4] = (250, 250, 250)  # top-left mark breaks the symmetry
    return arr


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that EXIF ``orientation`` displays ``upright``.

    Written from the EXIF definition (where row 0 and column 0 of the stored
    image end up), independently of Pillow's transpose table.
    """
    u = upright
    stored = {
        1: u,
        2: u[:, ::-1],  # row 0 top, column 0 right: mirrored
        3: u[::-1, ::-1],  # row 0 bottom, column 0 right
        4: u[::-1, :],  # row 0 bottom, column 0 left
        5: u.transpose(1, 0, 2),  # row 0 left, column 0 top
        6: np.rot90(u, 1),  # row 0 right, column 0 top
        7: u[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
        8: np.rot90(u, -1),  # row 0 left, column 0 bottom
    }[orientation]
    return np.ascontiguousarray(stored)


def with_orientation(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    """Encode the stored pixels for ``orientation`` with that EXIF orientation tag."""
    img = Image.fromarray(stored_for_orientation(upright, orientation))
    if fmt == "TIFF":
        return encode(img, fmt, tiffinfo={274: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        kwargs.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        kwargs.update(lossless=True)
    return encode(img, fmt, **kwargs)


# --------------------------------------------------------------------------- PNG by hand


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


def png_bytes(
    width: int,
    height: int,
    *,
    bit_depth: int = 8,
    color_type: int = 0,
    rows: bytes | None = None,
    idat: bytes | None = None,
    extra: tuple[bytes, ...] = (),
) -> bytes:
    """A PNG with the given IHDR. ``rows`` is raw scanlines (filter bytes added here)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        assert rows is not None
        stride = len(rows) // height
        raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))
        idat = zlib.compress(raw)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- bomb headers


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming ``width`` x ``height`` with a few bytes of data."""
    return png_bytes(width, height, idat=zlib.compress(b"\x00" * 64))


def gif_bomb(width: int, height: int, *, in_frame: bool = False) -> bytes:
    """A GIF claiming a huge canvas, or (``in_frame``) a small canvas with a huge first frame."""
    screen = (16, 16) if in_frame else (width, height)
    frame = (width, height) if in_frame else (16, 16)
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", *screen, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, *frame, 0)
        + b"\x02\x02\x4c\x01\x00\x3b"
    )


def tiff_bomb(width: int, height: int, *, width_out_of_line: bool = False) -> bytes:
    """A little-endian TIFF whose first IFD claims ``width`` x ``height`` 8-bit grey pixels.

    ``width_out_of_line`` stores the width as a 3-value array elsewhere in the
    file (Pillow reads the first value), as a fuzzer once produced.
    """
    entries = [
        (256, 4, 3, 160) if width_out_of_line else (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 200),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 16),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    body = b"II*\x00" + struct.pack("<I", 8) + ifd
    body += b"\0" * (160 - len(body)) + struct.pack("<III", width, 1, 1)
    return body + b"\0" * (216 - len(body))


def jpeg_bomb(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_many_strips(strips: int) -> bytes:
    """An 8-pixel-wide grey TIFF with one row per strip: Pillow handles each strip in Python."""
    offsets_at = 8 + 2 + 12 * 9 + 4
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    entries = [
        (256, 4, 1, 8),
        (257, 4, 1, strips),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, strips, offsets_at),
        (277, 3, 1, 1),
        (278, 4, 1, 1),
        (279, 4, strips, counts_at),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    offsets = np.arange(strips, dtype="<u4") * 8 + pixels_at
    counts = np.full(strips, 8, dtype="<u4")
    body = b"II*\x00" + struct.pack("<I", 8) + ifd + offsets.tobytes() + counts.tobytes()
    return body + bytes(8 * strips)


def progressive_scan_bomb(extra_scans: int) -> bytes:
    """A real progressive JPEG with one of its scans repeated ``extra_scans`` times.

    libjpeg walks the whole coefficient buffer for every scan, so cost grows
    with scans x pixels while the file barely grows.
    """
    data = encode(photo((320, 240)), "JPEG", progressive=True, quality=80)
    second = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    third = data.index(b"\xff\xda", second + 2)
    return data[:-2] + data[second:third] * extra_scans + b"\xff\xd9"


def bmp_bomb(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming ``width`` x ``height`` followed by a few bytes.

    A negative width is read by Pillow as unsigned: over four billion pixels wide.
    """
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + header + b"\0" * 64


def webp_bomb(width: int, height: int) -> bytes:
    """An extended (VP8X) WebP header claiming a ``width`` x ``height`` canvas."""
    vp8x = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --------------------------------------------------------------------------- ICC profiles by hand


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    # ASCII part, then empty Unicode (lang, count) and ScriptCode (code, count, 67 bytes)
    tail = b"\0" * 8 + b"\0\0\0" + b"\0" * 67
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + tail


def icc_profile(gamma: float, *, gray: bool = False, description: str = "test profile") -> bytes:
    """A minimal ICC v2 profile: sRGB primaries (or grey) with a pure power-law tone curve.

    With gamma 1.0 the pixel values are linear light, so a mid grey of 128
    must come out near 188 once converted to sRGB.
    """
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags: list[tuple[bytes, bytes]] = [
        (b"desc", _desc(description)),
        (b"cprt", b"text\0\0\0\0no copyright\0"),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
    ]
    if gray:
        tags.append((b"kTRC", curve))
    else:
        tags += [
            (b"rXYZ", _xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", _xyz(0.3851, 0.7169, 0.0971)),
            (b"bXYZ", _xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve),
            (b"gTRC", curve),
            (b"bTRC", curve),
        ]
    offset = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for sig, payload in tags:
        payload += b"\0" * (-len(payload) % 4)
        table += sig + struct.pack(">II", offset + len(blob), len(payload))
        blob += payload
    size = offset + len(blob)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntr"
        + (b"GRAY" if gray else b"RGB ")
        + b"XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 0)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\0" * 4
        + b"\0" * 16
        + b"\0" * 28
    )
    assert len(header) == 128, len(header)
    return header + struct.pack(">I", len(tags)) + table + blob


# --------------------------------------------------------------------------- animation


def many_frame_gif(frames: int) -> tuple[bytes, tuple[int, int, int]]:
    """A GIF whose first frame is red and that has ``frames`` - 1 more blue frames.

    Built by repeating an encoded frame block, so thousands of frames cost
    nothing to write. Returns the bytes and the first frame's colour.
    """
    palette = [255, 0, 0, 0, 0, 255] + [0] * (3 * 254)
    first, other = Image.new("P", (16, 16), 0), Image.new("P", (16, 16), 1)
    for img in (first, other):
        img.putpalette(palette)
    a, b = encode(first, "GIF", optimize=False), encode(other, "GIF", optimize=False)
    gct = 3 << ((a[10] & 7) + 1) if a[10] & 0x80 else 0
    frame_b = b[13 + gct : -1]  # everything between the colour table and the trailer
    return a[:-1] + frame_b * (frames - 1) + b";", (255, 0, 0)


def digit_images(per_class: int, classes: tuple[int, ...] = tuple(range(10))) -> dict[int, list[np.ndarray]]:
    """Real handwritten digits from scikit-learn, as 8-bit 8x8 grey arrays, per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    for image, target in zip(digits.images, digits.target, strict=True):
        if target in out and len(out[target]) < per_class:
            out[target].append(np.round(image * 255 / 16).astype(np.uint8))
    return out


def write_image(path: Path, array: np.ndarray, fmt: str | None = None, size: int = 32) -> Path:
    """Save a digit upscaled to ``size`` so every format (JPEG included) keeps it legible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array).resize((size, size), Image.Resampling.NEAREST)
    if (fmt or path.suffix.lstrip(".").upper()) in ("JPG", "JPEG", "WEBP"):
        img = img.convert("RGB")
    img.save(path, format=fmt)
    return path
