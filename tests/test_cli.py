"""The `imgclf` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# Runs the CLI with torch, torchvision and timm made unimportable: an install without the train extra.
WITHOUT_TRAIN_EXTRA = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'timm'): sys.modules[name] = None\n"
    "from imgclf.cli import app\n"
    "sys.argv = ['imgclf', *sys.argv[1:]]\n"
    "app()\n"
)


def imgclf(*args: str, cwd: Path | None = None, without_train: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *args] if without_train else [
        sys.executable, "-m", "imgclf.cli", *args
    ]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_help_lists_commands() -> None:
    result = imgclf("--help")
    assert result.returncode == 0
    for command in ("train", "lr-find"):
        assert command in result.stdout


def test_without_train_extra_help_works_and_train_says_which_extra() -> None:
    assert imgclf("--help", without_train=True).returncode == 0
    result = imgclf("train", "--data", "digits", without_train=True)
    assert result.returncode == 2
    assert "pip install 'imgclf[train]'" in result.stderr


def test_serving_side_imports_no_torch() -> None:
    code = (
        "import sys, service.preprocessing, service.atomic, imgclf.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm'))\n"
        "assert not heavy, heavy\n"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=False).returncode == 0


def test_train_then_resume_a_finished_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = imgclf("train", "--data", "digits", "--arch", "lenet5", "--epochs", "2", "--seed", "3", "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert "val top-1" in result.stdout
    report = json.loads((run / "report.json").read_text())
    assert 0 <= report["top1"] <= report["top5"] <= 1
    assert "seed: 3" in (run / "config.yaml").read_text()
    again = imgclf("train", "--resume", str(run))
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "report.json").read_text())["top1"] == report["top1"]


def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {arch: simple_cnn, channels: [8], color_mode: L}\nepochs: 5\n")
    result = imgclf("train", "--config", str(cfg), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1" in saved and "arch: simple_cnn" in saved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "nope"], "unknown model.arch 'nope'"),
        (["--epochs", "0"], "epochs"),
        (["--data", "/no/such/dir"], "not 'digits'"),
        (["--arch", "resnet18", "--pretrained", "--image-size", "32"], "--weights FILE"),
    ],
)
def test_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = imgclf("train", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("optim: {learning_rate: 0.1}\n")
    result = imgclf("train", "--config", str(cfg))
    assert result.returncode == 2 and "optim.learning_rate: unknown key" in result.stderr


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    result = imgclf("train", "--resume", str(tmp_path), "--epochs", "3")
    assert result.returncode == 2 and "--resume" in result.stderr


def test_lr_find(tmp_path: Path) -> None:
    result = imgclf("lr-find", "--data", "digits", "--arch", "lenet5", "--num-iter", "60", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "lr_find.json").read_text())
    lrs, losses = found["lrs"], found["losses"]
    assert lrs == sorted(lrs) and 1e-6 <= found["suggested_lr"] <= 1.0
    assert f"{found['suggested_lr']:.3g}" in result.stdout
    # The rate it suggests sits where the loss is falling: well below the starting loss.
    assert losses[lrs.index(found["suggested_lr"])] < losses[0]
    assert min(losses) < 0.9 * losses[0]
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_archs_lists_the_registry() -> None:
    result = imgclf("archs")
    assert result.returncode == 0
    assert {"lenet5", "simple_cnn", "resnet18", "efficientnet_lite0"} <= set(result.stdout.split())
