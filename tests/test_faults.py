"""Reliability under overload and faults, for real: a flood at several times capacity, a worker
SIGKILLed under load, the served model deleted or corrupted on disk, exports interrupted at every
step or by a full disk, and a short soak. One `imgclf serve` subprocess serves the server tests."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from imgclf.devserver import LiveServer
from service.atomic import atomic_write_json
from service.http.admission import MIN_SAMPLES, Admission, AdmissionControl, LoadEstimate
from service.http.errors import ErrorResponses
from service.repository import (
    ALIASES,
    MODEL_FILE,
    ModelRepository,
    RepositoryError,
    VerificationError,
)
from service.settings import Settings
from tests.support import ROOT
from tests.support.diskfaults import Faults
from tests.support.servers import (
    NAME,
    RELOAD_GROWTH_LIMIT_MB,
    TOKEN,
    add_copy,
    classify,
    copy_repo,
    corrupt,
    reload,
    serve,
    served_version,
    switch_to,
)

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

QUEUE, BUDGET_MS = 16, 400  # admission settings of the test server (a 2-core machine does ~30 images/s)


# --- admission control in process: the arithmetic and the ASGI contract --------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_service_time_is_busy_time_per_completion() -> None:
    """Idle gaps do not count; overlapping requests share the busy time (what batching buys)."""
    clock = FakeClock()
    load = LoadEstimate(window=16, clock=clock)
    for _ in range(MIN_SAMPLES - 1):
        load.started()
        clock.now += 0.050
        load.finished()
        clock.now += 5.0  # idle: not service time
    assert load.service_s is None  # too few samples to trust
    load.started()
    clock.now += 0.050
    load.finished()
    assert load.service_s == pytest.approx(0.050)
    for _ in range(16):  # 4 at a time, finishing together every 80 ms: 20 ms of worker time each
        for _ in range(4):
            load.started()
        clock.now += 0.080
        for _ in range(4):
            load.finished()
    assert load.service_s == pytest.approx(0.020)
    load.started()
    load.started()
    assert load.predicted_s() == pytest.approx(3 * 0.020)


def _http_scope(path: str, method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": []}


def test_admission_refuses_before_reading_the_body_and_spares_health() -> None:
    held = asyncio.Event()
    entered: list[str] = []
    errors: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        entered.append(scope["path"])
        if (scope["method"], scope["path"]) == ("POST", "/classify"):
            await held.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def never_read() -> dict:
        raise AssertionError("a refused request's body must not be read")

    control = AdmissionControl(app, Admission(max_queue=2, latency_budget_ms=0), routes=["/classify"])
    admission = ErrorResponses(control, count=errors.append)  # refusals are raised, rendered and counted there

    async def call(path: str, method: str = "POST") -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await admission(_http_scope(path, method), never_read, send)
        return sent

    async def scenario() -> None:
        in_flight = [asyncio.create_task(call("/classify")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert control.admission.load.in_flight == 2
        refused = await asyncio.wait_for(call("/classify"), 1)  # answered at once, not queued
        start = refused[0]
        assert start["status"] == 503
        headers = dict(start["headers"])
        assert headers[b"retry-after"].isdigit() and int(headers[b"retry-after"]) >= 1
        body = json.loads(refused[1]["body"])
        assert (body["kind"], body["status"]) == ("overloaded", 503) and "2 requests already in flight" in body["error"]
        assert errors == ["overloaded"]
        for path, method in (("/livez", "GET"), ("/readyz", "GET"), ("/metrics", "GET"), ("/admin/reload", "POST"),
                             ("/classify", "GET")):
            assert (await asyncio.wait_for(call(path, method), 1))[0]["status"] == 200, path  # never refused
        held.set()
        for task in in_flight:
            assert (await task)[0]["status"] == 200
        assert control.admission.load.in_flight == 0
        assert (await call("/classify"))[0]["status"] == 200  # room again

    asyncio.run(scenario())
    assert entered.count("/classify") == 4  # 2 held, the GET, 1 after: the refused one never reached the app


def test_latency_budget_uses_the_measured_service_time() -> None:
    clock = FakeClock()
    admission = Admission(max_queue=100, latency_budget_ms=300, estimate=LoadEstimate(clock=clock))
    load = admission.load
    for _ in range(MIN_SAMPLES):
        load.started()
        clock.now += 0.100
        load.finished()
    assert admission.refusal() is None  # idle: always admitted, whatever the estimate
    load.started()
    load.started()
    assert admission.refusal() is None  # (2 + 1) x 100 ms = 300 ms: within the budget
    load.started()
    why, retry_after = admission.refusal()  # 400 ms predicted
    assert "estimated latency 400 ms" in why and retry_after == 1
    for _ in range(30):
        load.started()
    assert admission.refusal()[1] == 4  # 33 in flight x 100 ms to drain, rounded up


def test_queue_must_stay_below_bentomls_backstop() -> None:
    defaults = Settings()
    assert defaults.max_queue < defaults.max_concurrency
    with pytest.raises(ValueError, match="IMGCLF_MAX_QUEUE"):
        Settings.from_env({"IMGCLF_MAX_QUEUE": "64", "IMGCLF_MAX_CONCURRENCY": "64"})


# --- one real server for the scenarios below ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = copy_repo(imagenet_repo, tmp_path_factory.mktemp("faults") / "models")
    assert add_copy(repo) == 2
    return repo


@pytest.fixture(scope="module")
def server(repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # The response cache off: the flood and the soak send the same photos again and again, and what they
    # load is decoding and inference (a cache hit answers in a millisecond and no flood would overload it).
    with serve(repo.root, tmp_path_factory.mktemp("bentoml_home_faults"), IMGCLF_ADMIN_TOKEN=TOKEN,
               IMGCLF_MAX_QUEUE=str(QUEUE), IMGCLF_LATENCY_BUDGET_MS=str(BUDGET_MS), IMGCLF_CACHE_ENTRIES="0") as srv:
        yield srv


def workers(server: LiveServer) -> list[psutil.Process]:
    """The BentoML worker processes under the `imgclf serve` (arbiter) process."""
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]


def test_overload_is_refused_fast_and_the_service_recovers(server: LiveServer, tmp_path: Path) -> None:
    before = [p.pid for p in workers(server)]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.overload", "--url", server.url, "--factor", "4", "--seconds", "5",
         "--baseline-seconds", "2", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "overload.json").read_text())["result"]
    base, load, after = result["baseline"], result["overload"], result["recovery"]
    summary = json.dumps({k: result[k] for k in ("baseline", "capacity", "overload", "recovery")}, indent=1)
    assert base["refused"] == 0 and load["requests"] / load["wall_s"] > 2.5 * result["capacity"]["ok_rps"], summary
    # excess is refused, fast, with Retry-After and the error object, and counted
    assert load["refused"] > 0 and load["ok"] > 0, summary
    assert load["statuses"].keys() <= {"200", "503"} and load["other_errors"] == 0, summary
    assert load["refused_with_retry_after"] == load["refused_as_json_overloaded"] == load["refused"], summary
    # Latencies are the server's own (its request-duration histogram): the load generator shares the CPUs, and
    # beside two CPU hogs its event loop lags by hundreds of ms, which the client-side figures include for every
    # answer alike (refused p50 460 ms vs accepted 654 ms seen so). They are compared with others of the same run,
    # or with the budget the server enforces by its own measured service time, never with a fixed number of ms.
    seen = load["server_side"]
    assert seen["503"]["p50_le_ms"] < seen["200"]["p50_le_ms"] / 3, summary
    assert result["refusals_counted_in_metrics"] == result["refusals_in_all_phases"], summary
    # Accepted requests keep a bounded latency: without admission each would wait behind the whole backlog, and
    # queueing every request of the flood would take `requests / capacity` seconds of work (about 20 s here).
    # Measured in the same run, so a slow or busy machine moves both sides alike.
    backlog_ms = 1000 * load["requests"] / result["capacity"]["ok_rps"]
    assert seen["200"]["p99_le_ms"] < backlog_ms / 4, summary
    # health never refused; nothing crashed; back to normal once the load stops (by the server's clock: half the
    # answers after the flood within three times the baseline's bound; the buckets are coarse, 50, 75, 100, 250 ms)
    assert load["health"]["ok"] == load["health"]["probes"] > 0, summary
    assert server.proc.poll() is None and [p.pid for p in workers(server)] == before
    assert after["refused"] == after["other_errors"] == 0, summary
    assert after["server_side"]["200"]["p50_le_ms"] <= 3 * base["server_side"]["200"]["p50_le_ms"], summary


# --- the served model changes on disk under the server -------------------------------------------------------------


def test_current_version_corrupted_on_disk_keeps_serving(server: LiveServer, repo: ModelRepository) -> None:
    """The loaded copy keeps answering; a reload never trades it for the broken file."""
    switch_to(server, repo, 1)
    model = repo.root / NAME / "1" / MODEL_FILE
    original = model.read_bytes()
    expected = classify(server.client).json()["predictions"]
    try:
        corrupt(repo, 1)
        with pytest.raises(VerificationError, match="sha256"):
            repo.get(NAME, 1)  # what `imgclf models verify` reports
        assert classify(server.client).json()["predictions"] == expected  # served from memory
        noop = reload(server.client)  # nothing changed: nothing is re-read, the loaded copy stays
        assert noop.status_code == 200 and noop.json()["changed"] == [], noop.text
        assert served_version(server.client) == 1
        switch_to(server, repo, 2)  # moving away from the broken version works ...
        with pytest.raises(VerificationError):
            repo.rollback(NAME)  # ... and the repository will not point production back at it,
        atomic_write_json(repo.root / NAME / ALIASES, {"production": 1, "previous": 2})  # so force it by hand
        for _ in range(2):
            refused = reload(server.client)
            assert refused.status_code == 409, refused.text
            body = refused.json()
            assert (body["kind"], body["status"]) == ("reload_refused", 409)
            assert f"{NAME}:1" in body["error"] and "sha256" in body["error"]
        assert served_version(server.client) == 2
        assert server.client.get("/readyz").status_code == 200
    finally:
        model.write_bytes(original)
        switch_to(server, repo, 1)


def test_current_version_deleted_while_serving(server: LiveServer, repo: ModelRepository) -> None:
    switch_to(server, repo, 1)
    folder = repo.root / NAME / "1"
    aside = repo.root.parent / "v1-aside"
    shutil.move(folder, aside)
    try:
        assert served_version(server.client) == 1  # the session holds the model in memory
        for _ in range(2):
            refused = reload(server.client)
            assert refused.status_code == 409, refused.text
            assert refused.json()["kind"] == "reload_refused"
            assert "has no version 1" in refused.json()["error"]  # the reason, not a stack trace
        assert served_version(server.client) == 1
        assert server.client.get("/readyz").status_code == 200
        (aside / MODEL_FILE).unlink()  # the folder back without its model file:
        shutil.move(aside, folder)
        with pytest.raises(VerificationError, match="model.onnx' is missing"):
            repo.get(NAME, 1)  # the repository says so,
        noop = reload(server.client)  # a reload has nothing to change and re-reads nothing,
        assert noop.status_code == 200 and noop.json()["changed"] == [], noop.text
        assert served_version(server.client) == 1  # and the loaded copy keeps answering
    finally:
        if aside.exists():
            shutil.move(aside, folder)
        shutil.copyfile(repo.root / NAME / "2" / MODEL_FILE, folder / MODEL_FILE)  # same bytes as v1
    assert repo.get(NAME, 1).manifest.version == 1
    assert reload(server.client).status_code == 200 and served_version(server.client) == 1


# --- a worker killed under load ------------------------------------------------------------------------------------


def test_killed_worker_is_replaced_and_the_service_recovers_by_itself(server: LiveServer) -> None:
    """SIGKILL the only worker under load: requests fail only while it is down; no one restarts anything."""
    (victim,) = workers(server)
    stop = threading.Event()
    answers: list[tuple[float, float, int | str]] = []  # (sent, answered, status or error)

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status: int | str = classify(c).status_code
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                answers.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        while sum(1 for a in answers if a[2] == 200) < 6:
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        ready_at = None
        deadline = killed_at + 90  # BentoML's arbiter checks its workers every 10 s, then a worker starts
        with httpx.Client(base_url=server.url, timeout=2) as probe:
            while ready_at is None:
                assert time.monotonic() < deadline, f"not ready again: {server.log.read_text()[-2000:]}"
                try:
                    if probe.get("/readyz").status_code == 200:
                        ready_at = time.monotonic()
                except httpx.TransportError:
                    time.sleep(0.2)
        while sum(1 for a in answers if a[0] > ready_at and a[2] == 200) < 9:
            assert time.monotonic() < ready_at + 60
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    (replacement,) = workers(server)
    assert replacement.pid != victim.pid and server.proc.poll() is None
    failed = [a for a in answers if a[2] != 200]
    # only while it was down: answered after the kill, sent before it was ready again (whatever the timing)
    assert all(answered >= killed_at and sent < ready_at for sent, answered, _ in failed), failed
    assert all(status == 200 for sent, answered, status in answers if answered < killed_at or sent > ready_at)
    assert ready_at - killed_at < 60
    print(f"worker {victim.pid} killed; replaced by {replacement.pid}; ready again after {ready_at - killed_at:.1f}s; "
          f"{len(failed)} requests failed: {sorted({str(s) for _, _, s in failed})}")


# --- exports interrupted at every step, and a full disk ------------------------------------------------------------


def _invariants(repo: ModelRepository, versions_before: list[int], aliases_before: dict[str, int]) -> list[int]:
    """No partial version (every version there verifies), production untouched; the new versions."""
    assert repo.aliases(NAME) == aliases_before
    for version in repo.versions(NAME):
        repo.get(NAME, version)  # raises VerificationError for anything partial
    assert repo.get(NAME).manifest.version == aliases_before["production"]
    return sorted(set(repo.versions(NAME)) - set(versions_before))


def _register(repo: ModelRepository, source: Path) -> Any:
    """training.export.register, the exporter's own write path, for a model file that passed its checks."""
    import torch

    from service.manifest import Manifest
    from training.export import Candidate, ExportSource, register

    manifest = Manifest.model_validate_json((source / "manifest.json").read_text())
    exported = ExportSource(model=torch.nn.Identity(), spec=manifest.preprocessing, labels=manifest.labels,
                            architecture=manifest.architecture, check_images=[], eval_samples=[],
                            calibration_images=[], training=manifest.training)
    candidate = Candidate(source=exported, path=source / MODEL_FILE, exporter=manifest.export.exporter,
                          precision="fp32", parity=manifest.export.parity_check, quantization=None, report=None,
                          sha256=manifest.files[MODEL_FILE].sha256)
    return register(repo, NAME, candidate)


