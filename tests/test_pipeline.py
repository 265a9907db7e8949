"""Retrain and deploy, for real: digit images on disk, LeNet-5, ONNX Runtime, a live `imgclf serve`.

Version 1 is made by the pipeline's own first run on part of the data (no production yet: the
gate passes on the export checks alone). The end-to-end run trains on all of it, beats version 1,
promotes version 2 and reloads a live server while a client keeps classifying. The other runs
start from private copies of that repository.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from imgclf.devserver import running_server
from service.repository import MODEL_FILE, ModelRepository, ModelVersion
from tests.support import ROOT
from tests.support.images import digit_images, write_image
from training.config import ConfigError
from training.pipeline.config import GateConfig, ValidationPolicy, load_pipeline_config
from training.pipeline.data import validate_data, write_digits
from training.pipeline.gate import decide
from training.pipeline.record import RECORDS_DIR, StopRun, read_records, warm_start
from training.pipeline.run import PipelineHooks, PipelineResult, run_pipeline

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

NAME = "digits"
TOKEN = "pipeline-test-token-7d1e"
PER_CLASS, HELD_OUT, PART = 100, 20, 30  # images per digit: in all, held out, in version 1's data
# Held-out classes have 20 images: one image is 0.05 of recall, so the tests allow 3 (fixed seeds
# make runs repeatable, but two models can trade a few images either way).
CONFIG = {
    "train": {"model": {"arch": "lenet5"}, "epochs": 3, "batch_size": 32},
    "gate": {"top1_tolerance": 0.0, "max_class_recall_drop": 0.15},
    "deploy": {"timeout_s": 30, "consecutive": 5, "poll_interval_s": 0.1},
}
LOOSE_GATE = {"gate": {"top1_tolerance": 1.0, "max_class_recall_drop": 1.0}}


@dataclass(frozen=True)
class Dirs:
    part: Path  # version 1's training images
    full: Path  # every training image
    holdout: Path
    shuffled: Path  # every training image under a random class
    config: Path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    root = tmp_path_factory.mktemp("pipeline_data")
    rng = random.Random(0)
    for label, arrays in digit_images(PER_CLASS).items():
        for i, array in enumerate(arrays):
            if i < HELD_OUT:
                write_image(root / "holdout" / str(label) / f"{label}-{i:03d}.png", array)
                continue
            write_image(root / "full" / str(label) / f"{label}-{i:03d}.png", array)
            write_image(root / "shuffled" / str(rng.randrange(10)) / f"{label}-{i:03d}.png", array)
            if i < HELD_OUT + PART:
                write_image(root / "part" / str(label) / f"{label}-{i:03d}.png", array)
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return Dirs(root / "part", root / "full", root / "holdout", root / "shuffled", config)


def run(dirs: Dirs, repo: Path, data: Path | None = None, *, extra: dict | None = None,
        hooks: PipelineHooks | None = None, token: str | None = None) -> PipelineResult:
    from training.config import deep_merge

    overrides = deep_merge({"name": NAME, "data": str(data or dirs.full), "holdout": str(dirs.holdout)}, extra or {})
    cfg = load_pipeline_config(dirs.config, overrides)
    return run_pipeline(cfg, repo, admin_token=token, config_file=dirs.config, hooks=hooks)


@pytest.fixture(scope="module")
def seeded(dirs: Dirs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PipelineResult]:
    """A repository whose production digits:1 the pipeline made from part of the data."""
    repo = tmp_path_factory.mktemp("seeded") / "models"
    return repo, run(dirs, repo, dirs.part)


def copy_of(seeded: tuple[Path, PipelineResult], target: Path) -> Path:
    shutil.copytree(seeded[0], target)
    return target


def step(result: PipelineResult, name: str) -> dict:
    return next(s.model_dump() for s in result.record.steps if s.name == name)


# --- a live server ------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    repo: Path
    client: httpx.Client

    def reload(self) -> httpx.Response:
        return self.client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})

    def version(self) -> int:
        return next(m["version"] for m in self.client.get("/models").json()["models"] if m["name"] == NAME)


@pytest.fixture(scope="module")
def live(seeded: tuple[Path, PipelineResult], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`imgclf serve` on a copy of the seeded repository, admin reload on."""
    home = tmp_path_factory.mktemp("live")
    repo = copy_of(seeded, home / "models")
    # one worker: an admin reload reaches it at once ("never back" would race a second worker's poll)
    with running_server(repo, home, {"IMGCLF_ADMIN_TOKEN": TOKEN, "IMGCLF_WORKERS": "1"}) as srv:
        yield Server(srv.url, repo, srv.client)


