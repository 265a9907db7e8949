"""Where a job's output goes: a local file, or an object-store URL (``s3://bucket/prefix/out.jsonl``).

A URL's job is written locally first, exactly as a local job: its state directory and the finished
file live in a staging folder under the user's cache, named by a hash of the URL
(``$XDG_CACHE_HOME/imgclf/batch/<sha>/``), where ``--resume`` finds them again. The finished file
is then uploaded with one put. Object stores make a put visible whole or not at all (S3, GCS, Azure;
s3fs turns a large file into a multipart upload, which appears only once completed), so a kill at any
moment leaves at the URL nothing, the previous output, or the whole new one; never half a file.

``--overwrite`` leaves a URL's previous output in place until that put replaces it: readers keep a
complete output throughout. fsspec and the store's package (s3fs for ``s3://``) load only here, and
only for URLs: the serving side never imports them.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

from service.urls import UnusableUrlError, filesystem, is_url, url_key, user_cache

log = logging.getLogger(__name__)

class OutputError(ValueError):
    """The output location is unusable: no file name, or the store's package is not installed."""


class Output:
    """A local output file: the job writes it in place (``job_state`` renames it there when complete)."""

    replaced_by_publish = False  # an existing output is in the way unless the job is past its final rename

    def __init__(self, path: Path) -> None:
        self.location: Path | str = path
        self.local = path  # where the job's state directory and finished file are written

    def exists(self) -> bool:
        return self.local.exists()

    def discard(self) -> None:
        """``--overwrite``: remove the previous output."""
        self.local.unlink(missing_ok=True)

    def publish(self) -> None:
        """Make the finished file at :attr:`local` the output (nothing to do: it is already)."""

    def clean_up(self) -> None:
        """Drop what :meth:`publish` no longer needs (nothing, for a local output)."""


class RemoteOutput(Output):
    """An output at an fsspec URL, staged in the user's cache and uploaded in one put."""

    replaced_by_publish = True  # the previous output stays readable until the final put replaces it

    def __init__(self, url: str) -> None:
        name = PurePosixPath(url.split("://", 1)[1]).name
        if not name or url.endswith("/"):
            raise OutputError(f"--out {url} must name a file (e.g. {url.rstrip('/')}/scores.jsonl)")
        self.location = url
        self.local = staging_dir(url) / name
        self._fs, self._path = _filesystem(url)

    def exists(self) -> bool:
        self._fs.invalidate_cache()  # a listing cached by an earlier call may be stale
        return bool(self._fs.exists(self._path))

    def discard(self) -> None:
        """``--overwrite``: drop a staged file of an earlier job; the URL keeps its output until the put."""
        self.local.unlink(missing_ok=True)

    def publish(self) -> None:
        """Upload the finished file in one put (idempotent: a resumed job may put the same bytes again)."""
        size = self.local.stat().st_size
        try:
            self._fs.put_file(str(self.local), self._path)
        except Exception as exc:  # s3fs, gcsfs, ... raise their own types; each means "not uploaded"
            raise OutputError(f"cannot upload the finished output to {self.location}: {exc}; it is kept in "
                              f"{self.local}: rerun with --resume to upload it again") from exc
        log.info("uploaded %d bytes to %s", size, self.location)

    def clean_up(self) -> None:
        self.local.unlink(missing_ok=True)
        try:
            self.local.parent.rmdir()
        except OSError:
            pass  # not empty: something else of the user's is in there; leave it


def staging_dir(url: str) -> Path:
    """The local folder of a URL's job: under ``$XDG_CACHE_HOME`` (default ``~/.cache``), one per URL."""
    return user_cache("batch", url_key(url))


def open_output(out: Path | str) -> Output:
    """The output ``--out`` names; ``file://`` URLs are local paths (a local rename is atomic, a copy is not)."""
    if isinstance(out, str) and out.startswith("file://"):
        return Output(Path(out.removeprefix("file://")))
    if isinstance(out, str) and is_url(out):
        return RemoteOutput(out)
    return Output(Path(out))


def _filesystem(url: str) -> tuple[Any, str]:  # fsspec is untyped
    try:
        return filesystem(url)
    except UnusableUrlError as exc:
        raise OutputError(f"cannot write {exc}") from exc
