"""Fault injection at the file-system calls a version write makes: fail (or die) at the k-th step.

A *step* is one call that changes the disk: ``Path.write_bytes``/``write_text``, ``os.fsync``,
``os.replace``, ``os.rename``. At step ``k`` a fault either raises (``OSError(ENOSPC)``, after
half of the bytes of a write have landed: a disk filling up mid-file) or SIGKILLs the process
(after the same half write: a crash). Counting every step and failing each one in turn covers
"interrupted at any point" without knowing the code's structure in advance.

Kept free of heavy imports so a subprocess can use it (``python tests/support/diskfaults.py``).
"""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Faults:
    """Counts steps; fails step ``fail_at`` (1-based) by raising, or by SIGKILL when ``kill``."""

    def __init__(self, fail_at: int, kill: bool = False) -> None:
        self.fail_at = fail_at
        self.kill = kill
        self.steps: list[str] = []  # what each step was, for messages

    @property
    def hit(self) -> bool:
        return len(self.steps) >= self.fail_at

    def _fail(self) -> None:
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device (injected at step {self.fail_at}: {self.steps[-1]})")

    def _step(self, what: str) -> bool:
        """Record a step; True when this one must fail."""
        self.steps.append(what)
        return len(self.steps) == self.fail_at

    @contextmanager
    def installed(self) -> Iterator[Faults]:
        """Patch the calls for the duration of the block, and restore them whatever happens."""
        originals: dict[tuple[Any, str], Any] = {}

        def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
            originals[(owner, name)] = getattr(owner, name)
            setattr(owner, name, make(originals[(owner, name)]))

        def writer(real: Callable[..., int]) -> Callable[..., int]:
            def write(path: pathlib.Path, data: Any, *args: Any, **kwargs: Any) -> int:
                if self._step(f"{real.__name__} {path.name}"):
                    real(path, data[: len(data) // 2], *args, **kwargs)  # half of it lands, then the disk is full
                    self._fail()
                return real(path, data, *args, **kwargs)
            return write

        def simple(label: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def make(real: Callable[..., Any]) -> Callable[..., Any]:
                def call(*args: Any, **kwargs: Any) -> Any:
                    if self._step(f"{label} {os.path.basename(str(args[-1])) if args else ''}".strip()):
                        self._fail()
                    return real(*args, **kwargs)
                return call
            return make

        patch(pathlib.Path, "write_bytes", writer)
        patch(pathlib.Path, "write_text", writer)
        patch(os, "fsync", simple("fsync"))
        patch(os, "replace", simple("replace"))
        patch(os, "rename", simple("rename"))
        try:
            yield self
        finally:
            for (owner, name), real in originals.items():
                setattr(owner, name, real)


def copy_writer(source: pathlib.Path) -> Callable[[pathlib.Path, int], Any]:
    """A ``write`` callback for ModelRepository.add_version that re-registers ``source``'s files."""
    from service.manifest import Manifest
    from service.repository import MANIFEST

    manifest = Manifest.model_validate_json((source / MANIFEST).read_text())

    def write(staging: pathlib.Path, version: int) -> Manifest:
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name != MANIFEST:
                (staging / file.name).write_bytes(file.read_bytes())
        return manifest.model_copy(update={"version": version, "files": {}})

    return write


def main() -> None:
    """``diskfaults.py ROOT NAME ACTION K``: run ACTION (``add`` a copy of the production version, or
    ``promote`` VERSION=int(NAME's highest)) under a SIGKILL at step K; exit 0 if it finished first."""
    from service.repository import ModelRepository

    root, name, action, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    repo = ModelRepository(root)
    if action == "add":
        source = repo.get(name).path
        with Faults(k, kill=True).installed():
            repo.add_version(name, copy_writer(source))
    elif action == "promote":
        target = repo.versions(name)[-1]
        with Faults(k, kill=True).installed():
            repo.promote(name, target)
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
