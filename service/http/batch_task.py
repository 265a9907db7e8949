"""Boundary checks of the ``/batch`` task, done in the request guard before a job is queued.

BentoML validates a task's inputs only when the task runs; a bad ``top_k`` or ``model`` would be a
200 with a job id and a failure later. These checks give the same 4xx answers ``/classify`` gives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from service.atomic import atomic_write_text, pid_alive
from service.batch.archive import ArchiveLimits
from service.http.bento import fail_tasks
from service.http.classify import form_options
from service.http.errors import Overloaded, ServiceError
from service.http.live import LiveCatalog
from service.settings import Settings

log = logging.getLogger(__name__)


class JobSlots:
    """How many /batch jobs this worker has queued or running; a submit past ``cap`` is a 503.

    A slot is taken when a submit passes the guard's checks and given back when its job ends
    (``running``), so a flood of submits cannot queue unbounded work behind a 200.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.taken = 0

    def take(self) -> None:
        """A slot for a job about to be queued, or Overloaded (503, Retry-After: 5)."""
        if self.taken >= self.cap:
            raise Overloaded(f"{self.taken} batch jobs already queued or running on this worker "
                             f"(limit {self.cap}); retry after 5 s", 5)
        self.taken += 1

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around a job's run: its slot is free again when it ends, however it ends."""
        try:
            yield
        finally:
            self.taken = max(0, self.taken - 1)


class JobClaims:
    """Which worker runs which /batch job, so that a job whose worker died reports itself as failed.

    BentoML keeps task states in SQLite (``BENTOML_HOME/task_result.db``) and marks a job completed
    or failed only from the worker running it: a worker killed mid-job (OOM, SIGKILL) would leave it
    "in_progress" forever. Each running job holds a claim file naming its worker's pid; a worker
    starting up marks the jobs of dead claimants failed. A whole-server restart is different: BentoML
    recreates the task store at start, so every earlier job is then unknown (404), never running.
    """

    def __init__(self, folder: Path, store: Path) -> None:
        self.folder = folder
        self.store = store

    @contextlib.contextmanager
    def claim(self, task_id: str | None) -> Iterator[None]:
        if task_id is None:  # a direct POST /batch call, not a queued job
            yield
            return
        path = self.folder / f"{task_id}.pid"
        atomic_write_text(path, str(os.getpid()))
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def fail_orphans(self) -> list[str]:
        """Mark failed the in-progress jobs whose worker is gone; returns their ids."""
        orphans = []
        for path in sorted(self.folder.glob("*.pid")) if self.folder.is_dir() else []:
            try:
                pid = int(path.read_text())
            except (OSError, ValueError):
                pid = -1
            if pid == os.getpid() or pid_alive(pid):
                continue
            orphans.append(path.stem)
            path.unlink(missing_ok=True)
        lost = ServiceError(500, "job_lost", "the worker running this job stopped before it finished (killed, "
                            "or out of memory); submit the archive again")
        if fail_tasks(self.store, orphans, lost):
            log.warning("marked %d batch job(s) failed: their worker died while running them: %s",
                        len(orphans), orphans)
        return orphans


class JobFields:
    """``top_k`` and ``model`` of a /batch/submit, checked against what ``live`` serves before the job
    is queued (a bad one is a 4xx now, not a failed job after a 200), then a job slot taken."""

    def __init__(self, live: LiveCatalog, slots: JobSlots) -> None:
        self.live = live
        self.slots = slots

    def __call__(self, fields: dict[str, str]) -> None:
        """ServiceError for the client's mistake, the same answers /classify gives from the same checks."""
        top_k, model = form_options(fields)
        self.live.current.select(model, top_k)
        self.slots.take()


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(max_entries=settings.max_archive_entries, max_total_bytes=settings.max_archive_expanded_bytes,
                         max_entry_bytes=settings.max_upload_bytes, max_ratio=settings.max_archive_ratio)
