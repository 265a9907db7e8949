"""fsspec URLs, handled one way everywhere: what is a URL, the filesystem behind one, the user's cache.

The model repository (``service.objectstore``) and batch jobs (inputs and outputs) all reach object
storage through :func:`filesystem`: fsspec and the store's package (s3fs for ``s3://``, an optional
extra) are imported only when a URL is used, and a missing package says how to install it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# Fail in seconds when the store is down (botocore's defaults retry for minutes): callers report it and
# keep what they have (a repository its cache, a batch job its local state).
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 3, "read_timeout": 60, "retries": {"max_attempts": 2}}}


class UnusableUrlError(ValueError):
    """A URL whose protocol's package is missing, or that fsspec cannot parse; says what to install."""


def is_url(location: str | os.PathLike[str]) -> bool:
    """An fsspec URL other than ``file://`` (a local path: renames there are atomic, copies are not)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str, *, listings_cache: bool = True) -> tuple[Any, str]:  # fsspec is untyped
    """The fsspec filesystem and path of ``url``; ``listings_cache=False`` for callers that poll."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {"skip_instance_cache": True}
    if not listings_cache:
        options["use_listings_cache"] = False
    if protocol in ("s3", "s3a"):
        options |= S3_OPTIONS
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise UnusableUrlError(f"{url}: the package for {protocol}:// is missing (for S3: "
                               f"pip install 'imgclf[s3]'): {exc}") from exc
    except ValueError as exc:
        raise UnusableUrlError(f"{url}: {exc}") from exc
    if hasattr(fs, "retries"):
        fs.retries = 2  # s3fs retries on its own too: keep a dead store's answer to seconds
    return fs, path


def user_cache(*parts: str) -> Path:
    """A folder under ``$XDG_CACHE_HOME`` (default ``~/.cache``)/imgclf."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base.joinpath("imgclf", *parts)


def url_key(url: str) -> str:
    """A short stable name for a URL's local folder."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]
