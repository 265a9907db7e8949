"""The `imgclf` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.cli import imgclf, in_process


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {arch: simple_cnn, channels: [8], color_mode: L}\nepochs: 5\n")
    result = in_process("train", "--config", str(cfg), "--epochs", "1", "--out", str(tmp_path / "run"))
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
    result = in_process("train", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("optim: {learning_rate: 0.1}\n")
    result = in_process("train", "--config", str(cfg))
    assert result.returncode == 2 and "optim.learning_rate: unknown key" in result.stderr


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    result = in_process("train", "--resume", str(tmp_path), "--epochs", "3")
    assert result.returncode == 2 and "--resume" in result.stderr


@pytest.mark.slow
def test_lr_find(tmp_path: Path) -> None:
    result = in_process("lr-find", "--data", "digits", "--arch", "lenet5", "--num-iter", "60", "--out", str(tmp_path))
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
    result = in_process("archs")
    assert result.returncode == 0
    assert {"lenet5", "simple_cnn", "resnet18", "efficientnet_lite0"} <= set(result.stdout.split())


# --- user mistakes: one line on stderr, exit code 2, the traceback only with -v -------------------------------

SCRIPT = Path(sys.executable).with_name("imgclf")  # the console script, as pyproject.toml installs it


def console(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``imgclf ARGS`` through the installed console script, with no IMGCLF_* variable but ``env``
    (where the script itself is the subject; the error rule's tests run in process)."""
    if not SCRIPT.is_file():
        pytest.fail(f"no console script at {SCRIPT}: install the project (make setup)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLF_")}
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=600, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The failure is a usage error: exit 2, exactly one line on stderr, no traceback, naming ``words``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def listed_repo(tmp_path: Path) -> Path:
    """A repository layout with one model, ``tiny`` version 1 as production (enough for listing)."""
    root = tmp_path / "models"
    (root / "tiny" / "1").mkdir(parents=True)
    (root / "tiny" / "aliases.json").write_text(json.dumps({"production": 1}))
    return root


def test_console_script_help() -> None:
    result = console("--help")
    assert result.returncode == 0, result.stderr
    for command in ("train", "export", "models", "batch", "serve", "pipeline"):
        assert command in result.stdout
    assert console("models", "--help").returncode == 0


def test_a_serving_variable_does_not_stop_the_repository_commands(listed_repo: Path) -> None:
    """`models list` reads only IMGCLF_MODEL_REPO, so a serving-only setting cannot break it."""
    bad_serving = ({"IMGCLF_MAX_QUEUE": "100", "IMGCLF_MAX_CONCURRENCY": "64"}, {"IMGCLF_MAX_QUEUE": "abc"})
    for repo_args, env in (((), {"IMGCLF_MODEL_REPO": str(listed_repo)}), (("--repo", str(listed_repo)), {})):
        for bad in bad_serving:
            result = in_process("models", "list", *repo_args, **bad, **env)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "tiny: 1 (production)"
    history = in_process("pipeline", "history", "--repo", str(listed_repo), IMGCLF_MAX_QUEUE="abc")
    assert history.returncode == 0 and "no pipeline runs recorded" in history.stdout, history.stderr


@pytest.fixture
def empty_repo(tmp_path: Path) -> Path:
    """`imgclf serve` checks its settings before the repository: on an empty one, settings that pass by
    mistake end in "no models" instead of a real server."""
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_a_bad_serving_variable_is_one_line_naming_it(empty_repo: Path) -> None:
    line = one_line_error(in_process("serve", "--repo", str(empty_repo), IMGCLF_MAX_QUEUE="abc"),
                          "IMGCLF_MAX_QUEUE", "'abc'")
    assert "allowed: an integer >= 1" in line
    one_line_error(in_process("serve", "--repo", str(empty_repo), IMGCLF_MAX_QUEUE="100", IMGCLF_MAX_CONCURRENCY="64"),
                   "IMGCLF_MAX_QUEUE", "IMGCLF_MAX_CONCURRENCY")
    one_line_error(in_process("serve", "--repo", str(empty_repo), IMGCLF_DEVICE="tpu"), "IMGCLF_DEVICE", "cpu, cuda")
    one_line_error(in_process("serve", "--repo", str(empty_repo)), "no models in")  # and valid settings get this far


