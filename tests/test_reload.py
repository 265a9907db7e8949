"""Hot reload, for real: `imgclf serve` subprocesses, versions promoted and rolled back under traffic."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from imgclf.devserver import LiveServer
from service.repository import ModelRepository
from tests.support.servers import (
    AUTH,
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

# --- fixtures: one repository copy and one server for the single-worker scenarios ----------------------


@pytest.fixture(scope="module")
def repo(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = copy_repo(imagenet_repo, tmp_path_factory.mktemp("reload") / "models")
    assert add_copy(repo) == 2
    return repo


@pytest.fixture(scope="module")
def server(repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(repo.root, tmp_path_factory.mktemp("bentoml_home"), IMGCLF_ADMIN_TOKEN=TOKEN) as srv:
        yield srv


# --- the contract at the door -------------------------------------------------------------------------


def test_admin_is_off_without_a_token() -> None:
    """In process: without IMGCLF_ADMIN_TOKEN every /admin path is a JSON 404; others pass through."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from service.http.admin import PREFIX, AdminRoute, AdminToken
    from service.http.errors import ErrorResponses
    from service.http.live import LiveCatalog
    from service.http.routes import Endpoint, mount
    from service.settings import Settings

    inner = Starlette(routes=[Route("/ping", lambda _: PlainTextResponse("pong"))])
    for token in (None, ""):
        settings = Settings.from_env({} if token is None else {"IMGCLF_ADMIN_TOKEN": token})
        admin = AdminRoute(live=LiveCatalog(settings), token=AdminToken(settings.admin_token))
        app = ErrorResponses(mount([Endpoint(PREFIX, admin, prefix=True)], inner), count=lambda _kind: None)
        with TestClient(app) as client:
            for path in ("/admin/reload", "/admin", "/admin/anything"):
                response = client.post(path, headers=AUTH)
                assert response.status_code == 404
                assert response.json() == {"error": response.json()["error"], "kind": "not_found", "status": 404}
                assert "IMGCLF_ADMIN_TOKEN" in response.json()["error"]
            assert client.get("/ping").text == "pong"