def test_export_failing_at_every_step_leaves_no_partial_version(imagenet_repo: Path, tmp_path: Path) -> None:
    """ENOSPC (after half a write) at step 1, 2, ... of registering an export, until it gets through."""
    repo = copy_repo(imagenet_repo, tmp_path / "models")
    source = tmp_path / "candidate"
    shutil.copytree(repo.get(NAME).path, source)
    aliases = repo.aliases(NAME)
    steps: list[str] = []
    for k in range(1, 60):
        before = repo.versions(NAME)
        faults = Faults(k)
        try:
            with faults.installed():
                version = _register(repo, source)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            steps.append(faults.steps[-1])
            new = _invariants(repo, before, aliases)
            assert not new or steps[-1].startswith("fsync"), (k, steps[-1], new)  # only the post-rename fsync
            continue
        assert not faults.hit
        break
    else:
        pytest.fail("registration never completed")
    assert len(steps) >= 12, steps  # model, labels, card, manifest, fsyncs, version counter, rename, ...
    assert any(s.startswith("rename") for s in steps) and any("model.onnx" in s for s in steps)
    assert version.manifest.version == max(repo.versions(NAME))
    _invariants(repo, [], aliases)
    assert not list((repo.root / NAME).glob(".staging-*"))


def test_export_killed_at_every_step_leaves_no_partial_version(imagenet_repo: Path, tmp_path: Path) -> None:
    """SIGKILL at each step of adding a version and of promoting it (the pipeline's last two writes)."""
    repo = copy_repo(imagenet_repo, tmp_path / "models")
    aliases = repo.aliases(NAME)

    def killed(action: str, k: int) -> bool:
        result = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "diskfaults.py"), str(repo.root), NAME, action,
                                 str(k)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode in (0, -signal.SIGKILL), result.stderr[-2000:]
        return result.returncode == -signal.SIGKILL

    k = 1
    while killed("add", k):
        _invariants(repo, [], aliases)
        k += 1
        assert k < 60
    assert k > 10  # that many steps were each interrupted
    assert not list((repo.root / NAME).glob(".staging-*"))  # the finished write cleaned up the crashed ones
    newest = max(repo.versions(NAME))
    for k in range(1, 10):  # promote: aliases.json is the old one or the new one, never broken
        if not killed("promote", k):
            break
        assert repo.aliases(NAME)["production"] in (aliases["production"], newest)
        atomic_write_json(repo.root / NAME / ALIASES, aliases)
    assert repo.aliases(NAME)["production"] == newest
    leftovers = [p.name for p in (repo.root / NAME).iterdir() if not (p.name.isdigit() or p.name == ALIASES)]
    assert all(name.startswith(".") for name in leftovers), leftovers  # crash debris is hidden: loaders skip it


