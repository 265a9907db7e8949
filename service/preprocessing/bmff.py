"""HEIF and AVIF headers (ISO base media file format boxes), read without a decoder.

Both formats are an ``ftyp`` box whose brands name the codec, then a ``meta`` box that lists the
items (the primary image, its grid tiles, alpha, thumbnails, EXIF) and their properties: the
``ispe`` property of an image item is its size. Reading the primary item's ``ispe`` (and those
of the grid tiles and alpha planes decoded with it) lets a pixel bomb be refused before libheif or
libavif allocates anything. The walk only descends into the few boxes it needs and counts every
box and item it reads, so a file of millions of tiny boxes costs a bounded, small amount of work.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from service.preprocessing.spec import ImageInputError

#: ``ftyp`` major brands, as Pillow's AVIF plugin and pillow-heif accept them. ``mif1``/``msf1``
#: (generic HEIF image / sequence) are AVIF when ``avif``/``avis`` is among the compatible brands.
AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                         b"mif1", b"msf1"})

_MAX_BRANDS = 64  # compatible brands read from ftyp; real files list 2 to 6
_MAX_BOXES = 10_000  # boxes visited in the whole walk (top level, meta, ipco, iref)
_MAX_ITEMS = 4096  # items with properties; libheif refuses files of over 1000 items
_MAX_ENTRIES = 65_536  # property associations plus references, all items together
_MAX_LAYERS = 16  # alpha (and other auxiliary) planes decoded with the primary image


def ftyp_format(data: bytes) -> str | None:
    """"AVIF" or "HEIF" from the ``ftyp`` box at the start of ``data``, else None."""
    if len(data) < 12 or data[4:8] != b"ftyp":
        return None
    major = bytes(data[8:12])
    if major in AVIF_BRANDS:
        return "AVIF"
    if major not in HEIF_BRANDS:
        return None
    if major in (b"mif1", b"msf1"):
        size = int.from_bytes(data[:4], "big")
        end = min(len(data), max(size, 16), 16 + 4 * _MAX_BRANDS)
        compatible = {bytes(data[i : i + 4]) for i in range(16, end - 3, 4)}
        if compatible & AVIF_BRANDS:
            return "AVIF"
    return "HEIF"


@dataclass
class _Walk:
    """What the walk found in ``meta``, and how many boxes it has read so far."""

    fmt: str
    boxes: int = 0
    entries: int = 0
    primary: int | None = None
    properties: list[tuple[bytes, int, int]] = field(default_factory=list)  # ipco: (type, body, end)
    associations: dict[int, list[int]] = field(default_factory=dict)  # item -> 1-based ipco indices
    references: dict[bytes, list[tuple[int, list[int]]]] = field(default_factory=dict)  # iref
    sizes: dict[int, tuple[int, int] | None] = field(default_factory=dict)  # _ispe's answers, by item

    def malformed(self, what: str) -> ImageInputError:
        return ImageInputError(f"malformed {self.fmt} file: {what}")


def _name(kind: bytes) -> str:
    return kind.decode("latin-1").encode("ascii", "backslashreplace").decode()


def _boxes(data: bytes, start: int, end: int, walk: _Walk) -> list[tuple[bytes, int, int]]:
    """The (type, body start, box end) of each box in data[start:end]; refuses boxes that overrun."""
    out, pos = [], start
    while pos + 8 <= end:
        walk.boxes += 1
        if walk.boxes > _MAX_BOXES:
            raise walk.malformed("too many boxes")
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if size == 1:  # 64-bit size follows
            if body + 8 > end:
                raise walk.malformed(f"truncated {_name(kind)} box")
            size, body = struct.unpack_from(">Q", data, body)[0], body + 8
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < body - pos or pos + size > end:
            raise walk.malformed(f"{_name(kind)} box of {size} bytes does not fit")
        out.append((kind, body, pos + size))
        pos += size
    return out


def _top_level(data: bytes, walk: _Walk) -> tuple[int, int]:
    """Body and end of the ``meta`` box. Boxes after it (a truncated ``mdat``) are not read."""
    pos, n = 0, len(data)
    while pos + 8 <= n:
        walk.boxes += 1
        if walk.boxes > _MAX_BOXES:
            raise walk.malformed("too many boxes")
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if size == 1 and body + 8 <= n:
            size, body = struct.unpack_from(">Q", data, body)[0], body + 8
        elif size == 0:
            size = n - pos
        if size < body - pos:
            raise walk.malformed(f"{_name(kind)} box of {size} bytes")
        if kind == b"meta":
            if pos + size > n:
                raise walk.malformed("the meta box is truncated")
            return body + 4, pos + size  # a full box: version and flags first
        pos += size
    raise walk.malformed("no meta box")


def _read_meta(data: bytes, start: int, end: int, walk: _Walk) -> None:
    for kind, body, box_end in _boxes(data, start, end, walk):
        if kind == b"pitm":
            id_format = ">H" if data[body] == 0 else ">I"  # full box: version 0 has 16-bit ids
            walk.primary = _unpack(data, id_format, body + 4, box_end, walk)
        elif kind == b"iprp":
            for sub, sub_body, sub_end in _boxes(data, body, box_end, walk):
                if sub == b"ipco":
                    walk.properties += _boxes(data, sub_body, sub_end, walk)
                elif sub == b"ipma":
                    _read_ipma(data, sub_body, sub_end, walk)
        elif kind == b"iref":
            _read_iref(data, body, box_end, walk)


def _unpack(data: bytes, fmt: str, pos: int, end: int, walk: _Walk) -> int:
    if pos + struct.calcsize(fmt) > end:
        raise walk.malformed("a box is too short for its fields")
    return struct.unpack_from(fmt, data, pos)[0]


def _count_entries(walk: _Walk, n: int) -> None:
    walk.entries += n
    if walk.entries > _MAX_ENTRIES:
        raise walk.malformed("too many item properties or references")


def _read_iref(data: bytes, start: int, end: int, walk: _Walk) -> None:
    id_format = ">H" if data[start] == 0 else ">I"
    step = struct.calcsize(id_format)
    for ref, body, box_end in _boxes(data, start + 4, end, walk):
        source = _unpack(data, id_format, body, box_end, walk)
        count = _unpack(data, ">H", body + step, box_end, walk)
        first = body + step + 2
        if first + count * step > box_end:
            raise walk.malformed(f"{_name(ref)} reference list does not fit")
        _count_entries(walk, count)
        targets = list(struct.unpack_from(f">{count}{id_format[1]}", data, first))
        walk.references.setdefault(ref, []).append((source, targets))


def _read_ipma(data: bytes, start: int, end: int, walk: _Walk) -> None:
    version, flags = data[start], int.from_bytes(data[start + 1 : start + 4], "big")
    entries = _unpack(data, ">I", start + 4, end, walk)
    if entries > _MAX_ITEMS:
        raise walk.malformed(f"{entries} items")
    id_format, pos = (">H" if version < 1 else ">I"), start + 8
    for _ in range(entries):
        item = _unpack(data, id_format, pos, end, walk)
        pos += struct.calcsize(id_format)
        count = _unpack(data, ">B", pos, end, walk)
        pos += 1
        wide = flags & 1  # 15-bit property indices; the top bit says "essential"
        if pos + count * (2 if wide else 1) > end:
            raise walk.malformed("item properties do not fit")
        if wide:
            indices = [v & 0x7FFF for v in struct.unpack_from(f">{count}H", data, pos)]
        else:
            indices = [v & 0x7F for v in data[pos : pos + count]]
        pos += count * (2 if wide else 1)
        _count_entries(walk, count)
        walk.associations.setdefault(item, []).extend(indices)


def _ispe(data: bytes, walk: _Walk, item: int) -> tuple[int, int] | None:
    """The item's size from its ``ispe`` property; the largest if a damaged file has several.

    Remembered per item: a grid may list one tile thousands of times, each with many properties.
    """
    if item in walk.sizes:
        return walk.sizes[item]
    best: tuple[int, int] | None = None
    for index in walk.associations.get(item, []):
        if not 1 <= index <= len(walk.properties):
            continue  # index 0 means "no property"; a dangling index is libheif's to refuse
        kind, body, end = walk.properties[index - 1]
        if kind == b"ispe":
            if body + 12 > end:
                raise walk.malformed("ispe box too short")
            size = struct.unpack_from(">II", data, body + 4)
            if best is None or size[0] * size[1] > best[0] * best[1]:
                best = size
    walk.sizes[item] = best
    return best


def _layer_pixels(data: bytes, walk: _Walk, item: int, size: tuple[int, int]) -> int:
    """Pixels decoded for ``item``: those of its grid tiles (or overlay inputs), else its own."""
    tiles = [t for source, targets in walk.references.get(b"dimg", []) if source == item for t in targets]
    if not tiles:
        return size[0] * size[1]
    return sum(w * h for w, h in (_ispe(data, walk, t) or (0, 0) for t in tiles))


class Layout(NamedTuple):
    """The primary image's coded size, and the largest plane decoding it means (see primary_layout)."""

    width: int
    height: int
    largest_plane: int


