"""The `imgclf` command as a user runs it: a real subprocess in the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
