"""Helpers the test modules share; test modules import these, never each other or ``conftest``.

- ``images``: real image files and hand-built headers (bombs, ICC profiles, orientations, digits).
- ``mutations``: structure-aware mutations of real image files, for fuzzing.
- ``diskfaults``: fail or SIGKILL at the k-th file-system step (also runs as a script).
- ``servers``: repository copies, `imgclf serve` subprocesses and the requests tests send them.
- ``cli``: the `imgclf` command as a subprocess.
- ``seaweed``: a real S3 object store (SeaweedFS) on free ports, to stop, kill (an outage) and restart.
- ``budget``: bounds on work in CPU seconds, which hold on a busy machine (never wall-clock bounds).
- ``browser``, ``container``, ``manifests``: Chromium, the serving image under podman, deploy/kubernetes/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the working directory of every subprocess the tests start."""


def unavailable(message: str) -> NoReturn:
    """A tool the tests need is missing: skip with ``message`` (how to install it), but fail under
    ``CI=true``, where .ci/run installs it and a skip would hide a broken set-up."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: the tests needing it must run. {message}", pytrace=False)
    pytest.skip(message)
