"""Images from an uploaded zip or tar, treated as the untrusted input they are.

Refused, with the entry named: absolute paths and ``..`` (path traversal),
links and device files, more entries than allowed, more uncompressed bytes
than allowed in total or per entry, and compression ratios only a bomb has.
Nothing is extracted to disk: entries are read into memory one at a time, and
reads are bounded by the limits, not by what the headers claim.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from service.batch.scoring import Row, Scorer
from service.preprocessing import ImageInputError

SKIPPED_PREFIXES = ("__MACOSX/",)


class ArchiveLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_entries: int = Field(default=10_000, gt=0, description="files in one archive")
    max_total_bytes: int = Field(default=1 << 30, gt=0, description="uncompressed bytes of all files")
    max_entry_bytes: int = Field(default=20 << 20, gt=0, description="uncompressed bytes of one file")
    max_ratio: float = Field(default=100.0, gt=1, description="uncompressed / compressed size, per entry and in total")


class ArchiveError(ImageInputError):
    """The archive as a whole is refused (a 400)."""

    kind = "invalid_archive"


class UnsafeArchiveError(ArchiveError):
    kind = "unsafe_archive"


class ArchiveTooLargeError(ArchiveError):
    status_code = 413
    kind = "archive_too_large"


@dataclass(frozen=True)
class Entry:
    name: str
    size: int


def _check_name(name: str) -> str | None:
    """The entry's safe relative name; None for entries we skip (directories, hidden, macOS metadata)."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"entry {name!r} has a NUL byte in its name")
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in path.parts:
        raise UnsafeArchiveError(f"entry {name!r} points outside the archive (absolute path or '..')")
    if posix.endswith("/") or posix.startswith(SKIPPED_PREFIXES) or any(p.startswith(".") for p in path.parts):
        return None
    return str(path)


class _Budget:
    def __init__(self, limits: ArchiveLimits, compressed_size: int) -> None:
        self.limits, self.compressed_size = limits, max(compressed_size, 1)
        self.entries = self.total = 0

    def take(self, name: str, size: int, compressed: int | None = None) -> None:
        limits = self.limits
        self.entries += 1
        self.total += size
        if self.entries > limits.max_entries:
            raise ArchiveTooLargeError(f"archive has more than {limits.max_entries} files")
        if size > limits.max_entry_bytes:
            raise ArchiveTooLargeError(f"entry {name!r} is {size} bytes uncompressed; at most {limits.max_entry_bytes}")
        if self.total > limits.max_total_bytes:
            raise ArchiveTooLargeError(f"archive holds more than {limits.max_total_bytes} bytes uncompressed")
        if compressed is not None and size > 1 << 20 and size / max(compressed, 1) > limits.max_ratio:
            raise UnsafeArchiveError(f"entry {name!r} expands {size / max(compressed, 1):.0f}x; refused as a "
                                     f"decompression bomb (limit {limits.max_ratio:.0f}x)")
        if self.total > 1 << 20 and self.total / self.compressed_size > limits.max_ratio:
            raise UnsafeArchiveError(f"archive expands {self.total / self.compressed_size:.0f}x; refused as a "
                                     f"decompression bomb (limit {limits.max_ratio:.0f}x)")


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with zf.open(info) as member:  # zipfile stops at the declared size and checks the CRC
            return member.read()
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as exc:  # damaged or exotic entry
        raise ImageInputError(f"archive entry {info.filename!r} cannot be read: {exc}") from exc


def _read_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        data = tf.extractfile(member)
        return data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageInputError(f"archive entry {member.name!r} cannot be read: {exc}") from exc


def _zip_entries(fh: IO[bytes], limits: ArchiveLimits, size: int, read: bool) -> Iterator[tuple[Entry, Callable[[], bytes]]]:
    with zipfile.ZipFile(fh) as zf:
        budget = _Budget(limits, size)
        infos = zf.infolist()
        for info in infos:  # everything the headers can tell is checked before a byte is inflated
            name = _check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"entry {info.filename!r} is a symbolic link")
            if name is not None and not info.is_dir():
                budget.take(info.filename, info.file_size, info.compress_size)
        if not read:
            return
        for info in infos:
            name = _check_name(info.filename)
            if name is None or info.is_dir():
                continue
            yield Entry(name, info.file_size), partial(_read_zip_member, zf, info)


def _tar_entries(fh: IO[bytes], limits: ArchiveLimits, size: int, read: bool) -> Iterator[tuple[Entry, Callable[[], bytes]]]:
    with tarfile.open(fileobj=fh, mode="r:*") as tf:  # streams; a member's size is known before its data
        budget = _Budget(limits, size)
        for member in tf:
            name = _check_name(member.name)
            if member.issym() or member.islnk():
                raise UnsafeArchiveError(f"entry {member.name!r} is a link")
            if not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(f"entry {member.name!r} is a device, FIFO or other special file")
            if name is None or member.isdir():
                continue
            budget.take(member.name, member.size)
            if read:
                yield Entry(name, member.size), partial(_read_tar_member, tf, member)


def iter_archive(fh: IO[bytes], limits: ArchiveLimits, *, read: bool = True) -> Iterator[tuple[Entry, Callable[[], bytes]]]:
    """(entry, read) for every file of a zip or tar (gz, bz2, xz); ``read=False`` only validates.

    Call ``read()`` before taking the next entry (a tar is a stream). A damaged entry's
    ``read()`` raises the input error for that entry alone.

    Raises :class:`ArchiveError` (a subclass of the project's input error) for anything refused.
    """
    fh.seek(0, 2)
    size = fh.tell()
    fh.seek(0)
    try:
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            yield from _zip_entries(fh, limits, size, read)
            return
        fh.seek(0)
        yield from _tar_entries(fh, limits, size, read)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"not a readable zip or tar archive: {exc}") from exc


def check_archive(fh: IO[bytes], limits: ArchiveLimits) -> None:
    """Validate every header without reading any entry's data (for refusing at upload time)."""
    for _ in iter_archive(fh, limits, read=False):
        pass


def score_archive(fh: IO[bytes], limits: ArchiveLimits, scorer: Scorer) -> Iterator[Row]:
    """One row per file of the archive, in archive order (the HTTP batch task's job)."""
    entries = iter_archive(fh, limits)
    return scorer.score_sources((i, entry.name, read) for i, (entry, read) in enumerate(entries))
