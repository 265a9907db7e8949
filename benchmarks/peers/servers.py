"""The servers of the comparison: how each is set up once, started for a round, and spoken to.

Every server runs in its own process group (``imgclf.devserver.running_server``), which is stopped
when its round is over, so only one server is up at a time. ``prepare`` makes the peer's venv and
model files (and raises PeerUnavailable, with the reason, where that cannot be done here).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.loadgen import multipart_request
from benchmarks.machine import NO_CACHE
from benchmarks.peers import torchserve as ts
from benchmarks.peers import triton
from benchmarks.peers.envs import PeerUnavailable
from imgclf.devserver import running_server

TUNED_ENV = {"IMGCLF_WORKERS": "2", "IMGCLF_INTRA_OP_THREADS": "1"}


@dataclass
class Running:
    """A server that answers: where, its root process, and how to turn image bytes into a prepared request."""

    url: str
    pid: int
    build: Callable[[bytes], bytes]
    ready_s: float
    log: Path
    details: Callable[[], dict[str, Any]] = dict  # what the server says about itself, for the results


@dataclass
class Server:
    key: str
    label: str
    prepare: Callable[[Path], dict[str, Any]]  # once per run; returns what the results record about it
    start: Callable[[Path], AbstractContextManager[Running]]  # a fresh server in the given work folder
    info: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free on loopback (Triton and TorchServe take three)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for p in range(base + 1, base + n):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports found")


def _bentoml_workers(pid: int) -> int:
    """How many BentoML worker processes serve: what "default settings" turned out to mean."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    count = 0
    for p in procs:
        try:
            count += any("_bentoml_impl.worker" in part for part in p.cmdline())
        except psutil.Error:
            pass
    return count


def _host(url: str) -> str:
    return url.split("://", 1)[1]


def imgclf_server(key: str, label: str, repo: Path, env: dict[str, str], checkout: Path | None = None) -> Server:
    """imgclf serving ``repo``; ``checkout``: another commit's tree (a git worktree) serves its own code."""
    env = {**env, **NO_CACHE}  # the image work is what is compared (an older checkout ignores the variable)
    if checkout is not None:  # BentoML imports the service from its working directory, its workers too
        env = {**env, "PYTHONPATH": str(checkout)}

    @contextmanager
    def start(work: Path) -> Iterator[Running]:
        with running_server(repo, work, env, timeout_s=180, cwd=checkout) as srv:
            host = _host(srv.url)
            yield Running(srv.url, srv.proc.pid, lambda d: multipart_request(host, "/classify", "image", "image.jpg", d),
                          srv.ready_s, srv.log, lambda: {"worker_processes": _bentoml_workers(srv.proc.pid)})

    return Server(key, label, prepare=lambda work: {"env": env}, start=start)


def triton_server(version: Any, setup_timeout_s: float) -> Server:
    state: dict[str, Any] = {}

    def prepare(work: Path) -> dict[str, Any]:
        env = triton.triton_env()
        env_dir = env.ensure(setup_timeout_s)
        install = triton.TritonInstall.prepare(env_dir)
        m = version.manifest
        repository = triton.write_model_repository(work / "triton-models", version.model_path,
                                                   m.preprocessing.model_dump_json(), m.labels, triton.site_dirs(install))
        state.update(env_dir=env_dir, install=install, repository=repository)
        return {"package": triton.TRITON_VERSION, "venv": _versions(env_dir, ("numpy", "pillow", "onnxruntime")),
                "instances": 2, "intra_op_threads": 1, "max_batch_size": 32, "max_queue_delay_us": 2000}

    @contextmanager
    def start(work: Path) -> Iterator[Running]:
        port = free_ports(3)
        install, env_dir = state["install"], state["env_dir"]
        command = triton.server_command(install, state["repository"], port)
        with running_server(None, work, triton.server_env(install, env_dir), command=command, port=port,
                            ready_path=triton.ready_path(), timeout_s=180) as srv:
            host = _host(srv.url)
            yield Running(srv.url, srv.proc.pid, lambda d: triton.v2_request(host, d), srv.ready_s, srv.log,
                          lambda: triton.stack_from_log(srv.log))

    return Server("triton", "Triton 2.51 (`nvidia-pytriton` wheel), Python backend: imgclf's `image_to_tensor` "
                  "+ ONNX Runtime, dynamic batching, 2 instances x 1 thread", prepare, start)


def torchserve_server(version: Any, setup_timeout_s: float) -> Server:
    state: dict[str, Any] = {}

    def prepare(work: Path) -> dict[str, Any]:
        java = ts.check_java()
        env_dir = ts.torchserve_env().ensure(setup_timeout_s)
        store = ts.build_model_store(env_dir, work / "torchserve", version.manifest.labels)
        state.update(env_dir=env_dir, store=store)
        return {"java": java, "venv": _versions(env_dir, ("torchserve", "torch", "torchvision", "pillow")),
                "registration": ts.TUNED}

    @contextmanager
    def start(work: Path) -> Iterator[Running]:
        port = free_ports(3)
        env_dir, store = state["env_dir"], state["store"]
        work.mkdir(parents=True, exist_ok=True)
        config = ts.write_config(work, store, port)
        command = ts.server_command(env_dir, config, store)
        with running_server(None, work, ts.server_env(env_dir, work), command=command, port=port,
                            ready_path="/ping", timeout_s=180) as srv:
            registered_s = ts.register(port)
            host = _host(srv.url)
            yield Running(srv.url, srv.proc.pid, lambda d: ts.raw_request(host, d), srv.ready_s + registered_s,
                          srv.log)

    return Server("torchserve", "TorchServe 0.12, tuned (batch 8, 1 worker), traced Lite0, stock handler",
                  prepare, start)


def _versions(env_dir: Path, names: tuple[str, ...]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", code, *names], capture_output=True, text=True,
                         timeout=120, check=False)
    if out.returncode != 0:
        raise PeerUnavailable(f"the venv {env_dir} does not run: {out.stderr[-300:]}")
    return json.loads(out.stdout)
