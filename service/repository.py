"""The model repository: versions, aliases, verification; on disk here, in object storage in ``objectstore``.

    <root>/<name>/<version>/{model.onnx, manifest.json, labels.txt, MODEL_CARD.md, ...}
    <root>/<name>/aliases.json     {"production": 3, "previous": 2}   (service.aliases)

A version is built in a hidden staging directory and renamed into place, so a
loader sees a complete version or none. Reading verifies the manifest schema
and the sha256 of every file; a version that fails is never served.

:class:`Repository` holds what every repository shares (resolving a version, the alias rules);
:class:`ModelRepository` is a local folder; :func:`open_repository` picks one for a path or a URL.
"""

from __future__ import annotations

import abc
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
from typing import Any, Literal

from pydantic import ValidationError

from service import aliases as rules
from service.aliases import PREVIOUS, PRODUCTION, AliasDocument, AliasError, Rollout
from service.atomic import atomic_write_json, atomic_write_text, current_umask, file_lock, fsync_dir
from service.manifest import FileEntry, Manifest, validate_name
from service.urls import is_url

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
ALIASES = "aliases.json"


class RepositoryError(Exception):
    """Base for repository problems; messages say what to do."""


class ModelNotFoundError(RepositoryError, LookupError):
    pass


class VerificationError(RepositoryError):
    """A version on disk does not match its manifest (tampered, truncated, wrong schema)."""


class StoreUnavailableError(RepositoryError):
    """The object store behind a repository could not be reached or failed; nothing was changed."""


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
    path: Path  # a local folder: the repository's own, or an object store's verified cache

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


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


def stage_version(staging: Path, name: str, version: int, write: Callable[[Path, int], Manifest]) -> Manifest:
    """``write`` fills ``staging``; every file is hashed into the manifest, which is written last and checked."""
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
    verify_dir(staging)
    return manifest


def copy_writer(source: Path, **changes: Any) -> Callable[[Path, int], Manifest]:
    """A ``write`` for :meth:`Repository.add_version` that publishes the version folder ``source`` again:
    into another repository (a local folder to a bucket), or as a new version of the same model (a
    stand-in for a retrained one); its manifest is carried over with ``changes``."""
    manifest = Manifest.model_validate_json((source / MANIFEST).read_text())

    def write(staging: Path, version: int) -> Manifest:
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name != MANIFEST:
                shutil.copyfile(file, staging / file.name)
        return manifest.model_copy(update={"version": version, "files": {}, **changes})

    return write


