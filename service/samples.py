"""The sample store: images a service answered, kept byte for byte to be reviewed and trained on.

Layout under ``IMGCLF_SAMPLE_DIR``::

    usage.json                    bytes and files kept, and the counters of samples not kept
    samples/ab/<sha256>.<ext>     the exact bytes received (the extension says the sniffed format)
    samples/ab/<sha256>.json      one JSON line: time, model, version, top-k, confident, sha256, ...

Every file is written with ``service.atomic`` (temporary file, fsync, rename, fsync of the folder),
the image first and its JSON line last: the line is what commits a sample, so a process killed at
any point leaves either a whole sample, an image nobody lists (written again by the next request
with the same bytes), or a hidden temporary file that the next write in that folder removes. Workers
share the store under one file lock, which makes the disk cap hold across them.

The same bytes are kept once (the first answer's line). :func:`export_review` writes the review tree
that ``imgclf samples export`` gives a person to correct and ``imgclf pipeline --data`` takes back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from service.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    fsync_dir,
    remove_debris,
)

log = logging.getLogger(__name__)

SAMPLES, USAGE, LOCK = "samples", "usage.json", ".lock"
NOT_CONFIDENT = "_not_confident"  # the review tree's folder of answers under the threshold
NEAR_CAP = 0.9  # past this share of the cap only non-confident answers are kept: they are worth labelling
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff",
              "AVIF": ".avif", "HEIF": ".heic"}
Outcome = Literal["kept", "duplicate", "cap", "near_cap"]


class SampleStore:
    """One sample directory (several workers may write to it at once)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _paths(self, sha256: str, fmt: str | None) -> tuple[Path, Path]:
        folder = self.root / SAMPLES / sha256[:2]
        return folder / f"{sha256}{EXTENSIONS.get(fmt or '', '.bin')}", folder / f"{sha256}.json"

    # --- writing ---------------------------------------------------------------------------------------
    def write(self, data: bytes, record: dict[str, Any], *, max_bytes: int, confident: bool | None) -> Outcome:
        """Keep ``data`` with its JSON line unless that would pass the cap (or come near it while the
        answer is confident); returns what happened. ``record`` gets ``sha256``, ``bytes`` and ``file``."""
        sha256 = hashlib.sha256(data).hexdigest()
        image, line_path = self._paths(sha256, record.get("format"))
        record = {**record, "sha256": sha256, "bytes": len(data), "file": str(image.relative_to(self.root))}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        size = len(data) + len(line.encode())
        with file_lock(self.root / LOCK):
            usage = self.usage()
            if line_path.exists():
                return self._count(usage, "duplicate")
            if usage["bytes"] + size > max_bytes:
                return self._count(usage, "cap")
            if usage["bytes"] + size > NEAR_CAP * max_bytes and confident is not False:
                return self._count(usage, "near_cap")
            atomic_write_bytes(image, data)
            atomic_write_text(line_path, line)  # last: it commits the sample
            fsync_dir(image.parent)  # the renames themselves survive a power cut
            usage["bytes"] += size
            usage["files"] += 1
            atomic_write_json(self.root / USAGE, usage)
        return "kept"

    def _count(self, usage: dict[str, Any], outcome: Outcome) -> Outcome:
        """The only write a sample not kept makes: its counter."""
        usage["not_kept"][outcome] = usage["not_kept"].get(outcome, 0) + 1
        atomic_write_json(self.root / USAGE, usage)
        return outcome

    def usage(self) -> dict[str, Any]:
        """Bytes and files kept, and the counters; rebuilt from the files when usage.json is missing or bad."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            usage = json.loads((self.root / USAGE).read_text())
            if isinstance(usage["bytes"], int) and isinstance(usage["files"], int) and isinstance(
                    usage["not_kept"], dict):
                return usage
        return {"bytes": self.disk_bytes(), "files": sum(1 for _ in self._lines()), "not_kept": {}}

    def disk_bytes(self) -> int:
        """What the samples take on disk now (images without a line included), read from the files."""
        total = 0
        for folder in self._folders():
            with contextlib.suppress(OSError):
                total += sum(e.stat().st_size for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
        return total

    def clean(self) -> dict[str, int]:
        """Remove interrupted writes: temporary files of dead processes and images without a line."""
        debris = orphans = 0
        with file_lock(self.root / LOCK):
            debris += len(remove_debris(self.root))  # usage.json's
            for folder in self._folders():
                debris += len(remove_debris(folder))
                lines = {p.stem for p in folder.glob("*.json")}
                for path in folder.iterdir():
                    if path.suffix != ".json" and not path.name.startswith(".") and path.stem not in lines:
                        path.unlink(missing_ok=True)
                        orphans += 1
            if debris or orphans:
                (self.root / USAGE).unlink(missing_ok=True)  # rebuilt from the files on next read
        return {"temporary": debris, "without_line": orphans}

    # --- reading ---------------------------------------------------------------------------------------
    def _folders(self) -> list[Path]:
        base = self.root / SAMPLES
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def _lines(self) -> Iterator[Path]:
        for folder in self._folders():
            yield from sorted(folder.glob("*.json"))

    def records(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every kept sample's JSON line (of ``model``), oldest first."""
        out = []
        for path in self._lines():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("skipping unreadable sample line %s", path)
                continue
            if model is None or record.get("model") == model:
                out.append(record)
        return sorted(out, key=lambda r: (str(r.get("time")), str(r.get("sha256"))))

    def read(self, record: dict[str, Any]) -> bytes:
        """A sample's bytes, checked against its sha256 (ValueError if they differ)."""
        data = (self.root / record["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ValueError(f"{record['file']} does not match its sha256")
        return data


def review_folder(record: dict[str, Any]) -> str:
    """Where a sample goes in the review tree: its top-1 label, or ``_not_confident``."""
    if record.get("confident") is False:
        return NOT_CONFIDENT
    label = str(record["top_k"][0]["label"]).replace(os.sep, "_").lstrip(".") or "_unnamed"
    return label


def export_review(store: SampleStore, out: str | os.PathLike[str], model: str | None = None) -> dict[str, int]:
    """One folder per predicted label plus ``_not_confident/``: a person corrects it by moving files
    between folders (and out of ``_not_confident/``), then ``imgclf pipeline --data`` merges it.

    Files are named by the first 16 hex digits of their sha256, so a re-export adds only new samples;
    ``_samples.jsonl`` lists the exported lines. Returns how many files each folder received.
    """
    out = Path(out)
    records = store.records(model)
    if store.root.resolve() in (out.resolve(), *out.resolve().parents):
        raise ValueError(f"the review tree {out} must not be inside the sample directory {store.root}")
    counts: Counter[str] = Counter()
    present = {p.name for p in out.rglob("*") if p.is_file()} if out.is_dir() else set()
    for record in records:
        name = record["sha256"][:16] + Path(record["file"]).suffix
        if name in present:  # already exported (and perhaps moved by the reviewer): leave it
            continue
        atomic_write_bytes(out / review_folder(record) / name, store.read(record))
        counts[review_folder(record)] += 1
    atomic_write_text(out / "_samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return dict(sorted(counts.items()))
