"""Benchmarks are not timed tests; the suite only checks that each script runs on a tiny input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

# Hang guards only, never a speed check: a script's wall time grows with the machine's load (a torch
# benchmark under two CPU hogs takes several times as long as on an idle machine).
HANG_S = 900
# slow (not in `make test-quick`); a timeout above the suite's 600 s: one test runs two scripts
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * HANG_S)]


def test_train_digits_benchmark_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_digits", "--only", "lenet5", "--epochs", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S, check=False,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "train_digits.json").read_text())
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["versions"]["torch"]
    assert 0 < payload["results"]["lenet5"]["top1"] <= 1
    assert "| lenet5 |" in (tmp_path / "train_digits.md").read_text()


def test_int8_benchmark_runs(tmp_path: Path, lite0_digits_run: Path) -> None:
    """On the run export's tests use (the script's own training step is `train`, tested there)."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.int8_digits", "--run", str(lite0_digits_run), "--rounds", "1",
         "--repeats", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S, check=False,
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
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S, check=False,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "draft_effect.json").read_text())
    assert 0 <= payload["top1_agreement"] <= 1 and payload["median_ms_per_image"]["draft"] > 0


def test_batch_throughput_benchmark_runs(tmp_path: Path, imagenet_repo: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.batch_throughput", "--repo", str(imagenet_repo), "--distinct", "4",
         "--imagenet-inputs", "8", "--distinct-photos", "2", "--photo-inputs", "2", "--megapixels", "1",
         "--memory-inputs", "--rounds", "1", "--no-compare-threads", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "batch_throughput.json").read_text())
    for entry in payload["throughput"].values():
        assert entry["ceiling"]["ceiling_images_per_s"] > 0 and entry["process"]["runs"][0]["rows"] == entry["inputs"]
    assert "of ceiling" in (tmp_path / "batch_throughput.md").read_text()


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                          check=False)


def test_model_ceiling_benchmark_runs(tmp_path: Path) -> None:
    result = _bench("benchmarks.model_ceiling", "--models", "lenet5", "--batch-sizes", "1", "4", "--rounds", "1",
                    "--seconds", "0.05", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "model_ceiling.json").read_text())["results"]["lenet5"]["images_per_s"]
    assert set(figures) == {"ort_fp32", "ort_int8", "torch_eager_fp32"} and figures["ort_int8"]["4"] > 0


def test_preprocess_cost_benchmark_runs(tmp_path: Path) -> None:
    result = _bench("benchmarks.preprocess_cost", "--rounds", "1", "--seconds", "0.05", "--megapixels", "1",
                    "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "preprocess_cost.json").read_text())["results"]
    assert {"jpeg_500x375", "png_500x375", "webp_500x375"} <= set(results)
    assert all(r["core_ms"]["ours"] > 0 and r["max_abs_difference"] < 0.5 for r in results.values())


def test_http_e2e_and_cold_start_benchmarks_run(tmp_path: Path, imagenet_repo: Path) -> None:
    result = _bench("benchmarks.http_e2e", "--repo", str(imagenet_repo), "--seconds", "0.5", "--concurrency", "2",
                    "--photo-concurrency", "2", "--open-fractions", "0.5", "--distinct", "6", "--megapixels", "1",
                    "--variant", "1 worker:IMGCLF_WORKERS=1", "--settle", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "http_e2e.json").read_text())
    ours = payload["imgclf"]["1 worker"]["imagenet"]
    assert ours["closed"]["2"]["ok"] > 0 and ours["closed"]["2"]["errors"] == 0 and ours["open"]["0.5"]["ok"] > 0
    assert payload["naive"]["photo12mp"]["closed"]["2"]["errors"] == 0
    cold = _bench("benchmarks.cold_start", "--repo", str(imagenet_repo), "--runs", "1", "--out", str(tmp_path))
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert json.loads((tmp_path / "cold_start.json").read_text())["median"]["ready_s"] > 0


def test_decoder_benchmark_runs(tmp_path: Path) -> None:
    result = _bench("benchmarks.decoders", "--rounds", "1", "--megapixels", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "decoders.json").read_text())["rows"]
    assert set(rows) == {"small", "12 MP"} and all(r["ms"]["simplejpeg"] > 0 for r in rows.values())


def test_int8_imagenet_benchmark_runs(tmp_path: Path, imagenet_repo: Path) -> None:
    chosen = ["8-bit weights, MinMax", "8-bit, MinMax, 8 worst layers fp32"]
    result = _bench("benchmarks.int8_imagenet", "--models", str(imagenet_repo), "--photos", "2", "--rounds", "1",
                    "--recipes", *chosen, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "int8_imagenet.json").read_text())
    assert list(payload["recipes"]) == chosen
    for recipe in payload["recipes"].values():
        assert recipe["views"] == sum(r["views"] for r in recipe["rows"]) > 0 and 0 <= recipe["all"] <= 1
    assert all(len(layers) == 8 for layers in payload["worst_layers"].values())


def test_shadow_cost_benchmark_runs(tmp_path: Path, imagenet_repo: Path) -> None:
    """Off and a 100% shadow on one server: the shadow scored, production answered, the caller's repository
    (shared by the suite) left as it was (the benchmark adds its candidate version to a copy)."""
    before = sorted(p.name for p in (imagenet_repo / "imagenet-lite0").iterdir())
    result = _bench("benchmarks.shadow_cost", "--repo", str(imagenet_repo), "--seconds", "0.3", "--rounds", "1",
                    "--concurrency", "2", "--weights", "1", "--distinct", "6", "--settle", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "shadow_cost.json").read_text())["summary"]["2"]
    assert set(summary) == {"off", "shadow 100%"}
    assert summary["off"]["metrics"]["shadow_compared"] == 0 and summary["off"]["errors"] == 0
    shadow = summary["shadow 100%"]
    assert shadow["metrics"]["shadow_compared"] > 0 and shadow["metrics"]["production"] > 0 and shadow["rps_ratio"] > 0
    assert "## What it means" in (tmp_path / "shadow_cost.md").read_text()
    assert sorted(p.name for p in (imagenet_repo / "imagenet-lite0").iterdir()) == before
