"""``POST /explain`` for real (a served imagenet-lite0 and an old-manifest copy), and the runtime under it.

Against `imgclf serve` in a subprocess: each format, bad targets, bad images, limits, model routing
(CAM for the bootstrapped model, occlusion for a manifest written before explanations), hot reload and
the localisation test of issue 15 through the endpoint. Below the endpoint: the logits output taken by
name, explanations and classifications sharing one batch, the crop box of an EXIF-rotated, draft-decoded
JPEG, and the head file checked against the manifest.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from imgclf.devserver import LiveServer
from service.cam import ExplainError
from service.explainer import Explainer, prepare
from service.http.served import ServedModel
from service.manifest import Manifest
from service.overlay import crop_box, overlay
from service.preprocessing import image_to_tensor
from service.repository import MANIFEST, ModelRepository
from service.runtime import OnnxModel, create_session, run_logits
from tests.support import ROOT, images
from tests.support.heatmaps import assert_peak_in_cell
from tests.support.servers import AUTH, NAME, TOKEN, add_copy, copy_repo, serve

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

LEGACY = "legacy-lite0"
CATS = {"tabby", "tiger cat", "Egyptian cat"}
MAX_UPLOAD = 2 * 1024 * 1024
FIELDS = {"model", "version", "target", "method", "heatmap", "crop_box", "confident", "threshold"}


def jpeg(img: Image.Image, **kwargs: object) -> bytes:
    return images.encode(img.convert("RGB"), "JPEG", quality=92, **kwargs)


CHELSEA = jpeg(images.photo((480, 320)))


def add_legacy(repo: ModelRepository) -> None:
    """imagenet-lite0's graph under another name, its manifest as written before explanations (no head)."""
    src = repo.get(NAME, 1)
    head = src.manifest.explain.head_file if src.manifest.explain else None

    def write(staging: Path, version: int) -> Manifest:
        for file in src.path.iterdir():
            if file.is_file() and file.name not in (MANIFEST, head):
                shutil.copyfile(file, staging / file.name)
        return src.manifest.model_copy(update={"name": LEGACY, "version": version, "files": {}, "explain": None,
                                               "schema_version": 1})

    repo.promote(LEGACY, repo.add_version(LEGACY, write).manifest.version)


