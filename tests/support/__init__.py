"""Helpers the test modules share; test modules import these, never each other or ``conftest``.

- ``images``: real image files and hand-built headers (bombs, ICC profiles, orientations, digits).
- ``mutations``: structure-aware mutations of real image files, for fuzzing.
- ``diskfaults``: fail or SIGKILL at the k-th file-system step (also runs as a script).
- ``servers``: repository copies, `imgclf serve` subprocesses and the requests tests send them.
- ``cli``: the `imgclf` command as a subprocess.
- ``budget``: bounds on work in CPU seconds, which hold on a busy machine (never wall-clock bounds).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the working directory of every subprocess the tests start."""
