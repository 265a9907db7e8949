"""Reliability, round two: slow clients, job caps, a version that fails to load, write debris.

Real sockets against a real server; nothing here asserts a wall-clock bound (generous timeouts only
catch hangs).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from imgclf.devserver import LiveServer, running_server
from service.atomic import atomic_write_text
from tests.support.servers import IMAGE, NAME, classify, copy_repo, corrupt, serve
from tests.support.trust import metric

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`


@pytest.fixture
def repo(imagenet_repo: Path, tmp_path: Path):
    return copy_repo(imagenet_repo, tmp_path / "models")


# One server for the scenarios that only read: a 1 s grace period at 1,000 bytes/s (so a trickle is 408
# within seconds), 1 s keep-alive, one batch job at a time, and a request timeout far beyond any test's
# wait (so a request that is never answered shows as a hang, not as BentoML's 504).
EDGE = {"IMGCLF_UPLOAD_GRACE_S": "1", "IMGCLF_MIN_UPLOAD_RATE": "1000", "IMGCLF_KEEPALIVE_S": "1",
        "IMGCLF_MAX_BATCH_JOBS": "1", "IMGCLF_TIMEOUT_S": "600"}


@pytest.fixture(scope="module")
def edge(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve(imagenet_repo, tmp_path_factory.mktemp("edge_home"), **EDGE) as server:
        yield server


def _slow_upload(port: int, stop: threading.Event, outcomes: list[str]) -> None:
    """One attacker connection after another: headers for a 200 kB upload, then a byte every 0.2 s."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                             b"Content-Length: 200000\r\n\r\n--b\r\n")
                sock.settimeout(0.2)
                while not stop.is_set():
                    try:
                        answer = sock.recv(200)
                    except TimeoutError:
                        sock.sendall(b"x")
                        continue
                    outcomes.append(answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed")
                    break
        except OSError as exc:
            outcomes.append(type(exc).__name__)


def test_slow_uploads_do_not_lock_out_normal_clients(edge: LiveServer) -> None:
    """100 trickling uploads (reconnecting when dropped) while normal clients classify: all 200."""
    port = int(edge.url.rsplit(":", 1)[1])
    stop, outcomes = threading.Event(), []
    attackers = [threading.Thread(target=_slow_upload, args=(port, stop, outcomes), daemon=True)
                 for _ in range(100)]
    for thread in attackers:
        thread.start()
    try:
        time.sleep(1.0)  # the slow uploads hold every place they can get
        statuses = []
        for _ in range(20):
            statuses.append(classify(edge.client).status_code)
            time.sleep(0.2)
        held_then = edge.client.get("/metrics").text
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=60)
    assert statuses == [200] * 20
    assert any(o.startswith("HTTP/1.1 408") for o in outcomes), outcomes[:10]
    assert 'imgclf_errors_total{kind="timeout"}' in held_then


