"""Expensive artifacts built once per test run, however many modules (or xdist workers) ask for them.

The bootstrapped ImageNet repository, the trust suite's digits model, the fine-tuned Lite0 run: each is
built by the first asker into a folder of this run's temporary root and reused read-only by every later
one. Under pytest-xdist the workers' temporary roots are siblings in one run folder, so a file lock
there makes the first worker build and the others wait for it (the recipe in pytest-xdist's
documentation); without xdist the run's own temporary root is used. Nothing survives into the next run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def run_root(factory: pytest.TempPathFactory) -> Path:
    """The folder every process of this pytest run shares (its basetemp, or the workers' parent)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``run_root/name``, made by ``build(folder)`` the first time any process of the run asks.

    A build that raises leaves nothing behind, so the next asker tries again (and fails the same way).
    Callers must not change the folder: copy it first.
    """
    target = run_root(factory) / "shared" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    done = target.with_name(name + ".built")  # beside, not inside: the folder holds only what build made
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            try:
                build(target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            done.touch()
    return target