def primary_layout(data: bytes, fmt: str) -> Layout:
    """The primary image's size from its ``ispe``, and the pixels of the largest plane it decodes.

    Sizes are as coded, before ``irot`` rotation and ``clap`` cropping (the same pixel count, or
    more). Decoding the image also decodes its grid tiles (which cover the image, plus padding) and
    its alpha plane; an auxiliary image (alpha, depth, gain map) counts as a plane of its own. Raises
    :class:`ImageInputError` for boxes that are missing, overrun their parent or exceed the budgets.
    """
    walk = _Walk(fmt)
    try:
        _read_meta(data, *_top_level(data, walk), walk)
    except (struct.error, IndexError) as exc:  # a field read past the end of the bytes
        raise walk.malformed("a box ends before its fields") from exc
    if walk.primary is None:
        raise walk.malformed("no primary item")
    size = _ispe(data, walk, walk.primary)
    if size is None:
        raise walk.malformed("the primary image has no size (ispe)")
    planes = [_layer_pixels(data, walk, walk.primary, size)]
    aux = [source for source, targets in walk.references.get(b"auxl", []) if walk.primary in targets]
    if len(aux) > _MAX_LAYERS:
        raise walk.malformed(f"{len(aux)} auxiliary images")
    planes += [_layer_pixels(data, walk, item, _ispe(data, walk, item) or (0, 0)) for item in aux]
    return Layout(size[0], size[1], max(planes))
