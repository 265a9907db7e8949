"""The `imgclf` command as a user runs it: a real subprocess in the repository root, or in process.

A subprocess is for what only a process shows (the console script, an install without the train extra,
what gets imported); everything else runs the same Typer app in this process through Click's test
runner, which saves an interpreter and a torch import per call (about 5 s each on the 2-core machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from . import ROOT

# Runs the CLI with torch, torchvision and timm made unimportable: an install without the train extra.
WITHOUT_TRAIN_EXTRA = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'timm'): sys.modules[name] = None\n"
    "from imgclf.cli import app\n"
    "sys.argv = ['imgclf', *sys.argv[1:]]\n"
    "app()\n"
)


def imgclf(*args: str, cwd: Path | None = None, without_train: bool = False) -> subprocess.CompletedProcess[str]:
    """``imgclf ARGS`` (optionally without the train extra); the 600 s timeout only catches hangs."""
    cmd = [sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *args] if without_train else [
        sys.executable, "-m", "imgclf.cli", *args
    ]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=600, check=False)


def in_process(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``imgclf ARGS`` run in this process with no ``IMGCLF_*`` variable but ``env``; exit code, stdout and
    stderr as a subprocess would give them. A bug's exception propagates (the runner would swallow it)."""
    from imgclf.cli import app

    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("IMGCLF_")}
    result = CliRunner().invoke(app, list(args), env={**unset, **env}, catch_exceptions=False)
    return subprocess.CompletedProcess(["imgclf", *args], result.exit_code, result.stdout, result.stderr)
