"""The layering contracts (pyproject's [tool.importlinter]) hold, and would fail if broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=project, capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(project)}, timeout=300)


def _copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    for name in ("service", "training", "imgclf"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    return project


def test_contracts_are_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# (module, planted line, the chain lint-imports must report for it, the contract it breaks)
PLANTS = [
    ("service/runtime.py", "import torch", "service.runtime -> torch", "never imports training"),
    ("service/batch/scoring.py", "import service.http.app", "service.batch.scoring -> service.http.app",
     "never import the HTTP edge"),
    ("service/preprocessing/tensor.py", "import bentoml", "service.preprocessing.tensor -> bentoml",
     "never import the HTTP edge"),
]


def test_each_planted_import_breaks_its_contract(tmp_path: Path) -> None:
    """One copy of the tree with every violation planted, one run of lint-imports: each one is reported."""
    project = _copy(tmp_path)
    for module, line, _, _ in PLANTS:
        path = project / module
        path.write_text(path.read_text() + f"\n{line}  # planted by the test\n")
    result = _lint(project)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout
    for _, _, chain, contract in PLANTS:
        assert contract in result.stdout and chain in result.stdout, (chain, result.stdout)
