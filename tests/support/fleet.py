"""Replicas of `imgclf serve` sharing one bucket, a load generator over them, and waiting for them to agree.

Each replica is a real server process with its own cache (``IMGCLF_REPO_CACHE``) and its own home; they
poll the bucket's aliases every half second. :class:`Load` sends /classify without pause from a few
threads, round robin over the replicas it is given, and keeps every answer, so a test can say that
none failed while the fleet changed versions underneath.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from imgclf.devserver import LiveServer
from service.repository import Repository, copy_writer

from .servers import IMAGE, NAME, serve

POLL = "0.5"  # IMGCLF_POLL_SECONDS of every replica
WAIT_S = 120.0  # a hang guard for convergence, never a speed requirement


def publish_copy(repo: Repository, source: Path, **changes: Any) -> int:
    """A new version with the files of the local version folder ``source`` and its manifest, with
    ``changes`` (e.g. ``labels=`` shuffled: a deliberately worse candidate). Returns its number."""
    return repo.add_version(NAME, copy_writer(source, **changes)).manifest.version


@contextmanager
def replicas(store: str, root: Path, env: dict[str, str], count: int = 2, **extra: str) -> Iterator[list[LiveServer]]:
    """``count`` replicas of ``store``, each with its own cache and home under ``root``."""
    with ExitStack() as stack:
        yield [stack.enter_context(replica(store, root, i, env, **extra)) for i in range(count)]


@contextmanager
def replica(store: str, root: Path, index: int, env: dict[str, str], **extra: str) -> Iterator[LiveServer]:
    settings = {"IMGCLF_REPO_CACHE": str(root / f"cache{index}"), "IMGCLF_POLL_SECONDS": POLL, **env, **extra}
    with serve(store, root / f"replica{index}", **settings) as live:  # type: ignore[arg-type]
        yield live


def models(server: LiveServer) -> dict[str, Any]:
    response = server.client.get("/models")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(what: str, check: Any, timeout_s: float = WAIT_S) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout_s`` (a hang guard)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.1)


def serving(server: LiveServer) -> list[int]:
    return sorted(m["version"] for m in models(server)["models"])


def wait_until_serving(servers: list[LiveServer], versions: list[int]) -> None:
    for server in servers:
        wait_for(f"{server.url} serves {versions} (serves {serving(server)})", lambda s=server: serving(s) == versions)


@dataclass
class Answer:
    url: str
    status: int  # 0: no HTTP answer at all (connection refused or reset)
    version: int | None
    error: str = ""


@dataclass
class Load:
    """/classify sent without pause by ``threads`` threads, round robin over ``urls``; every answer kept."""

    urls: list[str]
    threads: int = 2
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Self:
        self._workers = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=120)

    def _send(self, offset: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = offset
            while not self._stop.is_set():
                url = self.urls[i % len(self.urls)]
                i += 1
                try:
                    response = client.post(f"{url}/classify", files={"image": ("cat.jpg", IMAGE)}, data={"top_k": "1"})
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(url, 0, None, repr(exc)))
                    continue
                ok = response.status_code == 200
                self.answers.append(Answer(url, response.status_code, response.json()["version"] if ok else None,
                                           "" if ok else response.text[:300]))

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def versions(self, url: str) -> set[int | None]:
        return {a.version for a in self.answers if a.url == url}
