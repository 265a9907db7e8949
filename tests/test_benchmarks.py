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


def test_int8_benchmark_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.int8_digits", "--epochs", "1", "--image-size", "32", "--rounds", "1",
         "--repeats", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "int8_digits.json").read_text())
    assert set(payload["top1"]) == {"fp32", "int8"}
    assert payload["speedup_int8_over_fp32"]["32"] > 0
    assert payload["model_bytes"]["int8"] < payload["model_bytes"]["fp32"]


def test_draft_effect_benchmark_runs(tmp_path: Path, imagenet_repo: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.draft_effect", "--repo", str(imagenet_repo), "--megapixels", "1",
         "--rounds", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "draft_effect.json").read_text())
    assert 0 <= payload["top1_agreement"] <= 1 and payload["median_ms_per_image"]["draft"] > 0
