"""The Open Inference Protocol (KServe V2) on a real `imgclf serve`, driven by Triton's own clients.

One server for the module: the bootstrapped imagenet-lite0 as version 1 (production) and a copy as
version 2 (pinned by IMGCLF_MODELS), REST on the HTTP port and gRPC on IMGCLF_GRPC_PORT. Clients are
the real ones from PyPI: ``tritonclient.http`` and ``tritonclient.grpc``, plus plain JSON with base64
through httpx, as curl would send it. KServe's own client is not used: installing it would downgrade
psutil and pandas in this environment (docs/open-inference.md).
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from imgclf.devserver import free_port
from service.http.v2 import schemas
from service.preprocessing import PreprocessSpec, image_to_tensor
from tests.support import images
from tests.support.servers import AUTH, NAME, TOKEN, V2Server, add_copy, copy_repo, serve

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

MAX_IMAGES = 8
MAX_REQUEST = 16 * 1024 * 1024  # JSON pixels of 2 images are about 6 MB
CATS = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def v2(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[V2Server]:
    tmp = tmp_path_factory.mktemp("v2")
    repo = copy_repo(imagenet_repo, tmp / "models")
    assert add_copy(repo) == 2
    port = free_port()
    env = {"IMGCLF_WORKERS": "1",  # one worker: an admin reload and the batching test see every request
           "IMGCLF_MODELS": f"{NAME},{NAME}:2", "IMGCLF_GRPC_PORT": str(port), "IMGCLF_GRPC_HOST": "127.0.0.1",
           "IMGCLF_ADMIN_TOKEN": TOKEN, "IMGCLF_MAX_BATCH_IMAGES": str(MAX_IMAGES),
           "IMGCLF_MAX_REQUEST_BYTES": str(MAX_REQUEST), "IMGCLF_MAX_BATCH_SIZE": "16",
           "IMGCLF_BATCH_WAIT_MS": "100"}  # a long wait: the batching test's items meet in one batch
    with serve(repo.root, tmp / "home", **env) as live:
        yield V2Server(live, f"127.0.0.1:{port}", repo)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Real photos as JPEGs of different sizes (scikit-image's chelsea, coffee and astronaut)."""
    return [images.encode(images.photo(size, which).convert("RGB"), "JPEG", quality=90)
            for which, size in (("chelsea", (451, 300)), ("coffee", (400, 300)), ("astronaut", (256, 256)))]


def classify_probabilities(client: httpx.Client, data: bytes, model: str | None = None) -> np.ndarray:
    """/classify's calibrated probabilities for every label (top_k = all of them), by index."""
    fields = {"top_k": "1000", **({"model": model} if model else {})}
    response = client.post("/classify", files={"image": ("x.jpg", data)}, data=fields)
    assert response.status_code == 200, response.text
    probs = np.zeros(1000, np.float32)
    for p in response.json()["predictions"]:
        probs[p["index"]] = p["score"]
    return probs


def http_image_input(photos: list[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(photos)], "BYTES")
    tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))  # binary_data=True: the binary extension
    return tensor


def grpc_image_input(photos: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(photos)], "BYTES")
    tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))
    return tensor


# --- health and metadata ---------------------------------------------------------------------------