def test_the_admin_token_is_never_echoed(empty_repo: Path) -> None:
    result = in_process("serve", "--repo", str(empty_repo), IMGCLF_ADMIN_TOKEN="s3cret-token", IMGCLF_WORKERS="-1")
    one_line_error(result, "IMGCLF_WORKERS")
    assert "s3cret-token" not in result.stderr + result.stdout


def test_a_bad_config_key_or_file_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("optim: {learning_rate: 0.1}\nepochs: 0\n")
    line = one_line_error(in_process("train", "--config", str(cfg), "--out", str(tmp_path / "run")),
                          "optim.learning_rate: unknown key", "epochs")
    assert not (tmp_path / "run").exists(), line
    one_line_error(in_process("train", "--config", str(tmp_path / "missing.yaml")), "cannot read config")
    one_line_error(in_process("pipeline", "--config", str(cfg), "--name", "x", "--data", "d", "--holdout", "h"))


def test_a_missing_repository_or_unknown_model_is_one_line(listed_repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo"
    for command in (("models", "show", "tiny"), ("models", "list"), ("batch", "x", "--model", "tiny", "--out",
                                                                      str(tmp_path / "o.csv"))):
        one_line_error(in_process(*command, "--repo", str(missing)), str(missing), "--repo", "IMGCLF_MODEL_REPO")
    one_line_error(in_process("models", "show", "nope", "--repo", str(listed_repo)), "no model named 'nope'", "tiny")
    one_line_error(in_process("models", "show", "tiny:7", "--repo", str(listed_repo)), "no version 7")
    one_line_error(in_process("models", "show", "tiny:x", "--repo", str(listed_repo)), "invalid model version")
    one_line_error(in_process("preprocess", str(tmp_path / "none.jpg")), "cannot read", "none.jpg")


def test_verbose_shows_the_traceback(listed_repo: Path, empty_repo: Path) -> None:
    plain = in_process("models", "show", "nope", "--repo", str(listed_repo))
    verbose = in_process("-v", "models", "show", "nope", "--repo", str(listed_repo))
    assert verbose.returncode == 2
    assert "Traceback" in verbose.stderr and "ModelNotFoundError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == one_line_error(plain)
    settings_error = in_process("-v", "serve", "--repo", str(empty_repo), IMGCLF_MAX_QUEUE="abc")
    assert settings_error.returncode == 2 and "ValidationError" in settings_error.stderr


def test_a_bug_keeps_its_traceback() -> None:
    """Only known user errors become one line: an unexpected exception is not hidden."""
    from imgclf.cli.common import CliError, user_error_message

    assert user_error_message(CliError("a\n  b")) == "a; b"
    assert user_error_message(CliError("invalid config:\n  x: y")) == "invalid config: x: y"
    assert user_error_message(KeyError("x")) is None and user_error_message(ValueError("x")) is None


def test_train_overrides_nest_the_given_flags() -> None:
    from imgclf.cli.common import train_overrides

    assert train_overrides(arch="lenet5", epochs=None, lr=0.1, seed=3) == {
        "model": {"arch": "lenet5"}, "optim": {"lr": 0.1}, "seed": 3}
    assert train_overrides(weights=Path("w.pt")) == {"model": {"weights": "w.pt", "pretrained": True}}
    assert train_overrides(weights=Path("w.pt"), pretrained=False)["model"]["pretrained"] is False
    assert train_overrides() == {}


def test_every_listed_user_error_exists() -> None:
    """USER_ERRORS names classes by import path; a module that moves must not silently turn its errors
    back into tracebacks."""
    import importlib

    from imgclf.cli.common import USER_ERRORS

    for dotted in USER_ERRORS:
        module, _, name = dotted.partition(":")
        cls = getattr(importlib.import_module(module), name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), dotted


def test_batch_reads_only_the_settings_it_declares() -> None:
    """`imgclf batch` validates just BATCH_FIELDS; a setting the job code reads beyond them would keep its
    default silently. Every ``settings.X`` in service/batch/ must be declared."""
    import ast

    from imgclf.cli.batch import BATCH_FIELDS

    read = {node.attr for path in (ROOT / "service" / "batch").glob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "settings"}
    assert read and read <= set(BATCH_FIELDS), read - set(BATCH_FIELDS)
