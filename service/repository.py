"""The model repository on disk: versions, aliases, atomic writes, verification.

    <root>/<name>/<version>/{model.onnx, manifest.json, labels.txt, MODEL_CARD.md, ...}
    <root>/<name>/aliases.json     {"production": 3, "previous": 2}

A version is built in a hidden staging directory and renamed into place, so a
loader sees a complete version or none. Reading verifies the manifest schema
and the sha256 of every file; a version that fails is never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.atomic import atomic_write_json, atomic_write_text, current_umask, file_lock, fsync_dir
from service.manifest import FileEntry, Manifest, validate_name

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
ALIASES = "aliases.json"
PRODUCTION, PREVIOUS = "production", "previous"


class RepositoryError(Exception):
    """Base for repository problems; messages say what to do."""


class ModelNotFoundError(RepositoryError, LookupError):
    pass


class VerificationError(RepositoryError):
    """A version on disk does not match its manifest (tampered, truncated, wrong schema)."""


@dataclass(frozen=True)
class ModelRef:
    """``name`` or ``name:version``, validated: no path can hide in either part."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.partition(":")
        validate_name(name)
        if not sep:
            return cls(name)
        if not version.isdigit() or not version.isascii() or int(version) < 1:
            raise ValueError(f"invalid model version {version!r}: expected a positive integer")
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    manifest: Manifest
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


class ModelRepository:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # --- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        folder = self.root / validate_name(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def aliases(self, name: str) -> dict[str, int]:
        path = self.root / validate_name(name) / ALIASES
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{path} is not a valid alias file: {exc}") from exc

    def resolve(self, name: str, version: int | None = None) -> int:
        """An explicit version, else production, else an error that lists what exists."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"no model named {name!r} in {self.root} (found: {self.names() or 'none'})")
        if version is None:
            version = self.aliases(name).get(PRODUCTION)
            if version is None:
                raise ModelNotFoundError(f"model {name!r} has no production version; promote one of {versions}")
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version} (found: {versions})")
        return version

    def get(self, name: str, version: int | None = None, *, verify: bool = True) -> ModelVersion:
        version = self.resolve(name, version)
        path = self.root / name / str(version)
        manifest = self.verify_dir(path) if verify else Manifest.model_validate_json((path / MANIFEST).read_text())
        if (manifest.name, manifest.version) != (name, version):
            raise VerificationError(f"{path}: manifest says {manifest.name}:{manifest.version}")
        return ModelVersion(manifest, path)

    @staticmethod
    def verify_dir(path: Path) -> Manifest:
        """Schema and sha256 of every listed file; raises VerificationError with the reason."""
        try:
            manifest = Manifest.model_validate_json((path / MANIFEST).read_text())
        except OSError as exc:
            raise VerificationError(f"{path}: cannot read {MANIFEST}: {exc}") from exc
        except ValidationError as exc:
            raise VerificationError(f"{path}: {MANIFEST} does not match schema: {exc}") from exc
        for listed in (MODEL_FILE, *(variant.file for variant in manifest.variants)):
            if listed not in manifest.files:
                raise VerificationError(f"{path}: {MANIFEST} does not list {listed} in files")
        for name, entry in manifest.files.items():
            file = path / name
            if Path(name).name != name or not file.is_file():
                raise VerificationError(f"{path}: listed file {name!r} is missing")
            if file.stat().st_size != entry.size or sha256_file(file) != entry.sha256:
                raise VerificationError(f"{path}: {name} does not match its sha256 in {MANIFEST} (tampered or corrupt)")
        return manifest

    # --- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        folder = self.root / validate_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / ".lock"):
            yield folder

    def add_version(self, name: str, write: Callable[[Path, int], Manifest]) -> ModelVersion:
        """Build a version with ``write(staging_dir, version)`` and publish it atomically.

        ``write`` puts its files in the staging directory and returns the manifest;
        the repository hashes every file, writes manifest.json and renames the
        directory into place. Any failure leaves no trace a loader could see.
        """
        with self._locked(name) as folder:
            for stale in folder.glob(".staging-*"):  # leftovers of a crashed write
                shutil.rmtree(stale, ignore_errors=True)
            highest_file = folder / ".highest"
            highest = int(highest_file.read_text()) if highest_file.is_file() else 0
            version = max([highest, *self.versions(name)]) + 1
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            staging.chmod(0o777 & ~current_umask())  # readable by a non-root serving user
            try:
                manifest = write(staging, version)
                files = {
                    p.name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
                    for p in sorted(staging.iterdir())
                    if p.is_file() and p.name != MANIFEST
                }
                manifest = Manifest.model_validate(manifest.model_dump() | {"files": files})
                if (manifest.name, manifest.version) != (name, version):
                    raise RepositoryError(f"manifest names {manifest.name}:{manifest.version}, not {name}:{version}")
                # Without variants the field is left out: servers older than it refuse unknown fields.
                unsaid = None if manifest.variants else {"variants"}
                atomic_write_text(staging / MANIFEST, manifest.model_dump_json(indent=2, exclude=unsaid) + "\n")
                self.verify_dir(staging)
                for p in staging.iterdir():
                    with open(p, "rb") as fh:
                        os.fsync(fh.fileno())
                fsync_dir(staging)
                atomic_write_text(highest_file, str(version))
                os.rename(staging, folder / str(version))
                fsync_dir(folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        log.info("registered %s:%d", name, version)
        return ModelVersion(manifest, folder / str(version))

    def promote(self, name: str, version: int) -> dict[str, int]:
        """Make ``version`` production (verified first); the old production becomes previous."""
        self.get(name, version)
        with self._locked(name) as folder:
            current = self.aliases(name)
            new = dict(current)
            new[PRODUCTION] = version
            if current.get(PRODUCTION) not in (None, version):
                new[PREVIOUS] = current[PRODUCTION]
            atomic_write_json(folder / ALIASES, new)
        log.info("%s: production -> %d", name, version)
        return new

    def demote(self, name: str) -> dict[str, int]:
        """Remove the production alias: undoes a model's first promotion, when there is no previous one."""
        with self._locked(name) as folder:
            new = {k: v for k, v in self.aliases(name).items() if k != PRODUCTION}
            atomic_write_json(folder / ALIASES, new)
        log.info("%s: production alias removed", name)
        return new

    def rollback(self, name: str) -> dict[str, int]:
        """Swap production and previous."""
        with self._locked(name) as folder:
            current = self.aliases(name)
            if PREVIOUS not in current:
                raise RepositoryError(f"model {name!r} has no previous version to roll back to")
            self.get(name, current[PREVIOUS])
            new = dict(current)
            new[PRODUCTION], new[PREVIOUS] = current[PREVIOUS], current[PRODUCTION]
            atomic_write_json(folder / ALIASES, new)
        log.info("%s: rolled back, production -> %d", name, new[PRODUCTION])
        return new