def test_health_and_metadata_over_both_clients(v2: V2Server) -> None:
    http, grpc = v2.http, v2.grpc
    assert http.is_server_live() and http.is_server_ready() and grpc.is_server_live() and grpc.is_server_ready()
    for client in (http, grpc):
        assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1") and client.is_model_ready(NAME, "2")
        assert not client.is_model_ready(NAME, "3") and not client.is_model_ready("no-such-model")
    server = http.get_server_metadata()
    assert server["name"] == "imgclf" and {"binary_tensor_data", "classification"} <= set(server["extensions"])
    assert grpc.get_server_metadata(as_json=True)["extensions"] == server["extensions"]

    meta = http.get_model_metadata(NAME)
    assert meta["platform"] == "onnx_onnxv1" and meta["versions"] == ["1", "2"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("image", "BYTES", (-1,)), ("pixels", "FP32", (-1, 3, 224, 224))}
    assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [("probabilities", [-1, 1000]), ("logits", [-1, 1000])]
    params = meta["parameters"]
    assert params["labels"] == 1000 and params["provider"] == "CPUExecutionProvider" and len(params["model_sha256"]) == 64
    spec = PreprocessSpec.model_validate_json(params["preprocessing"])
    manifest = v2.repo.get(NAME, 1).manifest
    assert spec == manifest.preprocessing and params["temperature"] == manifest.temperature

    schemas.ServerMetadataResponse.model_validate(server)  # what the OpenAPI document says they are
    schemas.ModelMetadataResponse.model_validate(meta)
    schemas.ModelConfigResponse.model_validate(http.get_model_config(NAME))
    g = grpc.get_model_metadata(NAME, "2", as_json=True)
    assert g["name"] == NAME and g["platform"] == "onnx_onnxv1" and g["versions"] == ["1", "2"]
    assert [i["name"] for i in g["inputs"]] == ["image", "pixels"]
    for config in (http.get_model_config(NAME), grpc.get_model_config(NAME, as_json=True)["config"]):
        assert int(config.get("max_batch_size", 0)) == 0 and config["platform"] == "onnx_onnxv1"
        assert int(config["dynamic_batching"]["preferred_batch_size"][0]) == 16  # IMGCLF_MAX_BATCH_SIZE


def test_rest_health_bodies_and_unknown_paths(v2: V2Server) -> None:
    c = v2.live.client
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get(f"/v2/models/{NAME}/versions/2/ready").json() == {"name": NAME, "ready": True}
    for path, words in ((f"/v2/models/{NAME}/versions/7", "loaded versions: 1, 2"),
                        ("/v2/models/nope", "served models: imagenet-lite0"),
                        (f"/v2/models/{NAME}%2Fversions%2F1", "unknown model"),  # an encoded / stays in the name
                        ("/v2/repository/nothing", "no V2 endpoint")):
        response = c.get(path)
        assert response.status_code == 404 and words in response.json()["error"], response.text
    wrong = c.get(f"/v2/models/{NAME}/infer")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and set(wrong.json()) == {"error"}


# --- inference -------------------------------------------------------------------------------------


def test_binary_images_equal_classify_over_http_and_grpc(v2: V2Server, photos: list[bytes]) -> None:
    expected = np.stack([classify_probabilities(v2.live.client, p) for p in photos])
    outputs = [httpclient.InferRequestedOutput("probabilities"), httpclient.InferRequestedOutput("logits")]
    result = v2.http.infer(NAME, [http_image_input(photos)], outputs=outputs, request_id="r-1")
    answer = result.get_response()
    assert answer["model_name"] == NAME and answer["model_version"] == "1" and answer["id"] == "r-1"
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 1000) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert result.as_numpy("logits").shape == (3, 1000)

    g = v2.grpc.infer(NAME, [grpc_image_input(photos)], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(g.as_numpy("probabilities"), expected, atol=1e-5)
    assert g.get_response().model_version == "1" and g.as_numpy("logits") is None  # only what was asked


def test_classification_extension_binary_and_json(v2: V2Server, photos: list[bytes]) -> None:
    labels = v2.repo.get(NAME, 1).manifest.labels
    expected = classify_probabilities(v2.live.client, photos[0])
    for binary in (True, False):
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        result = v2.http.infer(NAME, [http_image_input(photos[:2])], outputs=[out])
        rows = result.as_numpy("probabilities")
        assert rows.shape == (2, 3)
        assert ("binary_data_size" in result.get_output("probabilities").get("parameters", {})) == binary
        scores, best = [], []
        for element in rows[0]:  # bytes from the binary answer, str from JSON
            score, index, label = (element.decode() if isinstance(element, bytes) else element).split(":", 2)
            assert labels[int(index)] == label
            assert abs(float(score) - expected[int(index)]) < 1e-5
            scores.append(float(score))
            best.append(label)
        assert scores == sorted(scores, reverse=True) and best[0] in CATS
    g = v2.grpc.infer(NAME, [grpc_image_input(photos[:1])],
                      outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=5)])
    assert g.as_numpy("probabilities").shape == (1, 5) and g.as_numpy("probabilities")[0][0].split(b":")[2] in (
        {c.encode() for c in CATS})


