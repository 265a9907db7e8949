"""glibc heap tuning for long-running workers: cap the arenas, hand freed memory back.

Process-wide and a no-op where there is no glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas (default: 8 per core), before the worker's threads start allocating.

    Decode threads, ONNX Runtime's pools and the sessions each reload builds and drops spread over
    many arenas, each keeping its own high-water mark, so RSS keeps rising across reloads without a
    cap (measured in the soak: benchmarks/NOTES.md, "Memory across reloads"). False where there is
    no glibc (nothing to do).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))


def release_memory() -> None:
    """Hand freed heap back to the OS. glibc keeps what a dropped session freed (tens of MB per
    reload, spread over threads' arenas) unless asked; without this RSS climbs with every reload."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
