"""The peers' virtual environments, made on first use in the git-ignored ``.peers/`` folder.

Each peer gets its own venv (its dependencies conflict with the project's: PyTriton pins numpy < 2,
TorchServe brings its own stack), installed with pip from the package registries only, every step
bounded in time. A stamp records the steps that built it, so a later run reuses it as it is.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".peers"
STAMP = ".peer-stamp.json"


class PeerUnavailable(RuntimeError):
    """A peer that cannot be set up or started here; the message says why, for the results."""


def pinned(*names: str) -> list[str]:
    """``name==version`` as installed in the project's venv: the peer does the same image work with the same code."""
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


@dataclass(frozen=True)
class PeerEnv:
    name: str
    steps: list[list[str]] = field(default_factory=list)  # arguments of each ``pip install``

    @property
    def path(self) -> Path:
        return PEERS_DIR / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def ensure(self, timeout_s: float = 1800) -> Path:
        """The venv, created (or completed) when its stamp does not list these steps; at most ``timeout_s``."""
        stamp = self.path / STAMP
        wanted = {"python": sys.version.split()[0], "steps": self.steps}
        if stamp.exists() and json.loads(stamp.read_text()) == wanted:
            return self.path
        deadline = time.monotonic() + timeout_s
        if self.path.exists() and not self.python.exists():
            shutil.rmtree(self.path)
        if not self.python.exists():
            log.warning("creating %s (once; later runs reuse it)", self.path)
            _run([sys.executable, "-m", "venv", str(self.path)], deadline, f"python -m venv {self.path}")
        for args in self.steps:
            log.warning("%s: pip install %s", self.name, " ".join(args))
            _run([str(self.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                 deadline, f"pip install {' '.join(args)}")
        stamp.write_text(json.dumps(wanted))
        return self.path


def _run(cmd: list[str], deadline: float, what: str) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PeerUnavailable(f"setting up took too long; stopped before {what}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=left, check=False,
                             start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"{what} did not finish within the set-up time limit") from exc
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "is ignored" not in line]
        raise PeerUnavailable(f"{what} failed: {' | '.join(errors[-6:])}")


def venv_env(env_dir: Path) -> dict[str, str]:
    """The environment for a peer's server: its venv first on PATH, nothing of the project's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IMGCLF_", "PYTHON", "VIRTUAL_ENV", "BENTOML_"))}
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")])
    return env