def test_compressed_requests_as_tritonclient_sends_them(v2: V2Server, photos: list[bytes]) -> None:
    """tritonclient's request_compression_algorithm (gzip, deflate) over REST, and gRPC's own compression."""
    expected = np.stack([classify_probabilities(v2.live.client, p) for p in photos[:2]])
    out = [httpclient.InferRequestedOutput("probabilities")]
    for algorithm in ("gzip", "deflate"):
        result = v2.http.infer(NAME, [http_image_input(photos[:2])], outputs=out,
                               request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    g = v2.grpc.infer(NAME, [grpc_image_input(photos[:2])], outputs=[grpcclient.InferRequestedOutput("probabilities")],
                      compression_algorithm="gzip")
    np.testing.assert_allclose(g.as_numpy("probabilities"), expected, atol=1e-5)

    url, c = f"/v2/models/{NAME}/infer", v2.live.client
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"content_type": "base64"},
                                   "data": [base64.b64encode(photos[0]).decode()]}]}).encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = c.post(url, content=raw_deflate.compress(body) + raw_deflate.flush(), headers={"Content-Encoding": "deflate"})
    assert raw.status_code == 200, raw.text  # raw deflate, as some HTTP clients send it
    bomb = gzip.compress(b" " * (MAX_REQUEST + 1))  # about 16 KB that inflate past the request limit
    cases = [
        (c.post(url, content=gzip.compress(body), headers={"Content-Encoding": "br"}), 415, "one of: gzip, deflate"),
        (c.post(url, content=body, headers={"Content-Encoding": "gzip"}), 400, "not valid gzip"),
        (c.post(url, content=gzip.compress(body)[:-12], headers={"Content-Encoding": "gzip"}), 400, "ends early"),
        (c.post(url, content=gzip.compress(body) + b"junk", headers={"Content-Encoding": "gzip"}), 400, "follow"),
        (c.post(url, content=bomb, headers={"Content-Encoding": "gzip"}), 413, f"more than {MAX_REQUEST} bytes"),
    ]
    for response, status, words in cases:
        assert response.status_code == status and words in response.json()["error"], response.text
        assert set(response.json()) == {"error"}


def test_json_outputs_when_binary_is_not_asked(v2: V2Server, photos: list[bytes]) -> None:
    out = httpclient.InferRequestedOutput("probabilities", binary_data=False)
    result = v2.http.infer(NAME, [http_image_input(photos[:1])], outputs=[out])
    assert "data" in result.get_output("probabilities")
    np.testing.assert_allclose(result.as_numpy("probabilities")[0],
                               classify_probabilities(v2.live.client, photos[0]), atol=1e-5)


def test_curl_style_json_with_base64(v2: V2Server, photos: list[bytes]) -> None:
    body = {"id": "curl", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                      "parameters": {"content_type": "base64"},
                                      "data": [base64.b64encode(p).decode() for p in photos[:2]]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}, {"name": "probabilities"}]}
    dup = v2.live.client.post(f"/v2/models/{NAME}/infer", json=body)
    assert dup.status_code == 400 and "requested twice" in dup.json()["error"]
    body["outputs"] = [{"name": "probabilities", "parameters": {"classification": 2}}]
    response = v2.live.client.post(f"/v2/models/{NAME}/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json", response.text
    answer = schemas.InferenceResponse.model_validate_json(response.content).model_dump(exclude_none=True)
    assert answer["id"] == "curl" and answer["model_version"] == "1"
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 2] and output["data"][0].split(":")[2] in CATS
    top = classify_probabilities(v2.live.client, photos[1])
    score, index, _ = output["data"][2].split(":", 2)
    assert int(index) == int(np.argmax(top)) and abs(float(score) - top.max()) < 1e-5


