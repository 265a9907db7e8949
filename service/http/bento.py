"""Every use of BentoML's private API, in one place.

BentoML 1.4 gives no public way to learn its home folder or its task store, to mark a task failed, or
to learn a queued task's id, and the service needs all four for its ``/batch`` jobs
(:class:`service.http.batch_task.JobClaims`). Each function below rests on one assumption about
BentoML's internals; ``tests/test_bentoml_assumptions.py`` checks each against the installed BentoML,
so an upgrade that breaks one fails there, naming it, instead of in production. Nothing else in
``service/`` may touch ``bentoml._internal`` or BentoML's task table (``tests/test_code_shape.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from _bentoml_impl.tasks.serde import JSONSerde
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse

from service.http.errors import ServiceError, record, service_error

if TYPE_CHECKING:
    from collections.abc import Iterator

    import bentoml

#: The folder under BENTOML_HOME that holds the service's own job claims.
JOBS_FOLDER = "imgclf-jobs"
# The loggers bentoml._internal.log's server configuration gives handlers to, in the serving process and
# in every worker, before the service module is imported (service/http/logs.py reformats them).
SERVER_LOGGERS = ("", "bentoml", "circus", "uvicorn.error")


def home() -> Path:
    """BENTOML_HOME as BentoML resolved it (``~/bentoml`` by default); read once per process by BentoML."""
    return Path(BentoMLContainer.bentoml_home.get())


def jobs_folder() -> Path:
    """Where the service keeps its job claims: ``BENTOML_HOME/imgclf-jobs``."""
    return home() / JOBS_FOLDER


def task_store() -> Path:
    """The SQLite file of BentoML's task states: ``BENTOML_HOME/task_result.db``, or BENTOML_RESULT_STORE.

    BentoML deletes and recreates it when a server starts. With ``BENTOML_RESULT_STORE=:memory:`` it is
    no file at all (the path then never exists).
    """
    return Path(BentoMLContainer.result_store_file.get())


def fail_tasks(store: Path, task_ids: list[str], error: ServiceError) -> int:
    """Mark failed the tasks of ``task_ids`` still ``in_progress`` in BentoML's task ``store``, with
    ``error`` as their result.

    Tasks in any other state (completed, failed, canceled) and unknown ids are left alone. BentoML's
    ``/status`` then answers ``failed`` and its ``/get`` answers ``error`` (without a stored result it
    answered a 500 with a TypeError's text). The result is written with BentoML's own serializer.
    Returns how many tasks were marked; nothing is done (0) when ``task_ids`` is empty or the store
    does not exist.
    """
    if not task_ids or not store.exists():
        return 0
    answer = JSONResponse(json.loads(error.body()), error.status, {
        k.decode("latin-1"): v.decode("latin-1") for k, v in error.headers})
    result = asyncio.run(JSONSerde().serialize_response(answer))  # called off the event loop (a thread)
    with contextlib.closing(sqlite3.connect(store, timeout=30)) as db, db:
        cursor = db.executemany(
            "UPDATE result SET status = 'failed', result = ?, completed_at = CURRENT_TIMESTAMP "
            "WHERE task_id = ? AND status = 'in_progress'",
            [(result, task) for task in task_ids],
        )
        return cursor.rowcount


def task_id(ctx: bentoml.Context) -> str | None:
    """The id of the queued task ``ctx`` runs (``POST /<route>/submit``); None for a direct call.

    BentoML sets it on the request's state just before it runs a queued task.
    """
    value = getattr(ctx.request.state, "task_id", None)
    return value if isinstance(value, str) else None


class _Refused(BentoMLException):
    """What BentoML is given for a ServiceError: it answers the status; the renderer, the body."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error_code = HTTPStatus(error.status)  # BentoML answers with this status


@contextlib.contextmanager
def bentoml_errors() -> Iterator[None]:
    """Around the body of a BentoML API or task: BentoML catches what an API raises and answers in its
    own shape, so a ServiceError (or a foreign error that maps to one) is recorded for the renderer
    (:func:`service.http.errors.record`) and handed to BentoML with its status."""
    try:
        yield
    except Exception as exc:
        error = service_error(exc)
        if error is None:
            raise
        record(error)
        raise _Refused(error) from exc
