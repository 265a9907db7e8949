"""A fleet: two `imgclf serve` replicas sharing one bucket of a real S3 server (SeaweedFS), under load.

The model is exported into the bucket once by the real `imgclf bootstrap --repo s3://...`; each test
publishes copies of it under a prefix of its own and starts its own replicas (each with its own
verified cache, polling the aliases every half second). Waits are hang guards, never speed bounds.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.objectstore import ObjectRepository
from service.repository import MANIFEST, MODEL_FILE
from tests.support.cli import in_process
from tests.support.fleet import (
    Load,
    models,
    publish_copy,
    replica,
    replicas,
    wait_for,
    wait_until_serving,
)
from tests.support.seaweed import SeaweedFS
from tests.support.servers import IMAGE, NAME
from training.pipeline.config import RolloutConfig
from training.pipeline.record import Recorder, RunRecord, StopRun, new_run_id
from training.pipeline.rollout import rollout_step, trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """imagenet-lite0 exported to s3:// by `imgclf bootstrap` (export, checks, publication, promotion);
    returns the bucket and the verified local copy of version 1 the export left in its cache."""
    bucket = seaweedfs.make_bucket(f"fleet-{uuid.uuid4().hex[:10]}")
    cache = tmp_path_factory.mktemp("export-cache")
    with pytest.MonkeyPatch.context() as env:
        for key, value in seaweedfs.env().items():
            env.setenv(key, value)
        result = in_process("bootstrap", "--repo", f"{bucket}/exported", IMGCLF_REPO_CACHE=str(cache))
    assert result.returncode == 0 and "registered imagenet-lite0:1" in result.stdout, result.stderr
    return bucket, cache / NAME / "1"


@pytest.fixture
def store(exported: tuple[str, Path], seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch,
          tmp_path: Path) -> ObjectRepository:
    """A fresh repository prefix in the bucket holding version 1 as production (S3 variables set here)."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    repo = ObjectRepository(f"{exported[0]}/{uuid.uuid4().hex[:10]}", tmp_path / "writer-cache")
    publish_copy(repo, exported[1])
    repo.promote(NAME, 1)
    return repo


def test_two_replicas_serve_a_version_exported_to_s3_each_verifying_it(exported: tuple[str, Path], seaweedfs: SeaweedFS,
                                                                       tmp_path: Path) -> None:
    bucket, _ = exported
    with replicas(f"{bucket}/exported", tmp_path, seaweedfs.env()) as servers:
        for i, server in enumerate(servers):
            document = models(server)
            assert [(m["name"], m["version"]) for m in document["models"]] == [(NAME, 1)]
            assert document["store"] == {"location": f"{bucket}/exported", "reachable": True, "error": None}
            ready = server.client.get("/readyz").json()
            assert ready["serving"] == {NAME: 1} and ready["store"]["reachable"] is True
            cached = json.loads((tmp_path / f"cache{i}" / NAME / "1" / MANIFEST).read_text())  # its own download
            assert (tmp_path / f"cache{i}" / NAME / "1" / MODEL_FILE).stat().st_size == cached["files"][MODEL_FILE]["size"]
            metrics = server.client.get("/metrics").text
            assert "imgclf_store_reachable 1.0" in metrics
            assert f'imgclf_served_version{{model="{NAME}",role="production"}} 1.0' in metrics
            assert server.client.post("/classify", files={"image": ("x.jpg", b"not an image")}).status_code == 415


