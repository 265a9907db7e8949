"""What service/http/bento.py assumes of BentoML's internals: one test per assumption.

Each test exercises the installed BentoML itself (its container, its task store class, its ASGI app) and
fails with a message naming the assumption when an upgrade breaks it; the fix then belongs in
service/http/bento.py (the one module that uses BentoML's private API), not in its callers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import bentoml
import pytest

from service.http import bento
from service.http.errors import ServiceError

ROOT = Path(__file__).resolve().parents[1]
FIX = "BentoML changed under service/http/bento.py: fix that module for the installed BentoML"


def _rows(store: Path) -> dict[str, tuple[str, str | None]]:
    """task_id -> (status, completed_at), read with plain sqlite3."""
    with sqlite3.connect(store) as db:
        return {task: (status, done) for task, status, done in
                db.execute("SELECT task_id, status, completed_at FROM result")}


def _request(body: bytes = b"") -> object:
    """A Starlette request, as BentoML's task store serialises a submitted one."""
    from starlette.requests import Request

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/batch/submit", "headers": [], "query_string": b""}
    return Request(scope, receive)


def _probe_service() -> bentoml.Service:
    """A service with one task that answers the id bento.task_id reads in it."""

    @bentoml.service(metrics={"enabled": False})  # no Prometheus series registered in the test process
    class Probe:
        @bentoml.task
        async def probe(self, ctx: bentoml.Context, text: str = "") -> str:
            return str(bento.task_id(ctx))

    return Probe


def test_home_and_task_store_follow_BENTOML_HOME(tmp_path: Path) -> None:
    """BentoMLContainer.bentoml_home is BENTOML_HOME and .result_store_file is BENTOML_HOME/task_result.db.

    In a fresh interpreter: the container remembers both for the life of the process.
    """
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_RESULT_STORE"} | {"BENTOML_HOME": str(home)}
    code = ("import json; from service.http import bento; "
            "print(json.dumps([str(bento.home()), str(bento.jobs_folder()), str(bento.task_store())]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, (
        f"{FIX}: reading BentoMLContainer.bentoml_home / .result_store_file "
        f"(bentoml._internal.configuration.containers) failed:\n{result.stderr[-3000:]}")
    got_home, jobs, store = (Path(p).resolve() for p in json.loads(result.stdout.strip().splitlines()[-1]))
    assert got_home == home.resolve(), f"{FIX}: BentoMLContainer.bentoml_home is {got_home}, not BENTOML_HOME {home}"
    assert jobs == home.resolve() / "imgclf-jobs", f"{FIX}: jobs_folder() is {jobs}"
    assert store == home.resolve() / "task_result.db", (
        f"{FIX}: BentoMLContainer.result_store_file is {store}, not BENTOML_HOME/task_result.db "
        "(docs/operations.md and service/http/batch_task.py name that file too)")


def test_the_task_store_has_the_table_and_states_fail_tasks_writes(tmp_path: Path) -> None:
    """BentoML's Sqlite3Store keeps tasks in table `result` (task_id, status, completed_at), with the
    states 'in_progress' and 'failed' that fail_tasks' SQL names."""
    from _bentoml_impl.tasks.result import ResultStatus, Sqlite3Store

    store = tmp_path / "task_result.db"
    Sqlite3Store.init_db(str(store))
    with sqlite3.connect(store) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(result)")}
    assert {"task_id", "status", "completed_at"} <= columns, (
        f"{FIX}: BentoML's task table `result` (_bentoml_impl/tasks/result.py, Sqlite3Store.init_db) has "
        f"columns {sorted(columns) or 'none: no such table'}; fail_tasks updates task_id, status, completed_at")
    assert (ResultStatus.IN_PROGRESS.value, ResultStatus.FAILED.value) == ("in_progress", "failed"), (
        f"{FIX}: BentoML's task states (_bentoml_impl.tasks.result.ResultStatus) are now "
        f"{[s.value for s in ResultStatus]}; fail_tasks writes 'failed' where it finds 'in_progress'")


