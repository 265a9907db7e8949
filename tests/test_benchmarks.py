"""Benchmarks are not timed tests; the suite only checks that each script runs on a tiny input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_train_digits_benchmark_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_digits", "--only", "lenet5", "--epochs", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "train_digits.json").read_text())
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["versions"]["torch"]
    assert 0 < payload["results"]["lenet5"]["top1"] <= 1
    assert "| lenet5 |" in (tmp_path / "train_digits.md").read_text()
