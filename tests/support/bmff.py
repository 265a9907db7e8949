"""ISO BMFF boxes of HEIF and AVIF files, found and edited in place, for the phone-format tests.

The walk descends into the containers the decoder's header probe reads (meta, iprp, ipco, iref), so
a test can patch a size, rename a box or give an item a property of its own, and build headers by
hand (``box``, ``full_box``).
"""

from __future__ import annotations

import struct


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full_box(kind: bytes, payload: bytes, version: int = 0, flags: int = 0) -> bytes:
    return box(kind, bytes([version]) + flags.to_bytes(3, "big") + payload)


CONTAINERS = {b"meta": 4, b"iprp": 0, b"ipco": 0, b"iref": 4}


def boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of every box in the containers the decoder reads, depth first."""
    end = len(data) if end is None else end
    out, pos = [], start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        size = size or end - pos
        out.append((kind, pos, size))
        if kind in CONTAINERS:
            out += boxes(data, pos + 8 + CONTAINERS[kind], pos + size)
        pos += size
    return out


def find(data: bytes, kind: bytes) -> list[tuple[int, int]]:
    return [(pos, size) for k, pos, size in boxes(data) if k == kind]


def patched(data: bytes, kind: bytes, offset: int, value: bytes, which: int | None = None) -> bytes:
    """``data`` with ``value`` written ``offset`` bytes into each box of ``kind`` (or the ``which``-th)."""
    out = bytearray(data)
    found = find(data, kind)
    assert found, kind
    for pos, _ in found if which is None else [found[which]]:
        out[pos + offset : pos + offset + len(value)] = value
    return bytes(out)


def with_alpha_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` whose alpha item gets an ``ispe`` of its own, claiming ``width`` x ``height``.

    The new property is appended to ``ipco`` and the alpha item's association moved to it; the
    enclosing boxes grow by its 20 bytes. The image data no longer lines up: only the header is read.
    """
    (auxl, _), (ipco, ipco_size) = find(data, b"auxl")[0], find(data, b"ipco")[0]
    ipma, ipma_size = find(data, b"ipma")[0]
    alpha_item = struct.unpack_from(">H", data, auxl + 8)[0]
    children = [k for k, pos, _ in boxes(data) if ipco < pos < ipco + ipco_size and k != b"ipco"]
    ispe_index, new_index = children.index(b"ispe") + 1, len(children) + 1
    out = bytearray(data)
    assert data[ipma + 8] == 0 and not data[ipma + 11] & 1  # version 0, 1-byte property indices
    pos = ipma + 16
    for _ in range(struct.unpack_from(">I", data, ipma + 12)[0]):
        item, count = struct.unpack_from(">HB", data, pos)
        for at in range(pos + 3, pos + 3 + count):
            if item == alpha_item and data[at] & 0x7F == ispe_index:
                out[at] = (data[at] & 0x80) | new_index
        pos += 3 + count
    assert pos == ipma + ipma_size
    out[ipco + ipco_size : ipco + ipco_size] = struct.pack(">I4sIII", 20, b"ispe", 0, width, height)
    for kind in (b"ipco", b"iprp", b"meta"):
        at = find(data, kind)[0][0]
        out[at : at + 4] = struct.pack(">I", struct.unpack_from(">I", data, at)[0] + 20)
    return bytes(out)


def after_ftyp(data: bytes, insert: bytes) -> bytes:
    end = sum(find(data, b"ftyp")[0])
    return data[:end] + insert + data[end:]


def renamed(data: bytes, kind: bytes, new: bytes) -> bytes:
    pos, _ = find(data, kind)[0]
    return data[: pos + 4] + new + data[pos + 8 :]