def test_token_is_required_and_checked(server: LiveServer) -> None:
    client = server.client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        response = client.post("/admin/reload", headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        body = response.json()
        assert (body["kind"], body["status"]) == ("unauthorized", 401)
        assert TOKEN not in response.text
    get = client.get("/admin/reload", headers=AUTH)
    assert (get.status_code, get.json()["kind"], get.headers["allow"]) == (405, "method_not_allowed", "POST")
    assert client.post("/admin/nothing", headers=AUTH).status_code == 404
    assert "/admin/reload" not in client.get("/schema.json").json()["paths"]
    assert TOKEN not in server.log.read_text()


def test_reload_without_changes_is_a_no_op(server: LiveServer) -> None:
    response = reload(server.client)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["changed"] == [] and body["models"][0]["name"] == NAME


# --- swapping versions -----------------------------------------------------------------------------------


def test_promoted_version_takes_over_under_traffic(server: LiveServer, repo: ModelRepository) -> None:
    """Concurrent clients see 1 then 2, never a failure and never 1 again once they saw 2."""
    switch_to(server, repo, 1)
    stop = threading.Event()
    seen: list[list[tuple[float, int, int]]] = [[] for _ in range(3)]  # (started, status, version)

    def loop(out: list[tuple[float, int, int]]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                response = classify(client)
                out.append((started, response.status_code, response.json().get("version", -1)))

    threads = [threading.Thread(target=loop, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    try:
        while min(len(out) for out in seen) < 2:
            time.sleep(0.05)
        repo.promote(NAME, 2)
        response = reload(server.client)
        reloaded_at = time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(sum(s > reloaded_at for s, _, _ in out) for out in seen) < 3:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"models": [{"name": NAME, "version": 2}],
                               "changed": [{"name": NAME, "from": 1, "to": 2}]}
    for out in seen:
        assert all(status == 200 for _, status, _ in out), out
        versions = [v for _, _, v in out]
        assert versions == sorted(versions) and set(versions) <= {1, 2}, versions  # never back to 1
        assert versions[0] == 1 and versions[-1] == 2
        assert all(v == 2 for s, _, v in out if s > reloaded_at)
    models = server.client.get("/models").json()["models"]
    assert [(m["name"], m["version"]) for m in models] == [(NAME, 2)]


def test_rollback_and_reload_serve_the_previous_version(server: LiveServer, repo: ModelRepository) -> None:
    switch_to(server, repo, 1)
    switch_to(server, repo, 2)
    assert repo.rollback(NAME)["production"] == 1
    response = reload(server.client)
    assert response.status_code == 200, response.text
    assert response.json()["changed"] == [{"name": NAME, "from": 2, "to": 1}]
    assert served_version(server.client) == 1


def test_corrupt_version_is_refused_and_the_old_keeps_serving(server: LiveServer, repo: ModelRepository) -> None:
    switch_to(server, repo, 1)
    bad = add_copy(repo)
    repo.promote(NAME, bad)  # verified here, then the disk changes under it
    corrupt(repo, bad)
    try:
        for _ in range(2):  # refused every time, not just once
            response = reload(server.client)
            assert response.status_code == 409, response.text
            body = response.json()
            assert (body["kind"], body["status"]) == ("reload_refused", 409)
            assert f"{NAME}:{bad}" in body["error"] and "sha256" in body["error"]
        assert served_version(server.client) == 1
        assert [m["version"] for m in server.client.get("/models").json()["models"]] == [1]
    finally:
        repo.promote(NAME, 1)


def test_memory_stays_flat_over_twenty_reloads(server: LiveServer, repo: ModelRepository) -> None:
    """Retired models release their sessions: RSS after 20 alternating reloads stays below one leaked session."""

    def cycle(version: int) -> None:
        switch_to(server, repo, version)
        assert served_version(server.client) == version  # the new model starts its batching task

    for version in (2, 1, 2, 1):  # warm-up: allocators and caches reach their steady state
        cycle(version)
    before = server.rss()
    for i in range(20):
        cycle(2 if i % 2 == 0 else 1)
    growth = server.rss() - before
    assert growth < RELOAD_GROWTH_LIMIT_MB * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 20 reloads"


# --- several workers ---------------------------------------------------------------------------------------------


def served_per_worker(client: httpx.Client) -> dict[str, set[str]]:
    """pid -> the model keys that worker serves, from the per-process imgclf_model_info gauge."""
    out: dict[str, set[str]] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("imgclf_model_info{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
            out.setdefault(labels["pid"].strip('"'), set())
            if float(line.rsplit(" ", 1)[1]) == 1:
                out[labels["pid"].strip('"')].add(labels["model"].strip('"'))
    return out


def test_all_workers_converge_after_one_admin_reload(
    imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The admin reload reaches one worker; the other sees the new alias within its poll interval (2 s)."""
    from concurrent.futures import ThreadPoolExecutor

    repo = copy_repo(imagenet_repo, tmp_path_factory.mktemp("reload_workers") / "models")
    new = add_copy(repo)
    home = tmp_path_factory.mktemp("bentoml_home_workers")
    with serve(repo.root, home, IMGCLF_ADMIN_TOKEN=TOKEN, IMGCLF_WORKERS="2") as srv, ThreadPoolExecutor(4) as pool:

        def one(_: int) -> int:
            with httpx.Client(base_url=srv.url, timeout=60) as client:  # a new connection: any worker may answer
                return served_version(client)

        def versions(n: int) -> set[int]:
            return set(pool.map(one, range(n)))

        deadline = time.monotonic() + 60  # /readyz answers as soon as one worker is up
        while list(served_per_worker(srv.client).values()) != [{f"{NAME}:1"}] * 2:
            assert time.monotonic() < deadline, f"two workers never came up: {served_per_worker(srv.client)}"
            time.sleep(0.2)
        assert versions(8) == {1}
        repo.promote(NAME, new)
        response = reload(srv.client)
        assert response.status_code == 200, response.text
        assert response.json()["changed"] == [{"name": NAME, "from": 1, "to": new}]
        deadline = time.monotonic() + 30
        while list(served_per_worker(srv.client).values()) != [{f"{NAME}:{new}"}] * 2:
            assert time.monotonic() < deadline, f"workers did not converge: {served_per_worker(srv.client)}"
            time.sleep(0.2)
        assert versions(48) == {new}  # every answer from now on is the new version
        assert TOKEN not in srv.log.read_text()


# --- the catalog without HTTP ------------------------------------------------------------------------------------


def test_catalog_reload_swap_lease_and_retire(imagenet_repo: Path, tmp_path: Path) -> None:
    """Reload builds beside, swaps whole, lets leases finish, then stops the old batching task and session."""
    from service.http.catalog import Catalog, ReloadRefusedError
    from service.http.live import LiveCatalog
    from service.settings import Settings

    repo = copy_repo(imagenet_repo, tmp_path / "models")
    v2 = add_copy(repo)
    settings = Settings(model_repo=repo.root, device="cpu", max_batch_size=1)
    swaps: list[tuple[list[str], list[str]]] = []
    live = LiveCatalog(settings, Catalog.load(settings),
                       on_swap=lambda added, retired: swaps.append(([e.key for e in added], [e.key for e in retired])))
    spec = live.current.pick(None).manifest.preprocessing
    tensor = np.zeros((spec.channels, *spec.input_size), np.float32)

    async def scenario() -> None:
        old = live.current.pick(None)
        with live.lease(None) as held:
            await held.infer(tensor)  # starts the old model's batching task
            repo.promote(NAME, v2)
            catalog, changes = await live.reload()
            assert [c.__dict__ for c in changes] == [{"name": NAME, "old": 1, "new": v2}]
            assert live.current is catalog and list(catalog.models) == [f"{NAME}:{v2}"]
            assert swaps[-1] == ([f"{NAME}:{v2}"], [f"{NAME}:1"])
            assert not held.closed  # the request in flight keeps its model
            await held.infer(tensor)
        assert old.closed and old.model.session is None  # ... and the session went when its last lease ended
        await asyncio.sleep(0.05)
        assert old._task is not None and old._task.done()  # its batching task stopped
        with live.lease(None) as served:
            assert served.manifest.version == v2
            await served.infer(tensor)

        again, changes = await live.reload()  # nothing changed: the same catalog, nothing reloaded
        assert again is live.current and changes == []

        bad = add_copy(repo)
        repo.promote(NAME, bad)
        corrupt(repo, bad)
        before = live.current
        with pytest.raises(ReloadRefusedError, match="sha256"):
            await live.reload()
        assert live.current is before and not before.pick(None).closed

    asyncio.run(scenario())


def test_watcher_follows_promotions_and_does_not_retry_a_refused_version(imagenet_repo: Path, tmp_path: Path) -> None:
    """What converges the other workers: polling the aliases, reloading once per change."""
    from service.http.catalog import Catalog
    from service.http.live import LiveCatalog
    from service.settings import Settings, usable_cores

    repo = copy_repo(imagenet_repo, tmp_path / "models")
    v2 = add_copy(repo)
    settings = Settings(model_repo=repo.root, device="cpu", max_batch_size=1, poll_seconds=0.05)
    assert Settings(workers=2).watch_seconds == 2.0 and Settings(workers=1).watch_seconds == 0  # on with workers
    assert Settings().watch_seconds == (2.0 if usable_cores() > 1 else 0)  # default: a worker per core
    live = LiveCatalog(settings, Catalog.load(settings))
    attempts = 0
    reload = live.reload

    async def counting() -> tuple[Catalog, list]:
        nonlocal attempts
        attempts += 1
        return await reload()

    live.reload = counting  # type: ignore[method-assign]

    async def until(condition: Callable[[], bool], seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        live.start_watching(settings.watch_seconds)
        try:
            repo.promote(NAME, v2)
            await until(lambda: list(live.current.models) == [f"{NAME}:{v2}"])
            bad = add_copy(repo)
            repo.promote(NAME, bad)
            corrupt(repo, bad)
            before = attempts
            await until(lambda: attempts > before)
            await asyncio.sleep(0.5)  # ten more polls
            assert attempts == before + 1  # refused once, not retried while the aliases stay the same
            assert list(live.current.models) == [f"{NAME}:{v2}"]
            repo.rollback(NAME)  # production back to v2: nothing to do
            repo.promote(NAME, 1)
            await until(lambda: list(live.current.models) == [f"{NAME}:1"])
        finally:
            await live.stop_watching()

    asyncio.run(scenario())