def test_fp32_pixels_the_client_preprocessed(v2: V2Server, photos: list[bytes]) -> None:
    spec = PreprocessSpec.model_validate_json(v2.http.get_model_metadata(NAME)["parameters"]["preprocessing"])
    pixels = np.stack([image_to_tensor(p, spec) for p in photos[:2]]).astype(np.float32)
    expected = np.stack([classify_probabilities(v2.live.client, p) for p in photos[:2]])
    for binary in (True, False):
        tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = v2.http.infer(NAME, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities")])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    g_tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    g_tensor.set_data_from_numpy(pixels)
    g = v2.grpc.infer(NAME, [g_tensor])  # no outputs named: every output
    np.testing.assert_allclose(g.as_numpy("probabilities"), expected, atol=1e-5)
    assert g.as_numpy("logits").shape == (2, 1000)


# --- version routing and hot reload ---------------------------------------------------------------


def test_version_routing(v2: V2Server, photos: list[bytes]) -> None:
    for version in ("1", "2"):
        result = v2.http.infer(NAME, [http_image_input(photos[:1])], model_version=version)
        assert result.get_response()["model_version"] == version
        g = v2.grpc.infer(NAME, [grpc_image_input(photos[:1])], model_version=version)
        assert g.get_response().model_version == version
    np.testing.assert_allclose(  # version 2 is a copy of 1's weights
        v2.http.infer(NAME, [http_image_input(photos[:1])], model_version="2").as_numpy("probabilities")[0],
        classify_probabilities(v2.live.client, photos[0], f"{NAME}:2"), atol=1e-5)
    for client, make in ((v2.http, http_image_input), (v2.grpc, grpc_image_input)):
        with pytest.raises(InferenceServerException, match="loaded versions: 1, 2"):
            client.infer(NAME, [make(photos[:1])], model_version="3")
    with pytest.raises(InferenceServerException, match="served models: imagenet-lite0") as caught:
        v2.grpc.infer("resnet", [grpc_image_input(photos[:1])])
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_hot_reload_moves_the_unversioned_route(v2: V2Server, photos: list[bytes]) -> None:
    """Promote 2 and reload: /infer serves 2, version 1 is gone (404 naming 2); then back to 1."""
    def reload() -> None:
        response = v2.live.client.post("/admin/reload", headers=AUTH)
        assert response.status_code == 200, response.text

    try:
        v2.repo.promote(NAME, 2)
        reload()
        assert v2.http.infer(NAME, [http_image_input(photos[:1])]).get_response()["model_version"] == "2"
        assert v2.grpc.infer(NAME, [grpc_image_input(photos[:1])]).get_response().model_version == "2"
        assert v2.http.get_model_metadata(NAME)["versions"] == ["2"]
        with pytest.raises(InferenceServerException, match="loaded versions: 2$"):
            v2.http.infer(NAME, [http_image_input(photos[:1])], model_version="1")
        assert not v2.grpc.is_model_ready(NAME, "1")
    finally:
        v2.repo.promote(NAME, 1)
        reload()
    assert v2.http.get_model_metadata(NAME)["versions"] == ["1", "2"]


# --- client mistakes -------------------------------------------------------------------------------


def batch_sizes(client: httpx.Client) -> dict[str, float]:
    """``imgclf_batch_size`` of version 1 from /metrics: bucket upper bound (and "count", "sum") -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "imgclf_batch_size":
            for sample in family.samples:
                if sample.labels.get("model") == f"{NAME}:1":
                    key = sample.labels.get("le") or sample.name.removeprefix("imgclf_batch_size_")
                    out[key] = sample.value
    return out


def test_one_bad_image_fails_the_request_by_index_and_none_is_scored(v2: V2Server, photos: list[bytes]) -> None:
    before = batch_sizes(v2.live.client)
    for client, make in ((v2.http, http_image_input), (v2.grpc, grpc_image_input)):
        with pytest.raises(InferenceServerException, match=r"image 1: ") as caught:
            client.infer(NAME, [make([photos[0], photos[1][:300], photos[2]])])
        assert caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    html = v2.live.client.post(f"/v2/models/{NAME}/infer", json={"inputs": [{
        "name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"content_type": "base64"},
        "data": [base64.b64encode(photos[0]).decode(), base64.b64encode(b"<html>cat</html>").decode()]}]})
    assert html.status_code == 415 and html.json()["error"].startswith("image 1: "), html.text
    assert batch_sizes(v2.live.client).get("count", 0) == before.get("count", 0)  # nothing reached the model


def test_wrong_pixels_and_limits_say_what_was_expected(v2: V2Server, photos: list[bytes]) -> None:
    c = v2.live.client
    url = f"/v2/models/{NAME}/infer"
    cases = [
        ({"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072},
         400, "must have shape [-1, 3, 224, 224]"),
        ({"name": "pixels", "datatype": "INT64", "shape": [1, 3, 224, 224], "data": [0] * 150528},
         400, "must be FP32"),
        ({"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}, 400, "must be BYTES"),
        ({"name": "image", "datatype": "BYTES", "shape": [MAX_IMAGES + 1], "parameters": {"content_type": "base64"},
          "data": [base64.b64encode(photos[2]).decode()] * (MAX_IMAGES + 1)}, 413, f"at most {MAX_IMAGES} items"),
        ({"name": "tensor", "datatype": "BYTES", "shape": [1], "data": ["x"]}, 400, "takes 'image' (BYTES [-1])"),
    ]
    for tensor, status, words in cases:
        response = c.post(url, json={"inputs": [tensor]})
        assert response.status_code == status and words in response.json()["error"], (tensor["shape"], response.text)
        assert set(response.json()) == {"error"}
    too_big = c.post(url, content=b"{" + b" " * MAX_REQUEST + b"}")
    assert too_big.status_code == 413 and "larger than" in too_big.json()["error"]
    with pytest.raises(InferenceServerException, match="Received message larger than max|RESOURCE_EXHAUSTED") as caught:
        v2.grpc.infer(NAME, [grpc_image_input([b"\xff" * (MAX_REQUEST + 1)])])
    assert "RESOURCE_EXHAUSTED" in caught.value.status()
    broken = c.post(url, content=b'{"inputs": [', headers={"Inference-Header-Content-Length": "999"})
    assert broken.status_code == 400 and "Inference-Header-Content-Length" in broken.json()["error"]


def test_a_v2_request_of_8_images_is_batched_with_classify_traffic(v2: V2Server, photos: list[bytes]) -> None:
    """8 V2 items and 4 concurrent /classify images: a batch of more than 8 can only be a mixed one."""
    from concurrent.futures import ThreadPoolExecutor

    eight = [photos[i % 3] for i in range(8)]

    def classify(data: bytes) -> int:
        return v2.live.client.post("/classify", files={"image": ("x.jpg", data)}).status_code

    for _attempt in range(5):  # the queue waits 100 ms for more: the items meet unless the machine stalls
        before = batch_sizes(v2.live.client)
        with ThreadPoolExecutor(5) as pool:
            v2_result = pool.submit(lambda: v2.http.infer(NAME, [http_image_input(eight)]))  # a client per thread
            statuses = list(pool.map(classify, [photos[0]] * 4))
            assert v2_result.result().as_numpy("probabilities").shape == (8, 1000) and statuses == [200] * 4
        after = batch_sizes(v2.live.client)
        assert after["sum"] - before.get("sum", 0) == 12  # each of the 8 images was one item in the queue
        mixed = (after["count"] - after["8.0"]) - (before.get("count", 0) - before.get("8.0", 0))  # 9 or more
        if mixed:
            return
    pytest.fail(f"no batch mixed V2 and /classify items in 5 attempts: {after}")
