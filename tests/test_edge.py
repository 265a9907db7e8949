"""The HTTP edge as build_app assembles it: the default model, one rule for picking a version, errors
rendered and counted once. In process (httpx over ASGI) on real ONNX Runtime sessions of real models;
what the route table does not answer would go to BentoML, and no request here may reach it."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from service.http.catalog import Catalog, ModelRequiredError
from tests.support import images
from tests.support.edge import edge_for, post
from tests.support.servers import NAME, add_model, copy_repo

pytestmark = pytest.mark.slow  # several ONNX Runtime sessions loaded and warmed up: not in `make test-quick`
COPY = "imagenet-lite0-copy"


@pytest.fixture(scope="module")
def two_models(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repo(imagenet_repo, tmp_path_factory.mktemp("edge") / "models").root
    add_model(root, COPY)
    return root


def _jpeg() -> bytes:
    return images.encode(images.photo((320, 240)).convert("RGB"), "JPEG")


def test_one_model_served_is_the_default(imagenet_repo: Path) -> None:
    catalog = edge_for(imagenet_repo).worker.live.current
    assert catalog.default == NAME and catalog.pick(None).manifest.name == NAME


def test_several_models_and_no_default_is_a_400_that_lists_them(two_models: Path) -> None:
    edge = edge_for(two_models)
    catalog: Catalog = edge.worker.live.current
    assert catalog.default is None
    with pytest.raises(ModelRequiredError) as caught:
        catalog.pick(None)
    assert caught.value.status == 400 and NAME in caught.value.message and COPY in caught.value.message
    response = post(edge, "/classify", files={"image": ("a.jpg", _jpeg())})
    body = response.json()
    assert (response.status_code, body["kind"], body["status"]) == (400, "model_required", 400), body
    assert NAME in body["error"] and COPY in body["error"] and "IMGCLF_DEFAULT_MODEL" in body["error"]
    named = post(edge, "/classify", files={"image": ("a.jpg", _jpeg())}, data={"model": COPY})
    assert named.status_code == 200 and named.json()["model"] == COPY, named.text


def test_the_default_model_setting_is_what_unnamed_requests_get(two_models: Path) -> None:
    edge = edge_for(two_models, default_model=COPY)
    answer = post(edge, "/classify", files={"image": ("a.jpg", _jpeg())})
    assert answer.status_code == 200 and answer.json()["model"] == COPY, answer.text
    from service.http.routes import models_response

    listed = {m.name: m.default for m in models_response(edge.worker.live.current).models}
    assert listed == {NAME: False, COPY: True}
    facts = edge.worker.v2.model_facts(COPY, None)
    assert facts.extra_parameters["default"] is True
    assert edge.worker.v2.model_facts(NAME, None).extra_parameters["default"] is False


def test_a_default_model_that_is_not_served_stops_the_start(two_models: Path) -> None:
    with pytest.raises(RuntimeError, match="IMGCLF_DEFAULT_MODEL=resnet is not served here"):
        edge_for(two_models, default_model="resnet")


def test_every_protocol_picks_the_same_version(imagenet_repo: Path, tmp_path: Path) -> None:
    """Two versions served (one pinned beside production): an unversioned name is production for
    /classify and V2 alike."""
    from service.repository import ModelRepository
    from tests.support.servers import add_copy

    repo = copy_repo(imagenet_repo, tmp_path / "models")
    pinned = add_copy(repo)  # version 2, not promoted
    edge = edge_for(repo.root, models=[f"{NAME}:{pinned}", NAME])
    catalog = edge.worker.live.current
    production = ModelRepository(repo.root).resolve(NAME)
    assert sorted(catalog.versions(NAME)) == sorted({pinned, production})
    assert catalog.select(NAME).manifest.version == production
    assert edge.worker.v2.pick(catalog, NAME, None).manifest.version == production
    assert catalog.select(f"{NAME}:{pinned}").manifest.version == pinned


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.jpg", _jpeg())
    return buffer.getvalue()


def test_a_refusal_is_counted_once(imagenet_repo: Path) -> None:
    """A bad top_k on /batch/submit was counted twice in imgclf_errors_total (at raise and at refusal)."""
    counted: list[str] = []
    edge = edge_for(imagenet_repo)
    refused = post(edge, "/batch/submit", counted, files={"archive": ("a.zip", _zip(), "application/zip")},
                   data={"top_k": "0"})
    assert (refused.status_code, refused.json()["kind"]) == (400, "invalid_top_k"), refused.text
    assert counted == ["invalid_top_k"]
    bad = post(edge, "/classify", counted, files={"image": ("a.jpg", b"not an image")})
    assert bad.status_code == 415 and counted == ["invalid_top_k", "unsupported_format"]


def test_the_repository_extension_lists_loads_and_refuses_to_unload(imagenet_repo: Path, tmp_path: Path) -> None:
    """Triton's model repository extension over V2: the index is public; load (promote + reload) and
    unload are admin actions behind IMGCLF_ADMIN_TOKEN."""
    from tests.support.servers import add_copy

    repo = copy_repo(imagenet_repo, tmp_path / "models")
    second = add_copy(repo)  # registered, not promoted
    edge = edge_for(repo.root, admin_token="secret")
    index = post(edge, "/v2/repository/index").json()
    ready = {(e["name"], e["version"]) for e in index if e["state"] == "READY"}
    assert ready == {(NAME, "1"), (f"{NAME}.pixels", "1"), (f"{NAME}.image", "1")}, index
    assert [e for e in index if e["state"] == "UNAVAILABLE"] == [
        {"name": NAME, "version": str(second), "state": "UNAVAILABLE", "reason": index[-1]["reason"]}]
    assert post(edge, "/v2/repository/index", json={"ready": True}).json() == [e for e in index if e["state"] == "READY"]

    load = f"/v2/repository/models/{NAME}/load"
    refused = post(edge, load, json={"parameters": {"version": str(second)}})
    assert refused.status_code == 401 and refused.json().keys() == {"error"}, refused.text  # V2's shape
    assert edge.worker.live.current.versions(NAME) == [1]
    auth = {"Authorization": "Bearer secret"}
    loaded = post(edge, load, json={"parameters": {"version": str(second)}}, headers=auth)
    assert (loaded.status_code, loaded.json()) == (200, {}), loaded.text
    assert edge.worker.live.current.versions(NAME) == [second]  # promoted, then this worker reloaded
    unknown = post(edge, "/v2/repository/models/resnet/load", headers=auth)
    assert unknown.status_code == 404 and "resnet" in unknown.json()["error"]
    unload = post(edge, f"/v2/repository/models/{NAME}/unload", headers=auth)
    assert unload.status_code == 409 and "IMGCLF_MODELS" in unload.json()["error"]
