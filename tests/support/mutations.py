"""Structure-aware mutations of real image files, for fuzzing the decoder and the service.

Random bit flips mostly break a checksum or the first marker and stop the
decoder early. To reach deeper, a file is first read as its format's units
(PNG chunks, JPEG segments and scans, GIF blocks, TIFF directory entries,
RIFF chunks of WebP, ISO BMFF boxes of AVIF and HEIF) and integer header fields (dimensions, counts, offsets,
lengths, flags), and mutations act on those: a field set to a boundary value,
a chunk duplicated, dropped, swapped or borrowed from another file of the same
format, a cut at a chunk boundary. PNG checksums can be repaired afterwards so
the decoder believes the damage. The readers are tolerant: on damaged input
they return what they found so far.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class Field:
    """An unsigned integer of ``size`` bytes at ``offset``; ``order`` is ``big`` or ``little``."""

    offset: int
    size: int
    order: str


@dataclass
class Anatomy:
    fmt: str
    fields: list[Field] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of whole units


_MAX_UNITS = 2000  # enough for any seed; damaged lengths cannot make a reader loop long


def _png(data: bytes, out: Anatomy) -> None:
    pos = 8
    for _ in range(_MAX_UNITS):
        if pos + 12 > len(data):
            return
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        out.fields.append(Field(pos, 4, "big"))
        body = pos + 8
        if kind == b"IHDR":
            out.fields += [Field(body, 4, "big"), Field(body + 4, 4, "big")]
            out.fields += [Field(body + i, 1, "big") for i in range(8, 13)]
        elif kind == b"acTL":
            out.fields += [Field(body, 4, "big"), Field(body + 4, 4, "big")]
        elif kind == b"fcTL":  # sequence, width, height, x, y, delays, dispose, blend
            out.fields += [Field(body + i, 4, "big") for i in range(0, 20, 4)]
            out.fields += [Field(body + 24, 1, "big"), Field(body + 25, 1, "big")]
        elif kind in (b"fdAT", b"iCCP", b"zTXt", b"tEXt", b"eXIf", b"tRNS", b"PLTE"):
            out.fields.append(Field(body, 4, "big") if kind == b"fdAT" else Field(pos, 4, "big"))
        end = pos + 12 + length
        out.chunks.append((pos, min(end, len(data))))
        if kind == b"IEND" or end > len(data):
            return
        pos = end


def _tiff_ifd(data: bytes, out: Anatomy, base: int, order: str, ifd: int, depth: int = 0) -> None:
    fmt = "<" if order == "little" else ">"
    for _ in range(4):  # the first few directories (pages)
        if ifd <= 0 or base + ifd + 2 > len(data) or depth > 8:
            return
        at = base + ifd
        count = struct.unpack_from(fmt + "H", data, at)[0]
        out.fields.append(Field(at, 2, order))
        for i in range(min(count, 64)):
            entry = at + 2 + 12 * i
            if entry + 12 > len(data):
                return
            tag, typ, n = struct.unpack_from(fmt + "HHI", data, entry)
            out.fields += [Field(entry + 2, 2, order), Field(entry + 4, 4, order)]
            size = {3: 2, 8: 2, 4: 4, 9: 4, 13: 4}.get(typ, 4 if typ in (5, 10, 11, 12) else 1)
            if n * size <= 4 and typ in (3, 8):
                out.fields.append(Field(entry + 8, 2, order))
            else:
                out.fields.append(Field(entry + 8, 4, order))
                pointer = struct.unpack_from(fmt + "I", data, entry + 8)[0]
                if n * size > 4 and typ in (3, 4, 8, 9):  # arrays kept elsewhere: strips, tiles, bits
                    out.fields += [Field(base + pointer + k * size, size, order) for k in range(min(n, 4))
                                   if base + pointer + (k + 1) * size <= len(data)]
                if tag in (34665, 34853) and typ in (4, 13):  # EXIF and GPS sub-directories
                    _tiff_ifd(data, out, base, order, pointer, depth + 1)
            out.chunks.append((entry, entry + 12))
        nxt = at + 2 + 12 * count
        if nxt + 4 > len(data):
            return
        out.fields.append(Field(nxt, 4, order))
        ifd = struct.unpack_from(fmt + "I", data, nxt)[0]
        depth += 1


def _tiff(data: bytes, out: Anatomy, base: int = 0) -> None:
    if len(data) < base + 8:
        return
    order = "little" if data[base : base + 2] == b"II" else "big"
    out.fields += [Field(base + 2, 2, order), Field(base + 4, 4, order)]
    _tiff_ifd(data, out, base, order, int.from_bytes(data[base + 4 : base + 8], order))


def _jpeg(data: bytes, out: Anatomy) -> None:
    pos = 2
    for _ in range(_MAX_UNITS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xD9:
            out.chunks.append((pos, pos + 2))
            return
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.fields.append(Field(pos + 2, 2, "big"))
        body = pos + 4
        end = pos + 2 + length
        if marker in (0xC0, 0xC1, 0xC2, 0xC3):  # frame: precision, height, width, components
            out.fields += [Field(body, 1, "big"), Field(body + 1, 2, "big"), Field(body + 3, 2, "big"),
                           Field(body + 5, 1, "big")]
            out.fields += [Field(body + 6 + 3 * c + k, 1, "big") for c in range(3) for k in (1, 2)]
        elif marker == 0xC4:  # Huffman table: class/id, then 16 code counts
            out.fields += [Field(body + i, 1, "big") for i in range(17)]
        elif marker == 0xDB:  # quantisation table: precision/id, first values
            out.fields += [Field(body + i, 1, "big") for i in range(4)]
        elif marker == 0xDD:  # restart interval
            out.fields.append(Field(body, 2, "big"))
        elif marker == 0xE1 and data[body : body + 6] == b"Exif\0\0":
            _tiff(data, out, body + 6)
        elif marker == 0xDA:  # scan header: components, selectors, spectral range, approximation
            ns = data[body] if body < len(data) else 0
            out.fields += [Field(body, 1, "big")] + [Field(body + 1 + 2 * ns + k, 1, "big") for k in range(3)]
            scan_end = data.find(b"\xff\xda", end)  # the next scan (progressive), else the end of image
            eoi = data.find(b"\xff\xd9", end)
            stop = min(x for x in (scan_end, eoi, len(data)) if x >= 0)
            out.chunks.append((pos, stop))
            pos = stop
            continue
        out.chunks.append((pos, min(end, len(data))))
        pos = end


def _gif(data: bytes, out: Anatomy) -> None:
    if len(data) < 13:
        return
    out.fields += [Field(6, 2, "little"), Field(8, 2, "little"), Field(10, 1, "little")]
    flags = data[10]
    pos = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    for _ in range(_MAX_UNITS):
        if pos >= len(data):
            return
        start, block = pos, data[pos]
        if block == 0x21 and pos + 2 < len(data):  # extension: label, sub-blocks
            if data[pos + 1] == 0xF9:  # graphic control: packed, delay, transparent index
                out.fields += [Field(pos + 3, 1, "little"), Field(pos + 4, 2, "little")]
            pos += 2
        elif block == 0x2C and pos + 10 <= len(data):  # image: x, y, w, h, flags, table, LZW size
            out.fields += [Field(pos + 1 + 2 * i, 2, "little") for i in range(4)]
            out.fields.append(Field(pos + 9, 1, "little"))
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0)
            out.fields.append(Field(pos, 1, "little"))
            pos += 1
        else:
            return
        for _ in range(100_000):  # data sub-blocks
            if pos >= len(data):
                return
            if len(out.fields) < 400:
                out.fields.append(Field(pos, 1, "little"))
            if data[pos] == 0:
                pos += 1
                break
            pos += data[pos] + 1
        out.chunks.append((start, min(pos, len(data))))


def _webp(data: bytes, out: Anatomy) -> None:
    out.fields.append(Field(4, 4, "little"))
    pos = 12
    for _ in range(_MAX_UNITS):
        if pos + 8 > len(data):
            return
        kind = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        out.fields.append(Field(pos + 4, 4, "little"))
        body = pos + 8
        if kind == b"VP8X":  # flags, canvas width - 1, height - 1
            out.fields += [Field(body, 1, "little"), Field(body + 4, 3, "little"), Field(body + 7, 3, "little")]
        elif kind == b"VP8L":  # signature, then 14-bit width - 1 and height - 1 packed
            out.fields += [Field(body, 1, "little"), Field(body + 1, 4, "little")]
        elif kind == b"VP8 ":  # frame tag, start code, 14-bit dimensions with scale bits
            out.fields += [Field(body, 3, "little"), Field(body + 6, 2, "little"), Field(body + 8, 2, "little")]
        elif kind == b"ANIM":
            out.fields.append(Field(body + 4, 2, "little"))  # loop count
        elif kind == b"ANMF":  # x, y, width - 1, height - 1, duration, flags
            out.fields += [Field(body + 3 * i, 3, "little") for i in range(5)] + [Field(body + 15, 1, "little")]
        elif kind == b"ALPH":
            out.fields.append(Field(body, 1, "little"))
        end = body + size + (size & 1)
        out.chunks.append((pos, min(end, len(data))))
        pos = end


def _bmp(data: bytes, out: Anatomy) -> None:
    out.fields += [Field(2, 4, "little"), Field(10, 4, "little"), Field(14, 4, "little"), Field(18, 4, "little"),
                   Field(22, 4, "little"), Field(26, 2, "little"), Field(28, 2, "little"),
                   Field(30, 4, "little"), Field(34, 4, "little"), Field(46, 4, "little")]
    header_end = 14 + int.from_bytes(data[14:18], "little")
    offset = int.from_bytes(data[10:14], "little")
    out.chunks += [(0, 14), (14, min(header_end, len(data)))]
    if header_end < offset <= len(data):
        out.chunks.append((header_end, offset))  # colour table


_BMFF_CONTAINERS = {b"meta": 4, b"iprp": 0, b"ipco": 0, b"dinf": 0, b"iref": 4, b"iinf": -1}


def _bmff(data: bytes, out: Anatomy, start: int = 0, end: int | None = None, depth: int = 0) -> None:
    """AVIF/HEIF boxes: every box is a chunk and its size a field; ispe, irot, pixi, pitm, ipma, iloc
    and reference fields too (the ones the header probe and libheif/libavif branch on)."""
    end = len(data) if end is None else end
    pos = start
    for _ in range(_MAX_UNITS):
        if pos + 8 > end or depth > 4:
            return
        size, kind = struct.unpack_from(">I4s", data, pos)
        out.fields.append(Field(pos, 4, "big"))
        body, box_end = pos + 8, min(pos + size, end) if size >= 8 else end
        if kind == b"ispe":
            out.fields += [Field(body + 4, 4, "big"), Field(body + 8, 4, "big")]
        elif kind in (b"irot", b"imir"):
            out.fields.append(Field(body, 1, "big"))
        elif kind == b"pixi":
            out.fields += [Field(body + 4 + i, 1, "big") for i in range(4)]
        elif kind == b"pitm":
            out.fields.append(Field(body + 4, 2, "big"))
        elif kind == b"ipma":  # version/flags, entry count, first entry's item id and association count
            out.fields += [Field(body, 4, "big"), Field(body + 4, 4, "big"), Field(body + 8, 2, "big"),
                           Field(body + 10, 1, "big")]
            out.fields += [Field(body + 11 + i, 1, "big") for i in range(min(data[body + 10], 8))]
        elif kind == b"iloc":  # version, offset/length sizes, item count, first item's extent
            out.fields += [Field(body, 1, "big"), Field(body + 4, 1, "big"), Field(body + 6, 2, "big")]
            out.fields += [Field(body + i, 4, "big") for i in range(14, min(box_end - body, 26) - 3, 4)]
        elif kind in (b"dimg", b"auxl", b"thmb", b"cdsc"):  # from, count, first targets
            out.fields += [Field(body + 2 * i, 2, "big") for i in range(4)]
        elif kind == b"ftyp":
            out.fields += [Field(body, 4, "big"), Field(body + 8, 4, "big")]
        out.chunks.append((pos, box_end))
        skip = _BMFF_CONTAINERS.get(kind)
        if skip is not None:
            skip = skip if skip >= 0 else (6 if data[body] == 0 else 8)  # iinf: full box + entry count
            _bmff(data, out, body + skip, box_end, depth + 1)
        if size < 8:
            return
        pos += size


_READERS = {"PNG": _png, "JPEG": _jpeg, "GIF": _gif, "WEBP": _webp, "TIFF": _tiff, "BMP": _bmp,
            "AVIF": _bmff, "HEIF": _bmff}


def sniff(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] in (b"GIF8",):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    if data[4:8] == b"ftyp":
        return "AVIF" if data[8:12] in (b"avif", b"avis") or b"avif" in data[16:48] else "HEIF"
    return None


def anatomy(data: bytes) -> Anatomy:
    """The fields and chunks of ``data`` as far as they can be read; empty for unknown formats."""
    fmt = sniff(data)
    out = Anatomy(fmt or "?")
    if fmt is not None:
        try:
            _READERS[fmt](data, out)
        except (struct.error, IndexError, ValueError):
            pass  # damaged: keep what was found
    out.fields = [f for f in out.fields if 0 <= f.offset and f.offset + f.size <= len(data)]
    out.chunks = [(a, b) for a, b in out.chunks if 0 <= a < b <= len(data)]
    return out


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk checksum that lies inside the file, so damage gets past the CRC check."""
    if sniff(data) != "PNG":
        return data
    out = bytearray(data)
    pos = 8
    for _ in range(_MAX_UNITS):
        if pos + 12 > len(out):
            break
        length = int.from_bytes(out[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(out[pos + 4 : end]))
        pos = end + 4
    return bytes(out)


def _boundary_values(size: int, current: int) -> list[int]:
    top = (1 << (8 * size)) - 1
    return [0, 1, 2, top, top - 1, top >> 1, (top >> 1) + 1, current + 1, max(current - 1, 0),
            min(current * 2, top), current // 2, min(current * 256, top), 0xFF & top, 0xFFFF & top]


OPS = ("field", "dup_chunk", "drop_chunk", "swap_chunks", "borrow_chunk", "cut_at_chunk",
       "flip", "cut", "delete", "insert", "overwrite", "dup_bytes")


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_ops: int = 4) -> bytes:
    """A seed file after 1..``max_ops`` structural or byte-level mutations (PNG CRCs often repaired)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    fmt = sniff(bytes(data))
    donors = [s for s in seeds if sniff(s) == fmt] or seeds
    for _ in range(draw(st.integers(1, max_ops))):
        if not data:
            break
        body = anatomy(bytes(data))
        op = draw(st.sampled_from(OPS))
        if op == "field" and body.fields:
            f = draw(st.sampled_from(body.fields))
            current = int.from_bytes(data[f.offset : f.offset + f.size], f.order)  # type: ignore[arg-type]
            top = (1 << (8 * f.size)) - 1
            value = draw(st.one_of(st.sampled_from(_boundary_values(f.size, current)), st.integers(0, top)))
            data[f.offset : f.offset + f.size] = (value & top).to_bytes(f.size, f.order)  # type: ignore[arg-type]
        elif op in ("dup_chunk", "drop_chunk", "cut_at_chunk", "swap_chunks") and body.chunks:
            a, b = draw(st.sampled_from(body.chunks))
            if op == "dup_chunk":
                copies = draw(st.sampled_from([1, 1, 2, 16]))
                data[b:b] = bytes(data[a:b]) * copies
            elif op == "drop_chunk":
                del data[a:b]
            elif op == "cut_at_chunk":
                del data[max(0, draw(st.integers(a - 2, b + 2))) :]
            else:
                c, d = draw(st.sampled_from(body.chunks))
                if b <= c:
                    data[a:d] = data[c:d] + data[b:c] + data[a:b]
        elif op == "borrow_chunk" and body.chunks:
            donor = draw(st.sampled_from(donors))
            donor_chunks = anatomy(donor).chunks
            if donor_chunks:
                x, y = draw(st.sampled_from(donor_chunks))
                at = draw(st.sampled_from([a for a, _ in body.chunks] + [len(data)]))
                data[at:at] = donor[x:y]
        else:  # byte-level, half of them in the first 96 bytes where the headers are
            n = len(data)
            pos = draw(st.one_of(st.integers(min(12, n - 1), min(n, 96) - 1), st.integers(0, n - 1)))
            if op == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut":
                del data[pos:]
            elif op == "delete":
                del data[pos : pos + draw(st.integers(1, 64))]
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
            elif op == "overwrite":
                chunk = draw(st.binary(min_size=1, max_size=16))
                data[pos : pos + len(chunk)] = chunk
            else:
                data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    if fmt == "PNG" and draw(st.integers(0, 3)):  # three times in four: make the checksums agree
        return fix_png_crcs(bytes(data))
    return bytes(data)


def real_seeds() -> dict[str, bytes]:
    """Small real photos (scikit-image's) in every accepted format and in the variants decoders branch on.

    Small (64x48) so thousands of mutants decode in seconds; each format's structure is all there.
    """
    import pillow_heif

    from .images import asymmetric, encode, icc_profile, photo, with_orientation

    pillow_heif.register_heif_opener()  # HEIF files are written with pillow-heif's plugin
    cat, coffee = photo((64, 48)), photo((64, 48), which="coffee")
    cat16 = (np.asarray(cat, dtype=np.uint16) * 257).tobytes()
    heif_10bit = pillow_heif.from_bytes(mode="RGB;16", size=cat.size, data=cat16)
    rgba = cat.convert("RGBA")
    rgba.putalpha(180)
    grey16 = cat.convert("I;16")
    two = {"save_all": True, "append_images": [coffee], "duration": 40}
    return {
        "jpeg": encode(cat, "JPEG", quality=80),
        "jpeg-progressive": encode(cat, "JPEG", progressive=True),
        "jpeg-444-optimized": encode(cat, "JPEG", subsampling=0, optimize=True),
        "jpeg-restart-markers": encode(coffee, "JPEG", restart_marker_blocks=4),
        "jpeg-grey": encode(cat.convert("L"), "JPEG"),
        "jpeg-cmyk": encode(cat.convert("CMYK"), "JPEG"),
        "jpeg-icc": encode(coffee, "JPEG", icc_profile=icc_profile(1.0)),
        "jpeg-exif-rotated": with_orientation(asymmetric(48, 32), 6, "JPEG"),
        "png": encode(cat, "PNG"),
        "png-rgba-icc": encode(rgba, "PNG", icc_profile=icc_profile(1.0)),
        "png-palette-transparent": encode(cat.convert("P"), "PNG", transparency=3),
        "png-grey16": encode(grey16, "PNG"),
        "png-1bit": encode(cat.convert("1"), "PNG"),
        "apng": encode(cat, "PNG", **two),
        "webp": encode(cat, "WEBP", quality=70),
        "webp-lossless-alpha": encode(rgba, "WEBP", lossless=True),
        "webp-icc": encode(coffee, "WEBP", icc_profile=icc_profile(1.0)),
        "webp-animated": encode(cat, "WEBP", **two),
        "gif": encode(cat.convert("P"), "GIF"),
        "gif-interlaced-transparent": encode(coffee.convert("P"), "GIF", interlace=True, transparency=0),
        "gif-animated": encode(cat.convert("P"), "GIF", save_all=True, append_images=[coffee.convert("P")],
                               duration=40, loop=0, disposal=2),
        "tiff": encode(cat, "TIFF"),
        "tiff-lzw": encode(cat, "TIFF", compression="tiff_lzw"),
        "tiff-deflate-cmyk": encode(cat.convert("CMYK"), "TIFF", compression="tiff_adobe_deflate"),
        "tiff-packbits": encode(coffee, "TIFF", compression="packbits"),
        "tiff-jpeg": encode(cat, "TIFF", compression="jpeg"),
        "tiff-grey16": encode(grey16, "TIFF"),
        "tiff-multipage": encode(cat, "TIFF", **two),
        "bmp": encode(cat, "BMP"),
        "bmp-palette": encode(cat.convert("P"), "BMP"),
        "avif": encode(cat, "AVIF", quality=70),
        "avif-alpha-icc": encode(rgba, "AVIF", icc_profile=icc_profile(1.0)),
        "avif-rotated": with_orientation(asymmetric(48, 32), 6, "AVIF"),
        "avif-grey": encode(cat.convert("L"), "AVIF"),
        "heif": encode(cat, "HEIF", quality=70),
        "heif-alpha-icc": encode(rgba, "HEIF", icc_profile=icc_profile(1.0)),
        "heif-rotated-mirrored": with_orientation(asymmetric(48, 32), 5, "HEIF"),
        "heif-grid": encode(coffee, "HEIF", tile_size=32),
        "heif-10bit": _save_heif(heif_10bit),
    }


def _save_heif(heif: object) -> bytes:
    buf = io.BytesIO()
    heif.save(buf, quality=70)  # type: ignore[attr-defined]
    return buf.getvalue()