@pytest.fixture(scope="module")
def repo(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    copy = copy_repo(imagenet_repo, tmp_path_factory.mktemp("explain") / "models")
    add_legacy(copy)
    return copy


@pytest.fixture(scope="module")
def server(repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(repo.root, tmp_path_factory.mktemp("home"), IMGCLF_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
               IMGCLF_ADMIN_TOKEN=TOKEN, IMGCLF_DEFAULT_MODEL=NAME) as live:
        yield live


def explain(server: LiveServer, data: bytes, **fields: str) -> httpx.Response:
    return server.client.post("/explain", files={"image": ("photo.jpg", data)}, data=fields)


def assert_error(response: httpx.Response, status: int, kind: str, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert (body["status"], body["kind"]) == (status, kind) and words in body["error"], body


# --- the runtime under the endpoint ----------------------------------------------------------------------


def test_run_logits_takes_the_logits_output_by_name(tmp_path: Path, imagenet_repo: Path) -> None:
    version = ModelRepository(imagenet_repo).get(NAME)
    session = create_session(version.model_path)
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    x = image_to_tensor(CHELSEA, version.manifest.preprocessing)[None]
    model = OnnxModel.load(version.model_path, version.manifest)
    logits, features = model.run(["logits", "features"], x)
    np.testing.assert_array_equal(run_logits(session, x), logits)
    assert logits.shape == (1, 1000) and features.shape == (1, 1280, 7, 7)
    # a graph that lists its feature map first: the logits are still found by name
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["features"]),
         helper.make_node("ReduceMean", ["input", "axes"], ["logits"], keepdims=0)], "two-outputs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 2, 2])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 2, 2]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    batch = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(run_logits(create_session(tmp_path / "m.onnx"), batch), batch.mean(axis=(2, 3)))


def test_explanations_and_classifications_share_one_batch(imagenet_repo: Path) -> None:
    version = ModelRepository(imagenet_repo).get(NAME)
    sizes: list[int] = []
    served = ServedModel(OnnxModel.load(version.model_path, version.manifest), max_batch_size=8,
                         batch_wait_ms=200, on_batch=lambda _m, n, _s: sizes.append(n))
    x = image_to_tensor(CHELSEA, version.manifest.preprocessing)

    async def both() -> list:
        return await asyncio.gather(served.infer(x), served.infer_outputs(x, ("features",)), served.infer(x),
                                    served.infer_outputs(x, ("features",)), served.infer(x))

    probs, (logits, features), probs2, (logits2, _), raw = asyncio.run(both())
    assert sizes == [5], "one ONNX Runtime call for the whole batch, whatever each item asked for"
    np.testing.assert_array_equal(logits, raw)
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_allclose(probs, probs2)
    assert features.shape == (1280, 7, 7) and probs.shape == (1000,)


def test_the_crop_box_is_in_the_upright_photo_even_after_a_draft_decode(imagenet_repo: Path) -> None:
    """A 1600x1200 JPEG stored sideways (EXIF 6) is 1200x1600 upright, and decoded at half size."""
    spec = ModelRepository(imagenet_repo).get(NAME).manifest.preprocessing
    upright = np.asarray(images.photo((1200, 1600)).convert("RGB"))
    data = images.with_orientation(upright, 6, "JPEG")
    prepared = prepare(data, spec)
    assert spec.draft and Image.open(io.BytesIO(data)).size == (1600, 1200)
    np.testing.assert_allclose(prepared.crop_box, crop_box(1200, 1600, spec), atol=1.0)
    np.testing.assert_array_equal(prepared.tensor, image_to_tensor(data, spec))
    assert prepared.crop.size == spec.input_size[::-1]


def test_the_head_file_must_match_the_manifest(imagenet_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(imagenet_repo, tmp_path / "models")
    version = repo.get(NAME)
    model = OnnxModel.load(version.model_path, version.manifest)
    assert Explainer(model).method == "cam"
    head = version.path / version.manifest.explain.head_file
    arrays = dict(np.load(head))
    arrays["op2.weight"] = arrays["op2.weight"] * 1.01
    np.savez(head, **arrays)
    with pytest.raises(ExplainError, match="sha256"):
        Explainer(model)


# --- the endpoint ----------------------------------------------------------------------------------------


def test_json_explains_the_top1_class_over_the_crop(server: LiveServer, repo: ModelRepository) -> None:
    response = explain(server, CHELSEA)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == FIELDS and body["model"] == NAME and body["method"] == "cam"
    top = server.client.post("/classify", files={"image": ("c.jpg", CHELSEA)}, data={"top_k": "1"}).json()
    assert body["target"]["label"] in CATS and body["target"]["index"] == top["predictions"][0]["index"]
    assert body["target"]["score"] == pytest.approx(top["predictions"][0]["score"], rel=1e-5)
    heat = np.asarray(body["heatmap"]["values"])
    spec = repo.get(NAME).manifest.preprocessing
    assert (body["heatmap"]["height"], body["heatmap"]["width"]) == heat.shape == spec.input_size
    assert heat.min() >= 0 and heat.max() == 1
    assert body["crop_box"] == pytest.approx(list(crop_box(480, 320, spec)))


def test_png_is_the_heatmap_over_the_crop(server: LiveServer, repo: ModelRepository) -> None:
    response = explain(server, CHELSEA, format="png", target="espresso")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert (response.headers["x-target-label"], response.headers["x-target-index"]) == ("espresso", "967")
    png = Image.open(io.BytesIO(response.content))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (224, 224)
    values = np.asarray(explain(server, CHELSEA, target="967").json()["heatmap"]["values"], np.float32)
    crop = prepare(CHELSEA, repo.get(NAME).manifest.preprocessing).crop
    expected = np.asarray(overlay(crop, values), np.float32)
    assert np.abs(np.asarray(png, np.float32) - expected).mean() < 1.0  # the JSON's map rounds to 1e-4


def test_a_target_by_label_or_index_is_the_same_class(server: LiveServer) -> None:
    by_label, by_index = explain(server, CHELSEA, target="espresso").json(), explain(server, CHELSEA, target="967")
    assert by_label["target"] == by_index.json()["target"] and by_label["target"]["index"] == 967
    assert by_label["heatmap"] == by_index.json()["heatmap"]


@pytest.mark.parametrize("target", ["1000", "-1", "horse"])
def test_a_bad_target_is_a_400_naming_what_is_allowed(server: LiveServer, target: str) -> None:
    assert_error(explain(server, CHELSEA, target=target), 400, "invalid_target", "an index in 0..999")


def test_bad_fields_are_400(server: LiveServer) -> None:
    assert_error(explain(server, CHELSEA, format="gif"), 400, "invalid_request", "format")
    assert_error(explain(server, CHELSEA, top_k="3"), 400, "invalid_request", "unknown form field")
    assert_error(server.client.post("/explain", data={"target": "1"}, files={"other": ("x", b"1")}), 400,
                 "invalid_request", "image")


def test_bad_images_are_4xx(server: LiveServer) -> None:
    assert_error(explain(server, b"not an image at all"), 415, "unsupported_format", "format")
    assert_error(explain(server, CHELSEA[: len(CHELSEA) // 2]), 400, "invalid_image", "")
    assert explain(server, images.png_bomb(20_000, 20_000)).status_code == 413
    too_big = server.client.post("/explain", files={"image": ("big.jpg", b"\xff" * (MAX_UPLOAD + 128 * 1024))})
    assert too_big.status_code == 413 and too_big.json()["status"] == 413


def test_model_routing_and_the_occlusion_fallback(server: LiveServer) -> None:
    legacy = explain(server, CHELSEA, model=LEGACY)
    assert legacy.status_code == 200, legacy.text
    body = legacy.json()
    assert (body["model"], body["method"]) == (LEGACY, "occlusion") and body["target"]["label"] in CATS
    heat = np.asarray(body["heatmap"]["values"])
    assert heat.shape == (224, 224) and heat.max() == 1
    assert explain(server, CHELSEA, model=f"{NAME}:1").json()["method"] == "cam"
    assert_error(explain(server, CHELSEA, model="nope"), 404, "unknown_model", "nope")
    assert_error(explain(server, CHELSEA, model="Bad Name!"), 400, "invalid_model", "invalid model name")


def _canvas(photo: np.ndarray, cell: int, size: int = 128) -> bytes:
    """The photo in one cell of a 2x2 canvas, noise in the next cell, flat grey in the others (PNG)."""
    canvas = np.full((2 * size, 2 * size, 3), 128, np.uint8)
    nr, nc = divmod((cell + 1) % 4, 2)
    canvas[nr * size:(nr + 1) * size, nc * size:(nc + 1) * size] = np.random.default_rng(0).integers(
        0, 256, (size, size, 3))
    r, c = divmod(cell, 2)
    canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] = np.asarray(
        Image.fromarray(photo).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    return images.encode(Image.fromarray(canvas), "PNG")


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket", "astronaut"])
def test_localisation_through_the_endpoint(server: LiveServer, name: str) -> None:
    """The object's class, asked of a 2x2 canvas: the map's peak, and most of its mass, lie in the object's cell."""
    from skimage import data

    photo = getattr(data, name)()
    alone = server.client.post("/classify", files={"image": ("p.jpg", jpeg(Image.fromarray(photo)))},
                               data={"top_k": "1"}).json()["predictions"][0]["index"]
    for cell in range(4):
        body = explain(server, _canvas(photo, cell), target=str(alone)).json()
        assert_peak_in_cell(np.asarray(body["heatmap"]["values"]), cell, name)


def test_the_openapi_document_describes_explain(server: LiveServer) -> None:
    operation = server.client.get("/docs.json").json()["paths"]["/explain"]["post"]
    schema = json.dumps(operation)
    for word in ("image", "target", "format", "heatmap", "crop_box"):
        assert word in schema, word


def test_a_reload_explains_with_the_new_version(server: LiveServer, repo: ModelRepository) -> None:
    """Last in this module: it changes the version the server serves."""
    version = add_copy(repo)
    repo.promote(NAME, version)
    response = server.client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 200 and {"name": NAME, "version": version} in response.json()["models"]
    body = explain(server, CHELSEA).json()
    assert (body["model"], body["version"], body["method"]) == (NAME, 2, "cam")


def test_the_cost_benchmark_runs(imagenet_repo: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.explain_cost", "--repo", str(imagenet_repo), "--rounds", "1",
         "--seconds", "0.5", "--distinct", "2", "--no-occlusion", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "explain_cost.json").read_text())
    assert set(payload["latency_ratio"]) == {"classify", "explain_json", "explain_png"}
    assert payload["throughput_rps"]["explain_json"] > 0 and payload["machine"]["versions"]["onnxruntime"]
    assert "| explain_json |" in (tmp_path / "explain_cost.md").read_text()
