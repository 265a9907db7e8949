"""What a batch job scores: a directory, a glob or a manifest, listed lazily in a stable order.

Local paths are read with plain file I/O (the fast path); anything with a
protocol (``s3://``, ``gs://``, ``file://`` ...) goes through fsspec when the
matching filesystem package is installed.
"""

from __future__ import annotations

import csv
import glob
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

from service.preprocessing import IMAGE_SUFFIXES, ImageTooLargeError
from service.urls import UnusableUrlError, filesystem

_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
    """The job's INPUT cannot be listed (missing, empty manifest column, unknown protocol)."""


def is_url(location: str) -> bool:
    return "://" in location


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk_local(root: str) -> Iterator[str]:
    """Image files under ``root``, depth first, each directory in sorted order; hidden entries skipped."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"cannot list {root}: {exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_local(entry.path)
        elif _is_image_name(entry.name):
            yield entry.path


def _walk_fsspec(url: str) -> Iterator[str]:
    fs, root = _filesystem(url)
    if any(c in root for c in _GLOB_CHARS):
        yield from (fs.unstrip_protocol(p) for p in sorted(fs.glob(root)) if not fs.isdir(p))
        return
    if fs.isdir(root):
        for dirpath, dirnames, filenames in fs.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if _is_image_name(name):
                    yield fs.unstrip_protocol(f"{dirpath.rstrip('/')}/{name}")
        return
    if not fs.exists(root):
        raise InputError(f"input {url} does not exist")
    with fs.open(root, "rt", encoding="utf-8") as fh:
        yield from _manifest_lines(iter(fh))


def _filesystem(url: str):  # fsspec is untyped
    try:
        return filesystem(url)
    except UnusableUrlError as exc:
        raise InputError(f"cannot read {exc}") from exc


def _manifest_lines(lines: Iterator[str], base: str | None = None) -> Iterator[str]:
    """One path per line (blank lines and ``#`` comments skipped), or a CSV with a ``path`` column.

    Relative local paths are taken relative to the manifest's directory (``base``).
    """
    first = next(lines, None)
    if first is None:
        return
    header = next(csv.reader([first]), [])
    rest: Iterator[str]
    if "path" in header:  # a CSV whose header names the path column
        column = header.index("path")
        rest = (row[column] for row in csv.reader(lines) if len(row) > column)
    else:
        rest = itertools.chain([first], lines)
    for raw in rest:
        path = raw.strip()
        if not path or path.startswith("#"):
            continue
        if base is not None and not is_url(path) and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base, path))
        yield path


def iter_inputs(source: str) -> Iterator[str]:
    """Every input of the job, lazily: a directory (recursive, image files), a glob, or a manifest."""
    if is_url(source):
        yield from _walk_fsspec(source)
        return
    if any(c in source for c in _GLOB_CHARS):
        matches = sorted(glob.iglob(source, recursive=True))
        if not matches:
            raise InputError(f"no file matches {source}")
        yield from (m for m in matches if os.path.isfile(m))
        return
    if os.path.isdir(source):
        yield from _walk_local(source)
        return
    if not os.path.isfile(source):
        raise InputError(f"input {source} does not exist (expected a directory, a glob or a manifest file)")
    if _is_image_name(Path(source).name):
        yield source  # a single image is a job of one
        return
    base = os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8", newline="") as fh:
        yield from _manifest_lines(iter(fh), base)


def count_inputs(source: str) -> int | None:
    """How many inputs a local source has (a second cheap listing, for the progress bar's ETA).

    None for remote sources, where listing twice costs real time.
    """
    if is_url(source):
        return None
    return sum(1 for _ in iter_inputs(source))


def read_input(location: str, max_bytes: int) -> bytes:
    """The file's bytes, refusing more than ``max_bytes`` without reading them all."""
    if is_url(location):
        import fsspec

        with fsspec.open(location, "rb") as fh:
            data = fh.read(max_bytes + 1)
    else:
        with open(location, "rb") as fh:
            data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"file is larger than {max_bytes} bytes")
    return data