def test_an_upload_below_the_minimum_pace_gets_408_after_the_grace_period(edge: LiveServer) -> None:
    port = int(edge.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:  # we send nothing more: the server must answer by itself
            data = sock.recv(4096)
            if not data:
                break
            answer += data
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"upload too slow" in answer or sock.recv(4096).find(b"upload too slow") >= 0
    assert classify(edge.client).status_code == 200


def test_bodies_in_progress_are_capped_with_503_when_all_keep_the_pace(repo, tmp_path: Path) -> None:
    """With the pace check off nobody can be evicted: past the cap a new upload is 503 + Retry-After at once."""
    with serve(repo.root, tmp_path / "home", IMGCLF_MAX_RECEIVING="2", IMGCLF_MIN_UPLOAD_RATE="0") as server:
        port = int(server.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                             b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b")
            deadline = time.monotonic() + 60
            while metric(server.client.get("/metrics").text, "imgclf_receiving_bodies") < 2:  # both are in
                assert time.monotonic() < deadline
                time.sleep(0.05)
            response = classify(server.client)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1" and response.json()["kind"] == "overloaded"
            assert "uploads already in progress" in response.json()["error"]
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 60
        while classify(server.client).status_code != 200:  # the places come back when they hang up
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_an_upload_abandoned_midway_ends_its_request_at_once(edge: LiveServer) -> None:
    """A client that hangs up mid-body ends its request there, not at the request timeout (600 s on this
    server): BentoML's timeout middleware waits for a first answer, and a request that sent none held
    its place, and a worker's graceful shutdown, until the timeout (30 s by default)."""
    port = int(edge.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 77777\r\n\r\n--b")
    deadline = time.monotonic() + 60  # a hang guard, 10 x below the request timeout
    while "length=77777) (status=400" not in edge.log.read_text():
        assert time.monotonic() < deadline, edge.log.read_text()[-2000:]
        time.sleep(0.05)


def _zip_of_images(count: int) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i}.jpg", IMAGE)
    return out.getvalue()


def test_batch_submit_is_under_admission_control(edge: LiveServer) -> None:
    archive = _zip_of_images(200)
    answers = [edge.client.post("/batch/submit", files={"archive": ("a.zip", archive, "application/zip")})
               for _ in range(3)]
    codes = [a.status_code for a in answers]
    assert codes[0] == 200, answers[0].text
    assert 503 in codes[1:], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "5" and refused.json()["kind"] == "overloaded"
    task = answers[0].json()["task_id"]
    deadline = time.monotonic() + 300
    while edge.client.get("/batch/status", params={"task_id": task}).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    again = edge.client.post("/batch/submit", files={"archive": ("a.zip", archive, "application/zip")})
    assert again.status_code == 200, again.text  # the slot came back when the job ended


def test_a_version_that_fails_to_load_is_reported_and_the_others_serve(repo, tmp_path: Path) -> None:
    """Two models; one's production version is corrupt on disk: the worker stays up, /readyz says why."""
    import shutil

    shutil.copytree(repo.root / NAME, repo.root / "second")
    manifest_path = repo.root / "second" / "1" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace(f'"name": "{NAME}"', '"name": "second"'))
    corrupt(repo, repo.resolve(NAME))
    with running_server(repo.root, tmp_path / "home", ready_path="/livez") as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["kind"] == "not_ready" and f"{NAME}:1" in ready.json()["error"]
        assert "sha256" in ready.json()["error"]
        models = server.client.get("/models").json()
        assert [m["name"] for m in models["models"]] == ["second"] and f"{NAME}:1" in models["not_loaded"]
        ok = server.client.post("/classify", files={"image": ("c.jpg", IMAGE)}, data={"model": "second"})
        assert ok.status_code == 200, ok.text
        assert server.client.post("/classify", files={"image": ("c.jpg", IMAGE)},
                                  data={"model": NAME}).status_code == 404
        assert f"NOT serving {NAME}:1" in server.log.read_text()


def test_interrupted_atomic_writes_leave_debris_that_the_next_write_removes(tmp_path: Path) -> None:
    """A write killed midway leaves a hidden temporary file; the next write in that folder removes it."""
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "from service.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_text('half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    target = tmp_path / "state.json"
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=Path(__file__).parents[1],
                            check=False, timeout=60)
    assert result.returncode == -9
    debris = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(debris) == 1 and not target.exists()
    atomic_write_text(tmp_path / "other.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_keep_alive_connections_that_sit_idle_are_closed(edge: LiveServer) -> None:
    port = int(edge.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(30)
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes (a 30 s timeout would raise instead)
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1



def _workers(server) -> list:
    import psutil

    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "Classifier" in " ".join(p.cmdline()) or "_bentoml_impl.worker" in " ".join(p.cmdline())]


def test_a_job_whose_worker_dies_reports_failed_and_a_restart_forgets_jobs(repo, tmp_path: Path) -> None:
    import signal

    home = tmp_path / "home"
    archive = _zip_of_images(3000)
    with serve(repo.root, home) as server:
        done = server.client.post("/batch/submit", files={"archive": ("a.zip", _zip_of_images(2), "application/zip")})
        deadline = time.monotonic() + 300
        while server.client.get("/batch/status", params={"task_id": done.json()["task_id"]}).json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        task = server.client.post("/batch/submit", files={"archive": ("a.zip", archive, "application/zip")}).json()
        claims = home / "bentoml" / "imgclf-jobs" / f"{task['task_id']}.pid"
        while not claims.exists():  # the job has started in the worker
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (victim,) = [p for p in _workers(server) if p.pid == int(claims.read_text())]
        victim.send_signal(signal.SIGKILL)
        status = None
        while status != "failed":  # once the arbiter's new worker is up, the orphan is marked failed
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
            try:
                status = server.client.get("/batch/status", params={"task_id": task["task_id"]}).json()["status"]
            except Exception:  # noqa: BLE001 - the worker is being replaced
                status = None
        assert "marked 1 batch job(s) failed" in server.log.read_text()
        lost = server.client.get("/batch/get", params={"task_id": task["task_id"]})  # was a 500 with a TypeError
        assert (lost.status_code, lost.json()["kind"]) == (500, "job_lost") and "submit" in lost.json()["error"]
    with serve(repo.root, home) as server:  # a whole restart: BentoML recreates its task store
        for old in (done.json()["task_id"], task["task_id"]):
            answer = server.client.get("/batch/status", params={"task_id": old})
            assert answer.status_code == 404 and answer.json()["kind"] == "not_found", answer.text


def test_default_settings_serve_with_one_worker_per_core(repo, tmp_path: Path) -> None:
    """No IMGCLF_* at all: one worker per usable core, each answering (the fast configuration by default)."""
    from service.settings import usable_cores

    with running_server(repo.root, tmp_path / "home") as server:
        deadline = time.monotonic() + 120
        while len(_workers(server)) < usable_cores():  # the arbiter starts them one after another
            assert time.monotonic() < deadline, _workers(server)
            time.sleep(0.2)
        assert len(_workers(server)) == usable_cores()
        assert all(classify(server.client).status_code == 200 for _ in range(8))