def test_fail_tasks_fails_running_tasks_and_leaves_finished_ones(tmp_path: Path) -> None:
    """On a store BentoML's own Sqlite3Store writes and reads: a running task becomes failed, a completed
    one and an unknown id are left alone, and BentoML reads the failed state back."""
    from _bentoml_impl.tasks.result import ResultStatus, Sqlite3Store
    from starlette.responses import Response

    store = tmp_path / "task_result.db"
    Sqlite3Store.init_db(str(store))

    lost = ServiceError(500, "job_lost", "the worker died")

    async def scenario() -> tuple[int, ResultStatus, ResultStatus, Any]:
        async with Sqlite3Store(str(store)) as tasks:  # open, as a serving worker holds it
            running = await tasks.new_entry("batch", _request(b"running"))
            done = await tasks.new_entry("batch", _request(b"done"))
            await tasks.set_result(done, Response("rows"), ResultStatus.COMPLETED)
            try:
                marked = await asyncio.to_thread(bento.fail_tasks, store, [running, done, "no-such-task"], lost)
            except sqlite3.Error as exc:
                pytest.fail(f"{FIX}: fail_tasks' SQL no longer fits BentoML's task table "
                            f"(_bentoml_impl/tasks/result.py, Sqlite3Store.init_db): {exc}")
            result = (await tasks.get(running)).result  # what BentoML's /get answers
            return marked, (await tasks.get_status(running)).status, (await tasks.get_status(done)).status, result

    marked, running_status, done_status, result = asyncio.run(scenario())
    assert (result.status_code, json.loads(result.body)) == (500, json.loads(lost.body())), (
        f"{FIX}: BentoML no longer reads back the result fail_tasks writes (_bentoml_impl/tasks/serde.py)")
    assert running_status is ResultStatus.FAILED, (
        f"{FIX}: fail_tasks left a running task {running_status.value!r} in BentoML's task store")
    assert done_status is ResultStatus.COMPLETED, f"{FIX}: fail_tasks changed a completed task to {done_status.value!r}"
    assert marked == 1, f"{FIX}: fail_tasks reported {marked} tasks marked, 1 expected"
    assert all(done is not None for _, done in _rows(store).values()), f"{FIX}: completed_at not set: {_rows(store)}"
    assert bento.fail_tasks(tmp_path / "absent.db", ["x"], lost) == 0 and not (tmp_path / "absent.db").exists()


def test_a_queued_task_finds_its_id_on_the_request_state(tmp_path: Path) -> None:
    """BentoML's app sets request.state.task_id before it runs a task submitted to /<route>/submit (and
    not for a direct call); its server keeps the tasks in the file task_store() names."""
    from _bentoml_impl.server.serving import server_on_deployment
    from bentoml._internal.configuration.containers import BentoMLContainer
    from starlette.testclient import TestClient

    probe = _probe_service()
    store = tmp_path / "task_result.db"
    saved = copy.deepcopy(BentoMLContainer.config.get())  # to_asgi() loads BentoML's config for the probe
    try:
        with BentoMLContainer.result_store_file.patch(str(store)):
            server_on_deployment(probe, result_file=str(bento.task_store()))  # what a server start does
            with TestClient(probe.to_asgi()) as client:
                submitted = client.post("/probe/submit", json={"text": "x"})
                assert submitted.status_code == 200, (
                    f"{FIX}: BentoML's app could not queue a task in the store task_store() names "
                    f"(BentoMLContainer.result_store_file, read in _bentoml_impl/server/app.py): {submitted.text}")
                task = submitted.json()["task_id"]
                answer = client.get("/probe/get", params={"task_id": task})  # the task has run by now
                direct = client.post("/probe", json={"text": "x"})
    finally:
        BentoMLContainer.config.set(saved)
    assert answer.status_code == 200 and answer.text == task, (
        f"{FIX}: a queued task read task_id {answer.text!r} (status {answer.status_code}), not its id {task!r}: "
        "BentoML no longer sets request.state.task_id in ServiceAppFactory._run_task "
        "(_bentoml_impl/server/app.py); service/http/app.py's batch task needs it for its job claims")
    assert direct.text == "None", f"{FIX}: a direct (not queued) call read task_id {direct.text!r}"
    assert task in _rows(store), (
        f"{FIX}: the server kept task {task} somewhere other than BentoMLContainer.result_store_file, "
        "the store fail_tasks updates")


def test_a_server_start_recreates_the_task_store(tmp_path: Path) -> None:
    """Starting a server deletes and recreates BentoML's task store, so a restart forgets every task
    (docs/operations.md: an old task_id answers 404; tests/test_reliability.py relies on it)."""
    from _bentoml_impl.server.serving import server_on_deployment
    from _bentoml_impl.tasks.result import Sqlite3Store

    store = tmp_path / "task_result.db"
    Sqlite3Store.init_db(str(store))
    with sqlite3.connect(store) as db:
        db.execute("INSERT INTO result (task_id, name, status) VALUES ('old', 'probe', 'in_progress')")
    server_on_deployment(_probe_service(), result_file=str(store))
    try:
        rows = _rows(store)
    except sqlite3.OperationalError as exc:
        pytest.fail(f"{FIX}: after a server start BentoML's task store has no table `result`: {exc}")
    assert rows == {}, (
        f"{FIX}: a server start kept earlier tasks {rows} (_bentoml_impl/server/serving.py "
        "server_on_deployment no longer recreates the store); update docs/operations.md and the "
        "JobClaims docstring in service/http/batch_task.py")