def imgclf(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMGCLF_ADMIN_TOKEN": token} if token else {
        k: v for k, v in os.environ.items() if k != "IMGCLF_ADMIN_TOKEN"}
    return subprocess.run([sys.executable, "-m", "imgclf.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def pipeline_args(dirs: Dirs, repo: Path, *extra: str) -> list[str]:
    return ["pipeline", "--config", str(dirs.config), "--name", NAME, "--data", str(dirs.full),
            "--holdout", str(dirs.holdout), "--repo", str(repo), *extra]


@dataclass
class Deployed:
    proc: subprocess.CompletedProcess[str]
    answers: list[tuple[int, int | None]]  # (HTTP status, version) of every client request, in order
    record: dict


@pytest.fixture(scope="module")
def deployed(live: Server, dirs: Dirs) -> Deployed:
    """`imgclf pipeline` retrains on all the data and reloads the live server while a client classifies."""
    image = next((dirs.holdout / "3").iterdir()).read_bytes()
    answers: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post("/classify", files={"image": ("3.png", image)}, data={"model": NAME})
                    answers.append((r.status_code, r.json().get("version") if r.status_code == 200 else None))
                except httpx.HTTPError:
                    answers.append((0, None))
                time.sleep(0.05)

    assert live.version() == 1
    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        proc = imgclf(*pipeline_args(dirs, live.repo, "--service-url", live.url), token=TOKEN)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=30)
    records = read_records(live.repo, NAME)
    return Deployed(proc, answers, records[-1].model_dump(mode="json"))


# --- the whole loop --------------------------------------------------------------------------------


def test_first_run_without_production_passes_on_export_checks_alone(seeded: tuple[Path, PipelineResult]) -> None:
    repo, result = seeded
    record = result.record
    assert (record.status, result.exit_code) == ("promoted", 0), record.reason
    assert record.gate["basis"] == "no_production" and record.gate["passed"]
    assert "export checks alone" in record.reason
    assert [r["name"] for r in record.gate["rules"]] == ["export_checks"]
    assert record.versions == {"before": {}, "after": {"production": 1}, "candidate": 1}
    assert "production" not in record.metrics and record.metrics["candidate"]["num_images"] == 10 * HELD_OUT
    assert step(result, "deploy")["status"] == "skipped"
    # The record lives inside the repository, where neither the repository nor the service looks.
    assert result.path.parent == repo / RECORDS_DIR / NAME
    assert ModelRepository(repo).names() == [NAME]
    assert json.loads(result.path.read_text())["status"] == "promoted"


def test_retrain_promotes_and_reloads_a_live_server_without_failed_requests(deployed: Deployed, live: Server) -> None:
    assert deployed.proc.returncode == 0, deployed.proc.stdout + deployed.proc.stderr
    record = deployed.record
    assert record["status"] == "promoted"
    assert record["versions"]["before"] == {"production": 1}
    assert record["versions"]["after"] == {"production": 2, "previous": 1}
    cand, prod = record["metrics"]["candidate"], record["metrics"]["production"]
    assert cand["top1"] > prod["top1"] and prod["version"] == 1
    assert set(cand["per_class_recall"]) == {str(d) for d in range(10)} and 0 <= cand["ece"] <= 1
    assert record["gate"]["basis"] == "compared_with_production"
    assert {r["name"] for r in record["gate"]["rules"]} == {"export_checks", "top1", "class_recall"}
    (service,) = record["deploy"]["services"]
    assert service["ok"] and service["url"] == live.url and service["reload"]["models"] == [{"name": NAME, "version": 2}]
    assert [s["name"] for s in record["steps"]] == [
        "validate", "changes", "train", "export_checks", "evaluate", "gate", "register", "promote", "deploy"]
    assert all(s["status"] == "ok" for s in record["steps"])
    assert "promoted:" in deployed.proc.stdout and "run record:" in deployed.proc.stdout
    # The client never saw an error, and once version 2 answered, version 1 never did again.
    assert deployed.answers and all(status == 200 for status, _ in deployed.answers), deployed.answers
    versions = [v for _, v in deployed.answers]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions), "a request was answered by version 1 after version 2"
    assert live.version() == 2


