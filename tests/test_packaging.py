"""Packaging: the bento that `bentoml build` makes, and the compose file that runs its image.

No Docker engine is needed: the bento is built for real (offline, `lock_packages: false`) and
inspected on disk; docker-compose.yml and deploy/prometheus.yml are parsed and checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from tests.support import ROOT

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

# rich and fsspec (batch jobs) come with bentoml anyway; listed because the service imports them
SERVING_PACKAGES = {"onnxruntime", "numpy", "pillow", "pillow-heif", "pydantic", "bentoml", "typer", "rich", "fsspec",
                    "grpcio", "protobuf", "uvloop", "httptools"}
FORBIDDEN_PACKAGES = {
    "torch", "torchvision", "timm", "onnx", "onnxscript", "scikit-learn", "matplotlib",
}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _bentofile() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "bentofile.yaml").read_text())


def build_bento(ctx: Path) -> Path:
    """`bentoml build` in ``ctx`` (into the test's own BENTOML_HOME); the bento's directory."""
    home = Path(os.environ["BENTOML_HOME"])  # a temporary directory, set by conftest
    env = os.environ | {"BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--version", "pytest", "-o", "tag", str(ctx)],
        check=False, cwd=ctx, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"bentoml build failed:\n{proc.stdout}\n{proc.stderr}"
    name = _bentofile()["name"]
    assert f"{name}:pytest" in proc.stdout
    bento = home / "bentos" / name / "pytest"
    assert (bento / "bento.yaml").is_file(), sorted(str(p) for p in home.rglob("bento.yaml"))
    return bento


def bento_files(bento: Path) -> set[str]:
    src = bento / "src"
    return {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}


def copy_project(dst: Path) -> Path:
    """The files a build reads, without the model repository (as in a fresh clone in CI)."""
    shutil.copytree(ROOT / "service", dst / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "bentofile.yaml", dst / "bentofile.yaml")
    docker = _bentofile()["docker"]
    for path in (docker["setup_script"], docker["dockerfile_template"]):  # files the bentofile names
        (dst / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, dst / path)
    return dst


@pytest.fixture(scope="module")
def checkout_bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bento of the checkout itself, whatever its (git-ignored) models/ holds."""
    home = tmp_path_factory.mktemp("bentoml_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(home))
        return build_bento(ROOT)


# --- the bento ----------------------------------------------------------------------------------
def test_bento_names_the_service_and_its_environment(checkout_bento: Path) -> None:
    info = yaml.safe_load((checkout_bento / "bento.yaml").read_text())
    assert info["service"] == "service.http.app:Classifier"
    assert info["name"] == "imgclf"
    assert info["entry_service"] == "Classifier"
    envs = {e["name"]: e["value"] for e in info["envs"]}
    # relative: `bentoml serve` imports the service with the bento's src/ as working directory
    assert envs["IMGCLF_MODEL_REPO"] == "models"
    assert (checkout_bento / "src" / envs["IMGCLF_MODEL_REPO"]).is_dir()
    dockerfile = (checkout_bento / "env" / "docker" / "Dockerfile").read_text()
    assert "ENV IMGCLF_MODEL_REPO=" in dockerfile


def test_bento_has_exactly_the_serving_packages(checkout_bento: Path) -> None:
    lines = (checkout_bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    requirements = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-"))]
    names = {_name(r) for r in requirements}
    assert names == SERVING_PACKAGES
    assert not names & FORBIDDEN_PACKAGES
    train_extra = {_name(r) for r in _pyproject()["project"]["optional-dependencies"]["train"]}
    assert not names & train_extra, "training dependencies leaked into the serving image"
    # same ranges as the base dependencies of pyproject.toml (bentoml adds its own exact pin)
    base = {str(Requirement(r)) for r in _pyproject()["project"]["dependencies"]}
    assert base <= {str(Requirement(r)) for r in requirements}


def test_bento_holds_the_service_code_only(checkout_bento: Path) -> None:
    files = bento_files(checkout_bento)
    service_sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*.py")}
    assert "service/http/app.py" in files
    assert service_sources <= files
    for folder in ("training/", "tests/", "imgclf/", "benchmarks/", ".venv/", ".git/"):
        assert not any(f.startswith(folder) for f in files), folder
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert "models/README.md" in files


def test_build_without_a_model_repository(tmp_path: Path) -> None:
    """A fresh clone in CI may have no models/ at all: the build must not need it."""
    ctx = copy_project(tmp_path / "project")
    assert not (ctx / "models").exists()
    files = bento_files(build_bento(ctx))
    assert "service/http/app.py" in files
    assert not any(f.startswith("models/") for f in files)


def test_build_copies_the_model_repository_without_write_leftovers(tmp_path: Path) -> None:
    ctx = copy_project(tmp_path / "project")
    version = ctx / "models" / "tiny" / "1"
    version.mkdir(parents=True)
    for name in ("model.onnx", "manifest.json", "labels.txt"):
        (version / name).write_text("x")
    (ctx / "models" / "tiny" / "aliases.json").write_text('{"production": 1}')
    (ctx / "models" / "tiny" / ".lock").write_text("")
    staging = ctx / "models" / "tiny" / ".staging-abc123"
    staging.mkdir()
    (staging / "model.onnx").write_text("half")
    files = bento_files(build_bento(ctx))
    assert {"models/tiny/aliases.json", "models/tiny/1/model.onnx", "models/tiny/1/manifest.json",
            "models/tiny/1/labels.txt"} <= files
    assert not any(".staging-" in f or f.endswith(".lock") for f in files)


# --- docker-compose.yml ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _volume_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each bind mount, from the short or the long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out.append((source, target))
    return out


def _healthcheck_passes_readyz(service: dict[str, Any]) -> None:
    test = service["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "python" in command and "curl" not in command and "wget" not in command
    assert "localhost:3000/readyz" in command
    assert service["healthcheck"]["start_period"]  # /livez does not even answer while loading
    assert service["restart"] == "unless-stopped"
    assert service["deploy"]["resources"]["limits"]["memory"]


def test_compose_paths_exist(compose: dict[str, Any]) -> None:
    assert (ROOT / "bentofile.yaml").is_file()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (ROOT / context).is_dir(), f"{name}: build context {context}"
            if isinstance(build, dict) and "dockerfile" in build:
                assert (ROOT / context / build["dockerfile"]).is_file(), name
        for source, _ in _volume_sources(service):
            if source.startswith((".", "/")):  # a bind mount, not a named volume
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
        for env_file in service.get("env_file", []):
            assert (ROOT / env_file).is_file(), f"{name}: {env_file}"


def test_compose_cpu_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["classifier"]
    assert "profiles" not in service  # the default `docker compose up` runs it
    assert service["image"].split(":")[0] == _bentofile()["name"]
    assert "3000:3000" in [str(p) for p in service["ports"]]
    repo = service["environment"]["IMGCLF_MODEL_REPO"]
    mounts = _volume_sources(service)
    assert ("./models", repo) in mounts
    _healthcheck_passes_readyz(service)


STATE_DIR = "/var/lib/imgclf"  # made and owned by the image's user at build time: deploy/container_setup.sh


@pytest.mark.parametrize("name", ["classifier", "classifier-gpu"])
def test_compose_classifiers_are_locked_down(compose: dict[str, Any], name: str) -> None:
    """Non-root, read-only root filesystem, no capabilities, no privilege escalation; the models mounted
    read-only; the one writable volume holds BentoML's state and temporary uploads, and nothing else."""
    service = compose["services"][name]
    uid, _, gid = str(service["user"]).partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"] and not service.get("cap_add")
    assert "no-new-privileges:true" in service["security_opt"]
    assert not service.get("privileged")
    models = [v for v in service["volumes"] if v["target"] == service["environment"]["IMGCLF_MODEL_REPO"]]
    assert len(models) == 1 and models[0]["read_only"] is True
    writable = [v for v in service["volumes"] if not v.get("read_only")]
    assert [(v["type"], v["target"]) for v in writable] == [("volume", STATE_DIR)]
    assert writable[0]["source"] in compose["volumes"]
    for variable in ("BENTOML_HOME", "TMPDIR"):  # everything BentoML writes goes to the volume
        assert service["environment"][variable].startswith(STATE_DIR + "/"), variable
    assert [t.split(":")[0] for t in service["tmpfs"]] == ["/tmp"]


def test_bento_image_runs_as_a_non_root_user_that_owns_only_its_state(checkout_bento: Path) -> None:
    """BentoML's generated Dockerfile ends as its `bentoml` user (uid 1034, the compose file's `user`);
    the setup script runs before that, as root, and makes the state directory the compose file mounts."""
    dockerfile = (checkout_bento / "env" / "docker" / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    uid = next(line.split("=")[1] for line in dockerfile if line.startswith("ARG BENTO_USER_UID="))
    assert int(uid) != 0
    runs_script = [i for i, line in enumerate(dockerfile)
                   if line.startswith("RUN ") and ("script__" in line or line.rstrip().endswith("/setup_script"))]
    last_user = max(i for i, line in enumerate(dockerfile) if line.startswith("USER "))
    assert runs_script and runs_script[-1] < last_user
    script = (ROOT / _bentofile()["docker"]["setup_script"]).read_text()
    assert f"mkdir -p {STATE_DIR}/" in script and f"chown -R {users[-1]}:{users[-1]} {STATE_DIR}" in script
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["classifier"]["user"] == f"{uid}:{uid}"


def test_compose_gpu_profile(compose: dict[str, Any]) -> None:
    service = compose["services"]["classifier-gpu"]
    assert service["profiles"] == ["gpu"]
    assert service["environment"]["IMGCLF_DEVICE"] == "cuda"
    assert ("./models", service["environment"]["IMGCLF_MODEL_REPO"]) in _volume_sources(service)
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    published = {str(p).split(":")[0] for p in service["ports"]}
    assert "3000" not in published  # must not clash with the CPU service when both run
    _healthcheck_passes_readyz(service)


def test_compose_monitoring_profile_scrapes_the_classifier(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    assert service["profiles"] == ["monitoring"]
    assert service["image"].startswith("prom/prometheus")
    mounts = dict(_volume_sources(service))
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = [
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert ("/metrics", "classifier:3000") in jobs
