"""The model repository in object storage, against a real S3 server (SeaweedFS): publish, verify, refuse.

Each test works under its own prefix of one bucket; versions are copies of the bootstrapped
imagenet-lite0 published with the real ``ObjectRepository.add_version``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path

import pytest

from service import store_writes
from service.manifest import Manifest
from service.objectstore import ObjectRepository
from service.repository import MANIFEST, MODEL_FILE, RepositoryError, VerificationError
from tests.support.fleet import publish_copy
from tests.support.seaweed import SeaweedFS

pytestmark = pytest.mark.slow
NAME = "imagenet-lite0"


@pytest.fixture(scope="module")
def bucket(seaweedfs: SeaweedFS) -> str:
    """One bucket for the module (each bucket takes volumes of SeaweedFS's own: they are few)."""
    return seaweedfs.make_bucket(f"repo-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(bucket: str, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix in the test bucket, with the S3 variables set for this process."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    return f"{bucket}/{uuid.uuid4().hex[:12]}"


def source_version(imagenet_repo: Path) -> Path:
    return imagenet_repo / NAME / "1"


def test_a_published_version_is_downloaded_and_verified_by_another_reader(store: str, imagenet_repo: Path,
                                                                          tmp_path: Path) -> None:
    writer = ObjectRepository(store, tmp_path / "writer-cache")
    assert publish_copy(writer, source_version(imagenet_repo)) == 1
    writer.promote(NAME, 1)
    reader = ObjectRepository(store, tmp_path / "reader-cache")
    assert reader.names() == [NAME] and reader.versions(NAME) == [1] and reader.aliases(NAME) == {"production": 1}
    version = reader.get(NAME)
    assert version.path == tmp_path / "reader-cache" / NAME / "1"
    assert version.model_path.read_bytes() == (source_version(imagenet_repo) / MODEL_FILE).read_bytes()
    assert reader.unreachable is None


def test_a_half_written_version_is_not_a_version_and_a_missing_file_is_refused(store: str, imagenet_repo: Path,
                                                                               tmp_path: Path) -> None:
    """Objects without a manifest (a publisher killed midway) are invisible; a manifest whose files are not
    all there (copied by hand, deleted later) is refused with the file named."""
    repo = ObjectRepository(store, tmp_path / "cache")
    publish_copy(repo, source_version(imagenet_repo))
    repo.fs.put_file(str(source_version(imagenet_repo) / MODEL_FILE), f"{repo.base}/{NAME}/2/{MODEL_FILE}")
    assert repo.versions(NAME) == [1]  # version 2 has its model file but no manifest yet
    manifest = Manifest.model_validate_json((source_version(imagenet_repo) / MANIFEST).read_text())
    repo.fs.pipe_file(f"{repo.base}/{NAME}/3/{MANIFEST}", manifest.model_copy(update={"version": 3}).model_dump_json().encode())
    assert repo.versions(NAME) == [1, 3]
    with pytest.raises(VerificationError, match=r"listed file '.*' is missing in the store"):
        ObjectRepository(store, tmp_path / "fresh").get(NAME, 3)
    assert not (tmp_path / "fresh" / NAME / "3").exists()  # nothing half-downloaded is left to load
    assert publish_copy(repo, source_version(imagenet_repo)) == 4  # 2 and 3 stay taken: no reuse


def test_a_tampered_object_is_refused_and_a_tampered_cache_is_downloaded_again(store: str, imagenet_repo: Path,
                                                                               tmp_path: Path) -> None:
    repo = ObjectRepository(store, tmp_path / "cache")
    publish_copy(repo, source_version(imagenet_repo))
    key = f"{repo.base}/{NAME}/1/{MODEL_FILE}"
    data = bytearray(repo.fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    repo.fs.pipe_file(key, bytes(data))
    with pytest.raises(VerificationError, match="does not match its sha256"):
        ObjectRepository(store, tmp_path / "other").get(NAME, 1)
    repo.fs.put_file(str(source_version(imagenet_repo) / MODEL_FILE), key)  # repaired in the store
    cached = ObjectRepository(store, tmp_path / "other").get(NAME, 1)
    with open(cached.model_path, "r+b") as fh:  # and now the local cache is damaged
        fh.seek(100)
        fh.write(b"\x00" * 16)
    again = ObjectRepository(store, tmp_path / "other").get(NAME, 1)
    assert again.model_path.read_bytes() == (source_version(imagenet_repo) / MODEL_FILE).read_bytes()


@pytest.mark.parametrize("writes", ["conditional", "lock"])
def test_concurrent_promotions_leave_a_consistent_alias(store: str, imagenet_repo: Path, tmp_path: Path,
                                                        writes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight writers promote eight versions at once: every promotion is applied on top of the one before it
    (conditional puts retried, or the lock object held), so the final production was promoted last and
    previous is the production it replaced, one of the others; no update is lost or torn."""
    monkeypatch.setattr(store_writes, "LOCK_SETTLE_S", 0.2)
    setup = ObjectRepository(store, tmp_path / "setup", writes=writes)  # type: ignore[arg-type]
    for _ in range(8):
        publish_copy(setup, source_version(imagenet_repo))
    setup.promote(NAME, 1)
    order: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        try:
            result = ObjectRepository(store, tmp_path / f"w{version}", writes=writes).promote(NAME, version)  # type: ignore[arg-type]
            order.append(result)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in range(2, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    final = setup.aliases(NAME)
    assert json.loads(setup.fs.cat_file(f"{setup.base}/{NAME}/aliases.json")) == final
    assert final in order and final["production"] in range(2, 9)
    previous = {r["production"]: r["previous"] for r in order}
    chain = [final["production"]]  # each promotion's previous is the production it replaced: one chain
    while chain[-1] in previous:
        chain.append(previous[chain[-1]])
    assert sorted(chain) == list(range(1, 9)), (chain, order)


def test_two_publishers_at_once_get_different_versions(store: str, imagenet_repo: Path, tmp_path: Path) -> None:
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        publish_copy(ObjectRepository(store, tmp_path / f"p{i}"), source_version(imagenet_repo)))) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [1, 2, 3]
    assert ObjectRepository(store, tmp_path / "reader").versions(NAME) == [1, 2, 3]


def test_an_unreachable_store_falls_back_to_the_verified_cache(store: str, imagenet_repo: Path, tmp_path: Path,
                                                               seaweedfs: SeaweedFS,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    repo = ObjectRepository(store, tmp_path / "cache")
    publish_copy(repo, source_version(imagenet_repo))
    repo.promote(NAME, 1)
    repo.get(NAME)
    seaweedfs.kill()
    try:
        restarted = ObjectRepository(store, tmp_path / "cache")  # a replica restarted during the outage
        with caplog.at_level(logging.WARNING):
            assert restarted.names() == [NAME] and restarted.aliases(NAME) == {"production": 1}
            assert restarted.get(NAME).manifest.version == 1
        assert restarted.unreachable is not None and "EndpointConnectionError" in restarted.unreachable
        with pytest.raises(RepositoryError, match="cannot"):
            restarted.start_rollout(NAME, 1, "canary", 0.5)  # writes need the store
        secret = seaweedfs.env()["AWS_SECRET_ACCESS_KEY"]
        assert secret not in caplog.text and "using the cache" in caplog.text
    finally:
        seaweedfs.start()
    assert restarted.aliases(NAME) == {"production": 1} and restarted.unreachable is None


def test_a_rollout_is_kept_in_the_aliases_and_ended_by_promotion(store: str, imagenet_repo: Path,
                                                                 tmp_path: Path) -> None:
    repo = ObjectRepository(store, tmp_path / "cache")
    for _ in range(2):
        publish_copy(repo, source_version(imagenet_repo))
    with pytest.raises(RepositoryError, match="no production version"):
        repo.start_rollout(NAME, 2, "shadow", 0.5)
    repo.promote(NAME, 1)
    with pytest.raises(RepositoryError, match="production already"):
        repo.start_rollout(NAME, 1, "canary", 0.5)
    with pytest.raises(RepositoryError, match="greater than 0"):
        repo.start_rollout(NAME, 2, "canary", 0)
    repo.start_rollout(NAME, 2, "shadow", 0.25)
    assert repo.rollout(NAME) is not None and repo.rollout(NAME).weight == 0.25  # type: ignore[union-attr]
    assert repo.aliases(NAME) == {"production": 1}
    repo.promote(NAME, 2)
    assert repo.rollout(NAME) is None and repo.aliases(NAME) == {"production": 2, "previous": 1}
