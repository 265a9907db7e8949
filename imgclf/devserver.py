"""A real `imgclf serve` in a subprocess on a free local port: for tests, benchmarks and scripts.

Like ``bentoml.serve(...)`` for this project: start the server with extra ``IMGCLF_*`` settings, wait
until ``/readyz`` answers 200, hand back a client, and stop the whole process group afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(repo: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "imgclf.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port)]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` and its live descendants (a server and
    its workers); 0 when the process is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@dataclass
class LiveServer:
    """A running server: a client on its base URL, its process, its log and how long it took to be ready."""

    client: httpx.Client
    url: str
    proc: subprocess.Popen
    log: Path
    ready_s: float

    def rss(self) -> int:
        """Resident memory of the whole process tree (BentoML's arbiter and its workers), in bytes."""
        root = psutil.Process(self.proc.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total


@contextmanager
def running_server(
    repo: Path | None, home: Path, env: Mapping[str, str] | None = None, *, command: Sequence[str] | None = None,
    port: int | None = None, timeout_s: float = 120, client_timeout_s: float = 30, ready_path: str = "/readyz",
    cwd: Path | None = None,
) -> Iterator[LiveServer]:
    """`imgclf serve --repo REPO` (or ``command``, which must listen on ``port``) with ``env`` added.

    ``home`` holds BENTOML_HOME, the server's TMPDIR and ``server.log``. ``cwd`` (default: this
    checkout) is where BentoML imports the service from, so another checkout serves its own code.
    Raises RuntimeError with the log's tail when the server exits or is not ready within ``timeout_s``.
    """
    port = port or free_port()
    if command is None:
        if repo is None:
            raise ValueError("give a repository or a command")
        command = serve_command(repo, port)
    tmp = home / "tmp"  # request spools of a killed worker stay here, not in the machine's /tmp
    tmp.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "TMPDIR": str(tmp), "BENTOML_DO_NOT_TRACK": "true",
                **(env or {})}
    log_path = home / "server.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(command), cwd=cwd or ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=client_timeout_s)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"server not ready after {timeout_s:.0f}s: {log_path.read_text()[-3000:]}")
            try:
                if client.get(ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield LiveServer(client, url, proc, log_path, time.perf_counter() - started)
    finally:
        client.close()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
