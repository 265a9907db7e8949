"""The serving image, built with BentoML's own path (`bentoml build` + `bentoml containerize --backend
podman`) and run with podman: for tests/test_container.py and benchmarks/container.py.

No container registry is reachable from the project's machines, so the image builds on a local Debian base
(deploy/container/make_base_image.sh) named in a copy of bentofile.yaml; users keep BentoML's
python:3.11-slim. An image is tagged with the hash of everything that goes into it, so a run whose inputs
did not change reuses the image of an earlier run instead of building again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from imgclf.devserver import free_port
from tests.support import ROOT, unavailable

log = logging.getLogger(__name__)

ENGINE = "podman"
BASE_IMAGE = "localhost/imgclf-base:bookworm"
IMAGE_REPO = "localhost/imgclf"
BASE_SCRIPT = ROOT / "deploy" / "container" / "make_base_image.sh"
STATE_DIR = "/var/lib/imgclf"  # the image's one writable place (deploy/container_setup.sh)
INSTALL = ("apt-get install podman runc debootstrap, and deploy/container/containers.conf as "
           "/etc/containers/containers.conf (.ci/run does both)")
# Everything `bentoml build` puts in the bento (bentofile.yaml's include: the service code, the page) and
# what shapes the image around it. The model repository is not in it: the container mounts it.
INPUTS = ("bentofile.yaml", "service", "deploy/container_setup.sh", "deploy/container/Dockerfile.j2",
          "deploy/container/make_base_image.sh")
# The settings docker-compose.yml runs the classifier with; the tests add --read-only and the mounts.
LOCKED_DOWN = ("--user", "1034:1034", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--memory", "2g")


def require_engine() -> str:
    """podman's path, or skip (fail under CI=true) with the command that installs it."""
    found = shutil.which(ENGINE)
    if found is None or shutil.which("debootstrap") is None:
        unavailable(f"no podman + debootstrap on this machine: {INSTALL}")
    return found


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def input_files() -> list[Path]:
    files: list[Path] = []
    for name in INPUTS:
        path = ROOT / name
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in found if "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return files


def content_hash() -> str:
    """Of every input's path and bytes: the image's tag."""
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def make_base_image() -> float:
    """The local Debian base (skipped when it exists); seconds taken."""
    started = time.monotonic()
    proc = subprocess.run([str(BASE_SCRIPT), BASE_IMAGE], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{BASE_SCRIPT.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return time.monotonic() - started


def build_context(dst: Path, base_image: str) -> Path:
    """The inputs copied into ``dst``, the bentofile naming ``base_image`` (python_version then goes:
    BentoML ignores it beside a base image, with a warning in every log)."""
    for path in input_files():
        target = dst / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    bentofile["docker"].pop("python_version", None)
    bentofile["docker"]["base_image"] = base_image
    (dst / "bentofile.yaml").write_text(yaml.safe_dump(bentofile, sort_keys=False))
    return dst


def bentoml(args: Sequence[str], home: Path, cwd: Path) -> float:
    """A bentoml command in its own BENTOML_HOME; seconds taken."""
    env = os.environ | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"bentoml {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return time.monotonic() - started


def build_image(workdir: Path, tag: str, *, no_cache: bool = False) -> dict[str, float]:
    """`bentoml build` + `bentoml containerize --backend podman` into ``IMAGE_REPO:tag``; seconds per step.

    containerize runs from / because BentoML 1.4 resolves docker.dockerfile_template against the working
    directory after copying the bento to a temporary folder, and refuses a template outside it."""
    ctx = build_context(workdir / "context", BASE_IMAGE)
    home = workdir / "bentoml_home"
    seconds = {"base_image_s": make_base_image(), "bento_s": bentoml(["build", "--version", tag, str(ctx)], home, ctx)}
    # Docker's image format keeps the HEALTHCHECK (podman's default, OCI, has no such field)
    options = ["--opt", "format=docker", *(["--opt", "no-cache"] if no_cache else [])]
    seconds["containerize_s"] = bentoml(
        ["containerize", f"imgclf:{tag}", "--backend", ENGINE, "-t", f"{IMAGE_REPO}:{tag}", *options], home, Path("/"))
    return seconds


def ensure_image(workdir: Path) -> str:
    """The image of the checkout's current inputs: reused when its tag exists, else built."""
    tag = content_hash()
    ref = f"{IMAGE_REPO}:{tag}"
    if not image_exists(ref):
        log.info("building %s: %s", ref, build_image(workdir, tag))
    return ref


def layers(ref: str) -> list[dict[str, object]]:
    """``podman history``: each layer's size in bytes and the instruction that made it, oldest first."""
    rows = json.loads(podman("history", "--format", "json", ref).stdout)
    return [{"size": int(r.get("size", 0)), "created_by": str(r.get("CreatedBy") or r.get("createdBy") or "")}
            for r in reversed(rows)]


def image_size(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


@dataclass
class Container:
    """A running container of the image: its name, the host port of each port inside, a client on HTTP's."""

    name: str
    ports: dict[int, int]  # inside -> host
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url(HTTP_PORT), timeout=30)

    def url(self, inside: int) -> str:
        return f"http://127.0.0.1:{self.ports[inside]}"

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, check=False)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr


HTTP_PORT = 3000  # `bentoml serve`'s, in the image as in deploy/kubernetes/


def run_args(container: Container, image: str, models: Path, env: dict[str, str], extra: Sequence[str] = ()) -> list[str]:
    """`podman run` as the tests run it: locked down, read-only root, the repository mounted read-only at
    /models, every port inside published on a free port of the host's loopback."""
    published = [f"-p=127.0.0.1:{host}:{inside}" for inside, host in container.ports.items()]
    settings = [f"-e={k}={v}" for k, v in ({"IMGCLF_MODEL_REPO": "/models"} | env).items()]
    return ["run", "-d", "--name", container.name, "--read-only", "--network", "bridge", *LOCKED_DOWN,
            *published, *settings, "-v", f"{models}:/models:ro", *extra, image]


@contextmanager
def running(image: str, models: Path, name: str, env: dict[str, str] | None = None, ports: Sequence[int] = (),
            extra: Sequence[str] = ()) -> Iterator[Container]:
    """A started container (not yet ready: see wait_ready), removed with its anonymous volume afterwards.
    ``ports``: those inside to publish besides HTTP's."""
    container = Container(name, {inside: free_port() for inside in (HTTP_PORT, *ports)})
    podman("rm", "-f", "-v", name, check=False)
    try:
        podman(*run_args(container, image, models, env or {}, extra))
        yield container
    finally:
        container.client.close()
        podman("rm", "-f", "-v", "-t", "0", name, check=False)


def wait_ready(container: Container, timeout: float = 120) -> list[str]:
    """Polls /readyz until 200; what each poll saw ("refused", or the status code), in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = str(container.client.get("/readyz", timeout=5).status_code)
        except httpx.TransportError:
            status = "refused"
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "200":
            return seen
        state = podman("inspect", "--format", "{{.State.Status}}", container.name, check=False).stdout.strip()
        assert state == "running", f"the container is {state}:\n{container.logs()[-4000:]}"
        time.sleep(0.1)  # a poll interval, not a wait for something: the loop ends on the answer
    raise AssertionError(f"not ready in {timeout} s (saw {seen}):\n{container.logs()[-4000:]}")
