"""A model repository in object storage (``s3://bucket/prefix``, any fsspec URL), read through a local cache.

The layout and manifests are the local repository's. Readers download a version into the cache
(``<cache>/<name>/<version>/``), check every file against the manifest's sha256 and only then rename
it into place, so a replica serves verified files only, and keeps serving them from its cache when
the store is unreachable (``Repository.unreachable`` says why; aliases fall back to the copy the
last successful read left in the cache).

Writers publish a version's files first and its manifest last, so a reader never lists half a version
(a version is a folder with a ``manifest.json``). Writers exclude each other (``service.store_writes``)
with conditional puts: a version number is claimed by creating ``<name>/<v>/.claim`` only if absent,
and aliases.json is replaced only if its ETag is still the one read, else re-read and the change
applied again; or, on stores without them, under the lock object ``<name>/.lock``. Credentials come from the store package's usual places (for S3: the AWS_*
variables, ``~/.aws``, instance roles); none is ever logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from service import aliases as rules
from service.aliases import AliasDocument
from service.atomic import atomic_write_json, file_lock, fsync_dir
from service.manifest import Manifest, validate_name
from service.repository import (
    ALIASES,
    MANIFEST,
    ModelRepository,
    ModelVersion,
    Repository,
    RepositoryError,
    StoreUnavailableError,
    VerificationError,
    stage_version,
    verify_dir,
)
from service.store_writes import Conflict, StoreWriter
from service.urls import UnusableUrlError, filesystem, url_key, user_cache

log = logging.getLogger(__name__)
T = TypeVar("T")

CLAIM, LOCK = ".claim", ".lock"
ALIAS_RETRIES = 50
class ObjectRepository(Repository):
    def __init__(self, url: str, cache: Path | None = None,
                 writes: Literal["auto", "conditional", "lock"] = "auto") -> None:
        self.location = url.rstrip("/")
        try:
            self.fs, base = filesystem(self.location, listings_cache=False)  # replicas poll: never a stale listing
        except UnusableUrlError as exc:
            raise RepositoryError(f"cannot open the model repository {exc}") from exc
        self.base = base.rstrip("/")
        self.root = Path(cache) if cache is not None else user_cache("repositories", url_key(self.location))
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache = ModelRepository(self.root)
        self.unreachable: str | None = None
        self.writer = StoreWriter(self.fs, self.base, self.location, writes, self._call)

    # --- talking to the store --------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One store operation; FileNotFoundError passes, anything else is the store's failure."""
        try:
            result = fn(*args, **kwargs)
        except FileNotFoundError:
            self.unreachable = None
            raise
        except Exception as exc:
            self.unreachable = f"{type(exc).__name__}: {exc}"
            raise StoreUnavailableError(f"{self.location}: cannot {what}: {self.unreachable}") from exc
        self.unreachable = None
        return result

    def _offline(self, exc: StoreUnavailableError, what: str) -> None:
        log.warning("%s; using the cache's %s (%s)", exc, what, self.root)

    # --- reading -----------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        try:
            entries = self._call("list the models", self.fs.ls, self.base, detail=False)
        except FileNotFoundError:
            return []
        except StoreUnavailableError as exc:
            self._offline(exc, "models")
            return self.cache.names()
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return sorted(n for n in names if not n.startswith(".") and self._valid(n))

    @staticmethod
    def _valid(name: str) -> bool:
        try:
            validate_name(name)
        except ValueError:
            return False
        return True

    def versions(self, name: str) -> list[int]:
        """Versions whose manifest is in the store: a version still being written has none yet."""
        pattern = self._key(validate_name(name), "*", MANIFEST)
        try:
            found = self._call("list the versions", self.fs.glob, pattern)
        except FileNotFoundError:
            return []
        except StoreUnavailableError as exc:
            self._offline(exc, "versions")
            return self.cache.versions(name)
        numbers = (path.rstrip("/").split("/")[-2] for path in found)
        return sorted(int(n) for n in numbers if n.isdigit())

    def _read_aliases(self, name: str) -> tuple[AliasDocument, str | None]:
        """The document and its ETag (None: no aliases.json yet). The ETag is read first: a change
        between the two reads then fails the conditional put instead of being overwritten."""
        key = self._key(validate_name(name), ALIASES)
        try:
            etag = self._call("read the aliases", self.fs.info, key).get("ETag")
            data = self._call("read the aliases", self.fs.cat_file, key)
        except FileNotFoundError:
            return {}, None
        try:
            return rules.parse(json.loads(data), f"{self.location}/{name}/{ALIASES}"), etag
        except ValueError as exc:
            raise RepositoryError(str(exc)) from exc

    def alias_document(self, name: str) -> AliasDocument:
        try:
            document, _ = self._read_aliases(name)
        except StoreUnavailableError as exc:
            self._offline(exc, "aliases")
            return self.cache.alias_document(name)
        self._remember(name, document)
        return document

    def _remember(self, name: str, document: AliasDocument) -> None:
        """Keep the aliases last read, for a restart while the store is away."""
        if self.cache.alias_document(name) != document:
            atomic_write_json(self.root / name / ALIASES, document)

    def get(self, name: str, version: int | None = None, *, verify: bool = True) -> ModelVersion:
        """The version from the cache, downloaded and verified first when it is not there (or not intact).
        A version the store holds only in part, or whose files do not match, raises VerificationError."""
        version = self.resolve(name, version)
        local = self.root / name / str(version)
        with file_lock(self.root / name / LOCK):  # one download per cache, whatever the workers
            if local.is_dir():
                try:
                    return self._checked(local, name, version)
                except VerificationError as exc:
                    log.warning("cached %s:%d is not intact (%s); downloading it again", name, version, exc)
                    shutil.rmtree(local)
            self._download(name, version, local)
        return self._checked(local, name, version)

    @staticmethod
    def _checked(path: Path, name: str, version: int) -> ModelVersion:
        manifest = verify_dir(path)
        if (manifest.name, manifest.version) != (name, version):
            raise VerificationError(f"{path}: manifest says {manifest.name}:{manifest.version}")
        return ModelVersion(manifest, path)

    def _download(self, name: str, version: int, dest: Path) -> None:
        remote = self._key(name, str(version))
        where = f"{self.location}/{name}/{version}"
        try:
            text = self._call("read a manifest", self.fs.cat_file, f"{remote}/{MANIFEST}")
            manifest = Manifest.model_validate_json(text)
        except FileNotFoundError:
            raise VerificationError(f"{where}: no {MANIFEST} (a version still being written, or deleted)") from None
        except ValidationError as exc:
            raise VerificationError(f"{where}: {MANIFEST} does not match schema: {exc}") from exc
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
        try:
            for file in manifest.files:
                if Path(file).name != file or file == MANIFEST:
                    raise VerificationError(f"{where}: {MANIFEST} lists {file!r}, not a file name")
                try:
                    self._call("download", self.fs.get_file, f"{remote}/{file}", str(staging / file))
                except FileNotFoundError:
                    raise VerificationError(f"{where}: listed file {file!r} is missing in the store") from None
            (staging / MANIFEST).write_bytes(text)
            try:
                self._checked(staging, name, version)  # sha256 of every file, before anything may load it
            except VerificationError as exc:  # named by where the files came from, not the hidden folder
                raise VerificationError(f"{where}: {str(exc).removeprefix(f'{staging}: ')}") from None
            os.rename(staging, dest)
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("downloaded and verified %s into %s", where, dest)

    # --- writing -----------------------------------------------------------------------------------------
    def add_version(self, name: str, write: Callable[[Path, int], Manifest]) -> ModelVersion:
        """Stage and check locally, claim a version number, upload the files, then the manifest."""
        folder = self.root / validate_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        with self.writer.exclusive(self._key(name, LOCK)):
            version = self._claim(name)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            try:
                manifest = stage_version(staging, name, version, write)
                remote = self._key(name, str(version))
                for path in sorted(staging.iterdir()):
                    if path.name != MANIFEST:
                        self._call("upload", self.fs.put_file, str(path), f"{remote}/{path.name}")
                self.writer.put(f"{remote}/{MANIFEST}", (staging / MANIFEST).read_bytes(), if_absent=True)
                shutil.rmtree(folder / str(version), ignore_errors=True)
                os.rename(staging, folder / str(version))  # the cache holds what was just published
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        log.info("registered %s:%d in %s", name, version, self.location)
        return ModelVersion(manifest, folder / str(version))

    def _claim(self, name: str) -> int:
        """The next free version number, claimed: a crashed publisher's number is never reused."""
        try:
            entries = self._call("list the versions", self.fs.ls, self._key(name), detail=False)
        except FileNotFoundError:
            entries = []
        taken = [int(n) for n in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if n.isdigit()]
        version = max(taken, default=0) + 1
        token = json.dumps({"claimed_at": time.time(), "by": uuid.uuid4().hex}).encode()
        while True:
            try:
                self.writer.put(self._key(name, str(version), CLAIM), token, if_absent=True)
                return version
            except Conflict:
                version += 1

    def _change_aliases(self, name: str, change: Callable[[AliasDocument], AliasDocument]) -> AliasDocument:
        key = self._key(name, ALIASES)
        if not self.writer.conditional():
            with self.writer.exclusive(self._key(name, LOCK)):
                new = change(self._read_aliases(name)[0])
                self.writer.put(key, json.dumps(new, indent=2).encode())
            self._remember(name, new)
            return new
        for _ in range(ALIAS_RETRIES):
            current, etag = self._read_aliases(name)
            new = change(current)
            try:
                self.writer.put(key, json.dumps(new, indent=2).encode(), if_absent=etag is None, if_match=etag)
            except Conflict:
                time.sleep(random.uniform(0.01, 0.1))  # another writer won: apply the change to theirs
                continue
            self._remember(name, new)
            return new
        raise RepositoryError(f"{self.location}/{name}/{ALIASES} kept changing under {ALIAS_RETRIES} attempts; "
                              "is a writer looping?")

