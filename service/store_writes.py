"""How writers to an object store exclude each other: conditional puts, or a lock object.

- ``conditional`` (S3 stores that honour ``If-None-Match``/``If-Match`` on PutObject: AWS, SeaweedFS):
  a put of a new object succeeds only if it is absent, and a replacement only if the object's ETag is
  still the one read; a refused put raises :class:`Conflict` and the writer reads and tries again;
- ``lock`` (any other store): a lock object holding an owner token and an expiry. A writer puts it
  when absent or expired, waits ``LOCK_SETTLE_S`` for a racing writer's put to land, and holds the lock
  only if it reads its own token back. That is safe when no writer takes longer than the settle time
  between reading the lock and writing it: the assumption it rests on, for stores that offer nothing
  better.

``auto`` probes an S3 store once (a second create of a probe object must be refused) and uses
``lock`` elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal, NoReturn

from service.repository import RepositoryError, StoreUnavailableError

log = logging.getLogger(__name__)

LOCK_TTL_S, LOCK_SETTLE_S, LOCK_WAIT_S = 120.0, 0.5, 300.0
Call = Callable[..., Any]  # the repository's wrapper of a store operation: (what, fn, *args)


class Conflict(Exception):
    """A conditional put was refused: someone else wrote first."""


def _raise(exc: BaseException) -> NoReturn:
    raise exc


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional put refused (412, or 409 for a concurrent one); s3fs wraps botocore's error."""
    for err in (exc, exc.__cause__):
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return True
    return "pre-condition" in str(exc) or "precondition" in str(exc).lower()


class StoreWriter:
    """Puts, conditional where the store honours them, and the lock object where it does not."""

    def __init__(self, fs: Any, base: str, location: str, mode: Literal["auto", "conditional", "lock"],
                 call: Call) -> None:
        self.fs, self.base, self.location, self.writes = fs, base, location, mode
        self._repo_call = call  # records whether the store answered (Repository.unreachable)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        """One object, whole (S3 puts are atomic); conditionally where the store honours it. Conflict
        when the condition failed."""
        if not (if_absent or if_match) or not self.conditional():
            self._repo_call("write", self.fs.pipe_file, key, data)
            return
        bucket, path, _ = self.fs.split_path(key)
        condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, **condition)
        except Exception as exc:
            if _precondition_failed(exc):
                raise Conflict(key) from exc
            self._repo_call(f"write {key}", _raise, exc)

    def conditional(self) -> bool:
        """Whether writers use conditional puts (``writes``; ``auto``: probed once on an S3 store)."""
        if self.writes == "auto":
            self.writes = "conditional" if self._probe() else "lock"
            log.info("%s: writers exclude each other with %s", self.location,
                     "conditional puts" if self.writes == "conditional" else "a lock object")
        return self.writes == "conditional"

    def _probe(self) -> bool:
        """Whether the store refuses a second create of the same object (If-None-Match honoured)."""
        if not hasattr(self.fs, "call_s3"):
            return False
        bucket, path, _ = self.fs.split_path(f"{self.base}/.imgclf-probe-{uuid.uuid4().hex}")

        def create() -> None:
            self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=b"probe", IfNoneMatch="*")

        try:
            self._repo_call("probe conditional writes", create)
            try:
                create()
            except Exception as exc:
                if _precondition_failed(exc):
                    return True
                raise StoreUnavailableError(f"{self.location}: cannot probe conditional writes: {exc}") from exc
            return False  # the second create went through: the store ignores the condition
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm_file(f"{bucket}/{path}")

    @contextlib.contextmanager
    def exclusive(self, key: str) -> Iterator[None]:
        """The lock object, in ``lock`` mode; nothing in ``conditional`` mode (the puts exclude)."""
        if self.conditional():
            yield
            return
        token = uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT_S
        while not self._take_lock(key, token):
            if time.monotonic() > deadline:
                raise RepositoryError(f"{key} is held by another writer for over {LOCK_WAIT_S:.0f} s; if that "
                                      f"writer is dead the lock expires {LOCK_TTL_S:.0f} s after it was taken")
            time.sleep(random.uniform(0.05, 0.25))
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError, StoreUnavailableError):
                if self._lock_owner(key) == token:
                    self._repo_call("release the lock", self.fs.rm_file, key)

    def _take_lock(self, key: str, token: str) -> bool:
        owner = self._lock_owner(key)
        if owner is not None:
            return False
        self.put(key, json.dumps({"owner": token, "expires": time.time() + LOCK_TTL_S}).encode())
        time.sleep(LOCK_SETTLE_S)  # a writer racing us has put its token by now: the last put wins
        return self._lock_owner(key) == token

    def _lock_owner(self, key: str) -> str | None:
        """The lock's owner token; None when free or expired."""
        try:
            lock = json.loads(self._repo_call("read the lock", self.fs.cat_file, key))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn or foreign object: treat as free, the put-and-read-back decides
        return lock.get("owner") if lock.get("expires", 0) > time.time() else None