def test_a_promotion_and_a_rollback_reach_both_replicas_with_no_failed_request(
        store: ObjectRepository, exported: tuple[str, Path], seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    publish_copy(store, exported[1])
    with replicas(store.location, tmp_path, seaweedfs.env()) as servers, \
            Load([s.url for s in servers]) as load:
        wait_for("answers from both replicas", lambda: all(load.versions(s.url) for s in servers))
        store.promote(NAME, 2)
        wait_until_serving(servers, [2])
        wait_for("answers from version 2 on both", lambda: all(2 in load.versions(s.url) for s in servers))
        store.rollback(NAME)
        wait_until_serving(servers, [1])
        count = len(load.answers)
        wait_for("answers after the rollback", lambda: len(load.answers) > count + 10)
    assert load.failures() == [], load.failures()[:5]
    assert {a.version for a in load.answers[-5:]} == {1}


def test_a_tampered_or_half_written_version_is_refused_while_the_old_one_serves(
        store: ObjectRepository, exported: tuple[str, Path], seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    publish_copy(store, exported[1])
    key = f"{store.base}/{NAME}/2/{MODEL_FILE}"
    data = bytearray(store.fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    store.fs.pipe_file(key, bytes(data))  # tampered in the bucket after publication
    with replicas(store.location, tmp_path, seaweedfs.env()) as servers, Load([s.url for s in servers]) as load:
        aliases = f"{store.base}/{NAME}/aliases.json"
        store.fs.pipe_file(aliases, json.dumps({"production": 2, "previous": 1}).encode())  # a hand edit: no checks
        for server in servers:
            wait_for("the tampered version refused", lambda s=server: "does not match its sha256" in s.log.read_text())
        store.fs.pipe_file(f"{store.base}/{NAME}/3/{MODEL_FILE}", bytes(data))  # objects, but no manifest yet
        store.fs.pipe_file(aliases, json.dumps({"production": 3, "previous": 1}).encode())
        for server in servers:
            wait_for("the half-written version refused", lambda s=server: "has no version 3" in s.log.read_text())
            assert [m["version"] for m in models(server)["models"]] == [1]
    assert load.failures() == [] and {a.version for a in load.answers} == {1}
    for i in range(2):
        assert not (tmp_path / f"cache{i}" / NAME / "2").exists()  # nothing unverified is kept either


def test_the_store_killed_under_load_loses_no_request_and_a_replica_restarted_meanwhile_serves_its_cache(
        store: ObjectRepository, exported: tuple[str, Path], seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    publish_copy(store, exported[1])
    env = seaweedfs.env()
    with replica(store.location, tmp_path, 0, env) as first:
        with replica(store.location, tmp_path, 1, env):  # fills its cache, then stops
            pass
        with Load([first.url]) as load:
            seaweedfs.kill()
            try:
                wait_for("the outage reported", lambda: models(first)["store"]["reachable"] is False)
                wait_for("the outage in the metrics", lambda: "imgclf_store_reachable 0.0" in first.client.get("/metrics").text)
                with replica(store.location, tmp_path, 1, env) as second:  # restarted during the outage
                    assert models(second)["store"]["reachable"] is False
                    assert [m["version"] for m in models(second)["models"]] == [1]
                    assert second.client.post("/classify", files={"image": ("cat.jpg", IMAGE)}).status_code == 200
            finally:
                seaweedfs.start()
            wait_for("the store reachable again", lambda: models(first)["store"]["reachable"] is True)
            store.promote(NAME, 2)  # and changes are picked up again
            wait_until_serving([first], [2])
    assert load.failures() == [], load.failures()[:5]
    assert {1, 2} <= load.versions(first.url)


def test_a_canary_answers_its_share_of_unnamed_requests_and_says_so(
        store: ObjectRepository, exported: tuple[str, Path], seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    publish_copy(store, exported[1])
    result = in_process("models", "canary", NAME, "2", "--weight", "0.5", "--repo", store.location,
                        IMGCLF_REPO_CACHE=str(tmp_path / "cli-cache"))
    assert result.returncode == 0, result.stderr
    with replicas(store.location, tmp_path, seaweedfs.env(), count=1) as (server,):
        assert models(server)["rollouts"] == {NAME: {"version": 2, "mode": "canary", "weight": 0.5}}
        versions = [server.client.post("/classify", files={"image": ("cat.jpg", IMAGE)}).json()["version"]
                    for _ in range(60)]
        assert versions.count(2) >= 10 and versions.count(1) >= 10  # 0.5 each: 60 draws land here but for 1e-6
        named = server.client.post("/classify", files={"image": ("cat.jpg", IMAGE)}, data={"model": f"{NAME}:1"})
        assert named.json()["version"] == 1  # a request that names its version is never split
        metrics = server.client.get("/metrics").text
        assert f'imgclf_rollout_answers_total{{model="{NAME}",role="canary",version="2"}}' in metrics
        stopped = in_process("models", "canary", NAME, "--stop", "--repo", store.location,
                             IMGCLF_REPO_CACHE=str(tmp_path / "cli-cache"))
        assert stopped.returncode == 0, stopped.stderr
        wait_until_serving([server], [1])
        assert models(server)["rollouts"] == {}


def _rollout_stage(store: ObjectRepository, version: int, urls: list[str], run_dir: Path) -> tuple[str, RunRecord]:
    """The pipeline's rollout stage as ``_Run.execute`` runs it: the trial, the stage, then promotion."""
    record = RunRecord(run_id=new_run_id(), name=NAME, started_at=datetime.now(UTC))
    rec = Recorder(store.root, record)
    cfg = RolloutConfig(mode="shadow", weight=1.0, replicas=urls, min_answers=40, timeout_s=300, poll_s=0.5,
                        max_latency_ratio=20.0)  # latency: both versions share two busy cores here
    with trial(store, NAME, version):
        try:
            reason = rollout_step(rec, store, cfg, version, store.get(NAME, 1), run_dir)
        except StopRun as stop:
            return f"{stop.status}: {stop.reason}", record
        store.promote(NAME, version)
    return f"promoted{reason}", record


@pytest.mark.parametrize("good", [False, True], ids=["label-shuffled", "same-weights"])
def test_a_shadow_rollout_rolls_a_worse_candidate_back_and_promotes_a_good_one(
        store: ObjectRepository, exported: tuple[str, Path], seaweedfs: SeaweedFS, tmp_path: Path, good: bool) -> None:
    labels = store.get(NAME, 1).manifest.labels
    shuffled = random.Random(7).sample(labels, len(labels))
    version = publish_copy(store, exported[1], **({} if good else {"labels": shuffled}))
    # The load repeats one image: with the response cache on, production would answer from it and have no
    # latency of its own to compare with the candidate's (the stage refuses a check it cannot measure).
    env = {**seaweedfs.env(), "IMGCLF_CACHE_ENTRIES": "0"}
    with replicas(store.location, tmp_path, env) as servers, Load([s.url for s in servers]) as load:
        outcome, record = _rollout_stage(store, version, [s.url for s in servers], tmp_path / "run")
        assert outcome.startswith("promoted" if good else "rolled_back"), (outcome, store.alias_document(NAME))
        wait_until_serving(servers, [2] if good else [1])
    assert load.failures() == [] and {a.version for a in load.answers} <= {1, 2}
    checks = {c["name"]: c for c in record.rollout["decision"]["checks"]}  # type: ignore[index]
    assert store.rollout(NAME) is None  # promoted or ended: nothing is left on trial
    assert (tmp_path / "run" / "rollout.png").stat().st_size > 0
    if good:
        assert outcome.startswith("promoted"), outcome
        assert store.aliases(NAME) == {"production": 2, "previous": 1} and checks["agreement"]["value"] == 1.0
    else:
        assert outcome.startswith("rolled_back: rolled back: top-1 agreement with production"), outcome
        assert store.aliases(NAME) == {"production": 1} and checks["agreement"]["ok"] is False
    assert record.rollout["stats"]["shadow"]["compared"] >= 40  # type: ignore[index]