def test_an_unchanged_second_run_reports_no_changes(deployed: Deployed, live: Server, dirs: Dirs) -> None:
    proc = imgclf(*pipeline_args(dirs, live.repo, "--service-url", live.url), token=TOKEN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no changes" in proc.stdout
    record = read_records(live.repo, NAME)[-1]
    assert record.status == "skipped" and record.versions["after"] == {"production": 2, "previous": 1}
    assert record.fingerprints["run"] == deployed.record["fingerprints"]["run"]
    assert [s.name for s in record.steps] == ["validate", "changes"]
    assert ModelRepository(live.repo).versions(NAME) == [1, 2]
    # history reads the records without torch (a serving-only install can show them)
    without_torch = ("import sys\nfor name in ('torch', 'torchvision', 'timm'): sys.modules[name] = None\n"
                     "from imgclf.cli import app\nsys.argv = ['imgclf', *sys.argv[1:]]\napp()\n")
    history = subprocess.run([sys.executable, "-c", without_torch, "pipeline", "history", "--repo", str(live.repo),
                              "--name", NAME], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert len(lines) == 3 and "skipped" in lines[-1] and "v1 -> v2" in lines[1]


def test_models_rollback_and_a_reload_put_the_previous_version_back(deployed: Deployed, live: Server,
                                                                   dirs: Dirs) -> None:
    assert live.version() == 2
    proc = imgclf("models", "rollback", NAME, "--repo", str(live.repo))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"production": 1, "previous": 2}
    reloaded = live.reload()
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["models"] == [{"name": NAME, "version": 1}]
    assert live.version() == 1
    image = next((dirs.holdout / "7").iterdir()).read_bytes()
    answer = live.client.post("/classify", files={"image": ("7.png", image)}, data={"model": NAME})
    assert answer.status_code == 200 and answer.json()["version"] == 1
    ModelRepository(live.repo).promote(NAME, 2)  # as the pipeline left it, for the tests after this one
    assert live.reload().json()["models"] == [{"name": NAME, "version": 2}]


# --- refusals ----------------------------------------------------------------------------------------


def test_a_candidate_trained_on_shuffled_labels_is_rejected(seeded: tuple[Path, PipelineResult], dirs: Dirs,
                                                           tmp_path: Path) -> None:
    repo = copy_of(seeded, tmp_path / "models")
    result = run(dirs, repo, dirs.shuffled, extra={"train": {"epochs": 2}})
    record = result.record
    assert (record.status, result.exit_code) == ("rejected", 3), record.reason
    assert record.reason.startswith("top1 failed (candidate top-1") and "class_recall failed" in record.reason
    rules = {r["name"]: r for r in record.gate["rules"]}
    assert rules["export_checks"]["passed"] and not rules["top1"]["passed"]
    assert rules["top1"]["value"] < 0.3 < rules["top1"]["threshold"]
    assert record.metrics["candidate"]["top1"] < record.metrics["production"]["top1"]
    repository = ModelRepository(repo)
    assert repository.aliases(NAME) == {"production": 1} and repository.versions(NAME) == [1]
    assert record.versions["after"] == {"production": 1} and record.versions["candidate"] is None
    assert step(result, "gate")["status"] == "failed" and "register" not in [s.name for s in record.steps]


def corrupt_file(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def test_a_candidate_corrupted_before_registration_is_never_registered(
    seeded: tuple[Path, PipelineResult], dirs: Dirs, tmp_path: Path,
) -> None:
    repo = copy_of(seeded, tmp_path / "models")
    result = run(dirs, repo, extra={"train": {"epochs": 1}} | LOOSE_GATE,
                 hooks=PipelineHooks(before_register=corrupt_file))
    assert (result.record.status, result.exit_code) == ("failed", 1)
    assert "registration refused" in result.record.reason and "sha256" in result.record.reason
    repository = ModelRepository(repo)
    assert repository.versions(NAME) == [1] and repository.aliases(NAME) == {"production": 1}
    assert not list((repo / NAME).glob(".staging-*"))


def test_a_registered_version_corrupted_before_promotion_is_never_promoted(
    seeded: tuple[Path, PipelineResult], dirs: Dirs, tmp_path: Path,
) -> None:
    repo = copy_of(seeded, tmp_path / "models")

    def corrupt_registered(version: ModelVersion) -> None:
        corrupt_file(version.path / MODEL_FILE)

    result = run(dirs, repo, extra={"train": {"epochs": 1}} | LOOSE_GATE,
                 hooks=PipelineHooks(after_register=corrupt_registered))
    assert (result.record.status, result.exit_code) == ("failed", 1)
    assert "promotion refused" in result.record.reason and "sha256" in result.record.reason
    assert ModelRepository(repo).aliases(NAME) == {"production": 1}
    assert result.record.versions["candidate"] == 2 and result.record.versions["after"] == {"production": 1}


def test_a_failed_smoke_check_rolls_back_and_fails(seeded: tuple[Path, PipelineResult], dirs: Dirs,
                                                   deployed: Deployed, live: Server, tmp_path: Path) -> None:
    """The service reloads fine but serves another repository: it never answers as the new version must."""
    repo = copy_of(seeded, tmp_path / "models")
    extra = {"train": {"epochs": 1, "seed": 1}, "deploy": {"service_urls": [live.url], "timeout_s": 4}} | LOOSE_GATE
    result = run(dirs, repo, extra=extra, token=TOKEN)
    record = result.record
    assert (record.status, result.exit_code) == ("rolled_back", 1), record.reason
    assert ModelRepository(repo).aliases(NAME) == {"production": 1, "previous": 2}
    assert record.versions["after"] == {"production": 1, "previous": 2}
    assert step(result, "deploy")["status"] == "failed"
    assert "production -> digits:1 again" in step(result, "rollback")["summary"]
    assert record.reason.startswith("deploy failed") and not record.deploy["services"][0]["ok"]


def test_a_changed_label_set_needs_the_flag(seeded: tuple[Path, PipelineResult], dirs: Dirs, tmp_path: Path) -> None:
    repo = copy_of(seeded, tmp_path / "models")
    data = tmp_path / "nine"
    shutil.copytree(dirs.full, data, ignore=lambda d, names: ["9"] if Path(d) == dirs.full else [])
    holdout = tmp_path / "nine_holdout"
    shutil.copytree(dirs.holdout, holdout, ignore=lambda d, names: ["9"] if Path(d) == dirs.holdout else [])
    cfg = load_pipeline_config(dirs.config, {"name": NAME, "data": str(data), "holdout": str(holdout)})
    result = run_pipeline(cfg, repo)
    assert (result.record.status, result.exit_code) == ("failed", 1)
    assert "label set differs from production's" in result.record.reason and "removed ['9']" in result.record.reason
    assert [s.name for s in result.record.steps] == ["validate"]
    assert ModelRepository(repo).versions(NAME) == [1]
    # With the flag it is a new model: not compared with production (other classes), no warm start.
    allowed = load_pipeline_config(dirs.config, {"name": NAME, "data": str(data), "holdout": str(holdout),
                                                 "allow_label_change": True, "init": "production",
                                                 "train": {"epochs": 1}})
    result = run_pipeline(allowed, repo)
    assert (result.record.status, result.exit_code) == ("promoted", 0), result.record.reason
    assert result.record.gate["basis"] == "label_set_changed" and "production" not in result.record.metrics
    assert "label set changed" in result.record.training["init"]
    assert ModelRepository(repo).get(NAME).manifest.labels == [str(d) for d in range(9)]


def test_warm_start_from_production(seeded: tuple[Path, PipelineResult], dirs: Dirs, tmp_path: Path) -> None:
    repo = copy_of(seeded, tmp_path / "models")
    result = run(dirs, repo, extra={"init": "production", "train": {"epochs": 1}} | LOOSE_GATE)
    assert result.record.status == "promoted", result.record.reason
    v1_run = seeded[1].record.training["run_dir"]
    assert result.record.training["init"] == f"warm start from production {NAME}:1 ({v1_run}/checkpoints/best.pt)"
    manifest = ModelRepository(repo).get(NAME, 2).manifest
    assert manifest.training.weights_source.startswith("warm start from") and v1_run in manifest.training.weights_source



def test_warm_start_says_where_it_starts_and_refuses_a_lost_checkpoint(imagenet_repo: Path) -> None:
    """A bootstrapped production has no pipeline run behind it: init: production cannot continue it."""
    production = ModelRepository(imagenet_repo).get("imagenet-lite0")
    own = "the training config's initial weights"
    assert warm_start(imagenet_repo, production, "pretrained", False) == (None, own)
    assert warm_start(imagenet_repo, None, "production", False) == (
        None, f"{own} (init: production, but there is no production version yet)")
    assert warm_start(imagenet_repo, production, "production", True) == (
        None, f"{own} (init: production, but the label set changed)")
    with pytest.raises(StopRun, match="needs the checkpoint of imagenet-lite0:1, but none is left") as stop:
        warm_start(imagenet_repo, production, "production", False)
    assert stop.value.status == "failed" and "use init: pretrained" in stop.value.reason


# --- the parts on their own ----------------------------------------------------------------------------


def test_data_validation_finds_unreadable_duplicates_and_conflicts(dirs: Dirs, tmp_path: Path) -> None:
    data, holdout = tmp_path / "data", tmp_path / "holdout"
    arrays = digit_images(4, (0, 1))
    for label, images in arrays.items():
        for i, array in enumerate(images[:3]):
            write_image(data / str(label) / f"{i}.png", array)
        write_image(holdout / str(label) / "h.png", images[3])
    shutil.copy(holdout / "0" / "h.png", data / "0" / "leak.png")  # a held-out image in the training data
    shutil.copy(data / "1" / "0.png", data / "0" / "twice.png")  # the same image under two classes
    (data / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = validate_data(data, holdout, ValidationPolicy(max_unreadable_fraction=0.5), ["0", "1"], False)
    assert report.problems == []
    r = report.report
    assert r["unreadable"]["train"] == 1 and "broken.png" in r["unreadable"]["files"][0]
    assert r["duplicates_with_holdout"]["files"] == 1 and r["conflicting_labels"]["files"] == 2
    kept = {f.path.name for f in report.train}
    assert "leak.png" not in kept and "twice.png" not in kept and "0.png" in kept  # 0/0.png is not 1/0.png
    assert r["counts"]["train"] == {"0": 3, "1": 2} and r["counts"]["holdout"] == {"0": 1, "1": 1}
    assert r["labels"]["same_as_production"]
    strict = validate_data(data, holdout, ValidationPolicy(duplicates="fail", conflicting_labels="fail"),
                           ["0", "1", "2"], False)
    assert len(strict.problems) == 4, strict.problems  # unreadable share, conflicts, duplicates, label set


def test_a_small_first_dataset_deploys(tmp_path: Path) -> None:
    """150 training images (30 in the validation split), 360 held out: parity borrows held-out images."""
    data, holdout = write_digits(tmp_path / "data", holdout_per_class=36, train_per_class=15)
    cfg = load_pipeline_config(None, {"name": NAME, "data": str(data), "holdout": str(holdout),
                                      "train": CONFIG["train"]})
    result = run_pipeline(cfg, tmp_path / "models")
    record = result.record
    assert (record.status, result.exit_code) == ("promoted", 0), record.reason
    assert record.validation["train_images"] == 150 and record.validation["holdout_images"] == 360
    parity = record.export["parity"]
    assert parity["image_sources"] == {"validation": 30, "held-out": 34} and parity["images"] == 64
    assert max(parity["max_abs_logit_diff"].values()) <= parity["tolerance"]
    assert "30 validation, 34 held-out" in step(result, "export_checks")["summary"]
    check = ModelRepository(tmp_path / "models").get(NAME).manifest.export.parity_check
    assert check is not None and check.image_sources == {"validation": 30, "held-out": 34}


def test_gate_rules() -> None:
    prod = {"top1": 0.90, "per_class_recall": {"a": 0.9, "b": 0.9}}
    better = {"top1": 0.92, "per_class_recall": {"a": 1.0, "b": 0.84}}
    assert decide(GateConfig(max_class_recall_drop=0.1), better, prod).passed
    worse_class = decide(GateConfig(max_class_recall_drop=0.05), better, prod)
    assert not worse_class.passed and "class_recall failed" in worse_class.reason and "'b'" in worse_class.reason
    slightly_worse = {"top1": 0.895, "per_class_recall": {"a": 0.9, "b": 0.9}}
    assert not decide(GateConfig(), slightly_worse, prod).passed
    assert decide(GateConfig(top1_tolerance=0.01), slightly_worse, prod).passed
    first = decide(GateConfig(min_top1=0.95), better, None)
    assert not first.passed and first.basis == "no_production" and "min_top1" in first.reason
    broken = decide(GateConfig(), None, prod, export_error="parity failed")
    assert not broken.passed and broken.reason == "export_checks failed (parity failed)"


def test_config_is_validated_and_flags_override_the_file(dirs: Dirs) -> None:
    with pytest.raises(ConfigError, match="gate.top1_tol: unknown key"):
        load_pipeline_config(None, {"gate": {"top1_tol": 0.1}})
    with pytest.raises(ConfigError, match="model.arch"):
        load_pipeline_config(None, {"train": {"model": {"arch": "nope"}}})
    with pytest.raises(ConfigError, match="train.data.source is set by the pipeline"):
        load_pipeline_config(None, {"train": {"data": {"source": "digits"}}})
    with pytest.raises(ConfigError, match="--name, --data, --holdout"):
        load_pipeline_config(None, {}).require()
    cfg = load_pipeline_config(dirs.config, {"train": {"epochs": 7}, "deploy": {"service_urls": ["http://x:3000/"]}})
    assert cfg.train_config(Path("x.csv")).epochs == 7 and cfg.train["batch_size"] == 32
    assert cfg.deploy.service_urls == ["http://x:3000"] and cfg.deploy.timeout_s == 30
    assert cfg.fingerprint() != load_pipeline_config(dirs.config).fingerprint()
    # Gate and deploy settings decide what happens to a model, not which model it is.
    assert load_pipeline_config(dirs.config, LOOSE_GATE).fingerprint() == load_pipeline_config(dirs.config).fingerprint()


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imgclf.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["pipeline", "--name", NAME, "--repo", str(tmp_path)])
    assert missing.exit_code == 2 and "--data, --holdout" in missing.stderr
    bad_key = runner.invoke(app, ["pipeline", "--name", NAME, "--data", "d", "--holdout", "h", "--arch", "nope"])
    assert bad_key.exit_code == 2 and "unknown train.model.arch 'nope'" in bad_key.stderr
    history = runner.invoke(app, ["pipeline", "history", "--repo", str(tmp_path)])
    assert history.exit_code == 0 and history.stdout.strip() == "no pipeline runs recorded"


def test_service_urls_need_the_admin_token(dirs: Dirs, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imgclf.cli import app

    args = pipeline_args(dirs, tmp_path / "models", "--service-url", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, args, env={"IMGCLF_ADMIN_TOKEN": ""})
    assert result.exit_code == 2 and "admin token" in result.stderr
    assert not (tmp_path / "models").exists()


def test_example_config_and_compose_trainer() -> None:
    cfg = load_pipeline_config(ROOT / "deploy" / "pipeline.yaml")
    assert cfg.name and cfg.data == Path("data/train") and cfg.holdout == Path("data/holdout")
    assert cfg.train_config(Path("x.csv")).model.arch == "lenet5"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    trainer, classifier = compose["services"]["trainer"], compose["services"]["classifier"]
    assert trainer["profiles"] == ["train"]
    command = trainer["command"]
    assert command[0] == "pipeline" and command[command.index("--service-url") + 1] == "http://classifier:3000"
    config = command[command.index("--config") + 1]
    mounts = {v["target"]: v for v in trainer["volumes"]}
    # the same models volume as the classifier, writable here; config and data where the config says
    repo = trainer["environment"]["IMGCLF_MODEL_REPO"]
    assert mounts[repo]["source"] == "./models" and not mounts[repo].get("read_only")
    assert classifier["environment"]["IMGCLF_MODEL_REPO"] == repo
    assert mounts[f"{trainer['working_dir']}/{config}"]["source"] == f"./{config}"
    assert mounts[f"{trainer['working_dir']}/data"]["source"] == "./data" and (ROOT / "data").is_dir()
    for service in (trainer, classifier):
        assert service["environment"]["IMGCLF_ADMIN_TOKEN"] == "${IMGCLF_ADMIN_TOKEN:-}"
    assert trainer["depends_on"]["classifier"]["condition"] == "service_healthy"
    assert (ROOT / trainer["build"]["dockerfile"]).is_file()
