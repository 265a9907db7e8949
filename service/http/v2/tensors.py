"""Tensor wire formats shared by REST and gRPC: BYTES length prefixes, FP32 raw buffers, JSON data.

Binary tensor extension (Triton ``extension_binary_data.md``): little-endian, row-major, no padding;
"for BYTES type an element is represented by a 4-byte unsigned integer giving the length followed by
the actual bytes". gRPC's ``raw_input_contents`` / ``raw_output_contents`` use the same layout.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from service.http.v2.errors import invalid

_LENGTH = struct.Struct("<I")
FP32 = np.dtype("<f4")


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as one buffer: each one's LE uint32 length, then its bytes."""
    parts = []
    for element in elements:
        parts.append(_LENGTH.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int, what: str) -> list[bytes]:
    """Exactly ``count`` length-prefixed elements that fill ``buffer``; a 400 otherwise."""
    view = memoryview(buffer)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < _LENGTH.size:
            raise invalid(f"{what}: binary data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if length > len(view) - offset:
            raise invalid(f"{what}: element {len(elements)} claims {length} bytes but only "
                          f"{len(view) - offset} remain (each BYTES element is a little-endian uint32 "
                          "length followed by that many bytes)")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
        if len(elements) > count:
            break
    if len(elements) != count:
        raise invalid(f"{what}: binary data holds {len(elements)}{'+' if offset < len(view) else ''} "
                      f"elements but the shape says {count}")
    return elements


def fp32_from_buffer(buffer: bytes | memoryview, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A writable float32 array of ``shape`` from raw little-endian bytes; a 400 if the size is wrong."""
    expected = math.prod(shape) * FP32.itemsize
    if len(buffer) != expected:
        raise invalid(f"{what}: binary data is {len(buffer)} bytes; FP32 {list(shape)} needs {expected}")
    return np.frombuffer(buffer, dtype=FP32).reshape(shape).astype(np.float32)


def fp32_from_json(data: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as float32 of ``shape``; numbers only."""
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise invalid(f"{what}: data is not a regular array of numbers ({exc})") from None
    if array.size and array.dtype.kind not in "iuf":
        raise invalid(f"{what}: data must hold numbers only (found {array.dtype.kind!r}-kind values)")
    if array.size != math.prod(shape):
        raise invalid(f"{what}: data has {array.size} values; shape {list(shape)} needs {math.prod(shape)}")
    return array.astype(np.float32).reshape(shape)


def flatten(data: Any) -> list[Any]:
    """Row-major elements of a flat or nested JSON list."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def bytes_from_json(data: Any, count: int, base64_encoded: bool, what: str) -> list[bytes]:
    """BYTES elements from JSON strings: base64 when ``content_type`` says so (MLServer's convention),
    else the strings' UTF-8 bytes (what the V2 spec and tritonclient's ``binary_data=False`` send)."""
    elements = flatten(data)
    if len(elements) != count:
        raise invalid(f"{what}: data has {len(elements)} elements but the shape says {count}")
    out = []
    for index, element in enumerate(elements):
        if not isinstance(element, str):
            raise invalid(f"{what}: element {index} is {type(element).__name__}; BYTES data in JSON are strings")
        if base64_encoded:
            try:
                out.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError):
                raise invalid(f"{what}: element {index} is not valid base64") from None
        else:
            out.append(element.encode("utf-8"))
    return out


def fp32_to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=FP32).tobytes()


def fp32_to_json(array: np.ndarray) -> list[float]:
    """Flat row-major floats; a float32 widened to a Python float prints exactly and reads back exact."""
    return np.asarray(array, dtype=np.float32).ravel().tolist()