class Repository(abc.ABC):
    """What every model repository does; subclasses say where versions and aliases live.

    ``root`` is always a local folder: the repository itself, or the verified cache of an object store
    (the pipeline keeps its run records there too). ``unreachable`` says why the store behind the last
    read could not be reached (None: it could, or there is no store: a local folder).
    """

    root: Path
    location: str  # what messages call the repository: its folder or its URL
    unreachable: str | None = None

    # --- what a subclass provides ----------------------------------------------------------------------
    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def versions(self, name: str) -> list[int]: ...

    @abc.abstractmethod
    def alias_document(self, name: str) -> AliasDocument:
        """aliases.json as it is now (``{}`` when the model has none); RepositoryError when unreadable."""

    @abc.abstractmethod
    def get(self, name: str, version: int | None = None, *, verify: bool = True) -> ModelVersion: ...

    @abc.abstractmethod
    def add_version(self, name: str, write: Callable[[Path, int], Manifest]) -> ModelVersion:
        """Build a version with ``write(staging_dir, version)`` and publish it whole, or leave no trace."""

    @abc.abstractmethod
    def _change_aliases(self, name: str, change: Callable[[AliasDocument], AliasDocument]) -> AliasDocument:
        """Apply ``change`` to the current document and write the result, with no concurrent writer's
        change lost; returns what was written."""

    # --- reading ---------------------------------------------------------------------------------------
    def aliases(self, name: str) -> dict[str, int]:
        """production, previous, ...: alias -> version (without the rollout)."""
        return rules.versions(self.alias_document(name))

    def rollout(self, name: str) -> Rollout | None:
        """The candidate on trial beside production, if any."""
        return rules.rollout(self.alias_document(name))

    def resolve(self, name: str, version: int | None = None) -> int:
        """An explicit version, else production, else an error that lists what exists."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"no model named {name!r} in {self.location} (found: {self.names() or 'none'})")
        if version is None:
            version = self.aliases(name).get(PRODUCTION)
            if version is None:
                raise ModelNotFoundError(f"model {name!r} has no production version; promote one of {versions}")
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version} (found: {versions})")
        return version

    # --- the alias rules (service.aliases), the same for every repository ----------------------------
    def _apply(self, name: str, change: Callable[[AliasDocument], AliasDocument]) -> AliasDocument:
        try:
            return self._change_aliases(validate_name(name), change)
        except AliasError as exc:
            raise RepositoryError(str(exc)) from None

    def promote(self, name: str, version: int) -> dict[str, int]:
        """Make ``version`` production (verified first); the old production becomes previous."""
        self.get(name, version)
        new = rules.versions(self._apply(name, lambda doc: rules.promoted(doc, version)))
        log.info("%s: production -> %d", name, version)
        return new

    def demote(self, name: str) -> dict[str, int]:
        """Remove the production alias: undoes a model's first promotion, when there is no previous one."""
        new = rules.versions(self._apply(name, rules.demoted))
        log.info("%s: production alias removed", name)
        return new

    def rollback(self, name: str) -> dict[str, int]:
        """Swap production and previous (previous verified first)."""
        previous = self.aliases(name).get(PREVIOUS)
        if previous is not None:
            self.get(name, previous)
        new = rules.versions(self._apply(name, lambda doc: rules.rolled_back(doc, name)))
        log.info("%s: rolled back, production -> %d", name, new[PRODUCTION])
        return new

    def start_rollout(self, name: str, version: int, mode: Literal["canary", "shadow"], weight: float) -> AliasDocument:
        """Put ``version`` (verified first) on trial beside production: see :class:`Rollout`."""
        try:
            trial = Rollout(version=version, mode=mode, weight=weight)
        except ValidationError as exc:
            raise RepositoryError(f"invalid rollout: {exc.errors()[0]['msg']}") from None
        self.get(name, version)
        new = self._apply(name, lambda doc: rules.trial_started(doc, name, trial))
        log.info("%s: %s of version %d at weight %g", name, mode, version, weight)
        return new

    def end_rollout(self, name: str) -> AliasDocument:
        """No candidate any more: replicas stop the canary or the shadow on their next poll."""
        new = self._apply(name, rules.trial_ended)
        log.info("%s: rollout ended", name)
        return new


class ModelRepository(Repository):
    """A repository in a local folder (a volume several replicas may share)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

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

    def alias_document(self, name: str) -> AliasDocument:
        path = self.root / validate_name(name) / ALIASES
        if not path.is_file():
            return {}
        try:
            return rules.parse(json.loads(path.read_text()), str(path))
        except (ValueError, OSError) as exc:  # AliasError is a ValueError
            raise RepositoryError(str(exc) if isinstance(exc, AliasError) else
                                  f"{path} is not a valid alias file: {exc}") from exc

    def get(self, name: str, version: int | None = None, *, verify: bool = True) -> ModelVersion:
        version = self.resolve(name, version)
        path = self.root / name / str(version)
        manifest = verify_dir(path) if verify else Manifest.model_validate_json((path / MANIFEST).read_text())
        if (manifest.name, manifest.version) != (name, version):
            raise VerificationError(f"{path}: manifest says {manifest.name}:{manifest.version}")
        return ModelVersion(manifest, path)

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
                manifest = stage_version(staging, name, version, write)
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

    def _change_aliases(self, name: str, change: Callable[[AliasDocument], AliasDocument]) -> AliasDocument:
        with self._locked(name) as folder:
            new = change(self.alias_document(name))
            atomic_write_json(folder / ALIASES, new)
        return new


def open_repository(location: str | os.PathLike[str], cache: Path | None = None,
                    writes: Literal["auto", "conditional", "lock"] = "auto") -> Repository:
    """The repository at a local path, or at an fsspec URL (``s3://bucket/prefix``) read through a local
    verified ``cache`` (default: one folder per URL under the user's cache); ``writes`` is how an object
    store's writers exclude each other (``service.objectstore``)."""
    text = os.fspath(location)
    if not is_url(text):
        return ModelRepository(text.removeprefix("file://"))
    # Imported only for a URL: it needs fsspec and the store's package.
    from service.objectstore import ObjectRepository

    return ObjectRepository(text, cache, writes=writes)