def test_full_disk_during_export_leaves_no_partial_version(imagenet_repo: Path, tmp_path: Path) -> None:
    """A real failing write from the kernel: files may not grow past 1 MiB (RLIMIT_FSIZE: EFBIG part-way)."""
    repo = copy_repo(imagenet_repo, tmp_path / "models")
    source = tmp_path / "candidate"
    shutil.copytree(repo.get(NAME).path, source)
    aliases, before = repo.aliases(NAME), repo.versions(NAME)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
        with pytest.raises(OSError) as raised:
            _register(repo, source)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert raised.value.errno == errno.EFBIG
    assert _invariants(repo, before, aliases) == []
    assert not list((repo.root / NAME).glob(".staging-*"))
    assert _register(repo, source).manifest.version == max(before) + 1  # with room again, it goes through


def test_promotion_of_a_broken_version_is_refused(imagenet_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(imagenet_repo, tmp_path / "models")
    new = add_copy(repo)
    corrupt(repo, new)
    with pytest.raises(RepositoryError):
        repo.promote(NAME, new)
    assert repo.aliases(NAME)["production"] == 1


# --- soak, short -----------------------------------------------------------------------------------------------------


def test_soak_short(imagenet_repo: Path, tmp_path: Path) -> None:
    """benchmarks/soak.py with small numbers: mixed valid and invalid inputs, reloads, memory.

    The memory limit is the suite's RELOAD_GROWTH_LIMIT_MB (below one leaked session), not the long
    soak's 50 MB after its warm-up: three reloads are still in the arenas' settling.
    """
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--repo", str(imagenet_repo), "--requests", "600", "--reloads", "3",
         "--warmup", "100", "--max-growth-mb", str(RELOAD_GROWTH_LIMIT_MB), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    payload = json.loads((tmp_path / "soak.json").read_text())
    r = payload["result"]
    assert r["requests"] == 600 and r["valid_errors"] == 0, r
    assert r["reloads_ok"] == 3 and r["reload_failures"] == 0, r
    assert r["invalid_unexpected"] == 0 and r["invalid"] > 100, r
    assert r["rss_growth_mb"] < RELOAD_GROWTH_LIMIT_MB, r
    assert payload["passed"] is True
    assert "| requests |" in (tmp_path / "soak.md").read_text()
