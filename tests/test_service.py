"""The HTTP service, for real: `imgclf serve` in a subprocess on a free port, real photos, real errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from imgclf.devserver import running_server
from service.repository import ModelRepository
from service.runtime import create_session, run_logits, softmax
from tests.support import ROOT, images
from tests.support.cli import imgclf

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

CATS = {"tabby", "tiger cat", "Egyptian cat"}
MAX_UPLOAD = 2 * 1024 * 1024
MAX_BATCH = 8


@pytest.fixture(scope="module")
def repo_dir(imagenet_repo: Path) -> Path:
    return imagenet_repo


@pytest.fixture(scope="module")
def server(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    env = {"IMGCLF_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "IMGCLF_MAX_BATCH_IMAGES": str(MAX_BATCH)}
    with running_server(repo_dir, tmp_path_factory.mktemp("bentoml_home"), env) as live:
        yield live.client


def jpeg(img: Image.Image, **kwargs: object) -> bytes:
    return images.encode(img.convert("RGB"), "JPEG", quality=92, **kwargs)


def classify(client: httpx.Client, data: bytes, name: str = "x.jpg", **fields: str) -> httpx.Response:
    return client.post("/classify", files={"image": (name, data)}, data=fields)


def assert_client_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert words.lower() in body["error"].lower(), body
    assert body["status"] == status and body["kind"]


# --- answers ----------------------------------------------------------------------------------------


def test_real_photos_get_the_right_answer(server: httpx.Client) -> None:
    cat = classify(server, jpeg(images.photo()), top_k="3").json()
    assert (cat["model"], cat["version"]) == ("imagenet-lite0", 1)
    assert cat["predictions"][0]["label"] in CATS and len(cat["predictions"]) == 3
    scores = [p["score"] for p in cat["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
    coffee = classify(server, jpeg(images.photo(which="coffee"))).json()
    assert coffee["predictions"][0]["label"] == "espresso"
    assert {"preprocess", "total"} <= set(cat["timing_ms"])


def test_answer_equals_onnx_runtime_on_the_same_bytes(server: httpx.Client, repo_dir: Path) -> None:
    from service.preprocessing import image_to_tensor

    version = ModelRepository(repo_dir).get("imagenet-lite0")
    data = jpeg(images.photo(which="coffee"))
    expected = softmax(run_logits(create_session(version.model_path), image_to_tensor(data, version.manifest.preprocessing)[None]),
                       version.manifest.temperature)[0]
    got = classify(server, data, top_k="5").json()["predictions"]
    for p in got:
        assert p["score"] == pytest.approx(float(expected[p["index"]]), abs=1e-5)
    assert [p["index"] for p in got] == list(np.argsort(-expected)[:5])


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("PNG", "I;16"), ("WEBP", "RGB"), ("GIF", "P"),
     ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "CMYK"), ("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "LA")],
)
def test_every_format_and_mode(server: httpx.Client, fmt: str, mode: str) -> None:
    img = images.photo((400, 300))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    elif mode == "LA":
        img = img.convert("L").convert("LA")
    else:
        img = img.convert(mode)
    response = classify(server, images.encode(img, fmt), name="photo.bin")
    assert response.status_code == 200, response.text
    top5 = {p["label"] for p in response.json()["predictions"]}
    assert top5 & CATS, (fmt, mode, top5)  # the cat survives every encoding


def test_exif_orientation_is_applied(server: httpx.Client) -> None:
    """Phone photos stored rotated with an EXIF tag: the answer must be the upright one."""
    from skimage import data

    upright = data.rocket()  # 'missile' upright, 'crane' lying on its side
    expected = classify(server, jpeg(Image.fromarray(upright)), top_k="1").json()["predictions"][0]["label"]
    for orientation in (3, 6, 8):
        stored = images.with_orientation(upright, orientation, "JPEG")
        tagged = classify(server, stored, top_k="1").json()["predictions"][0]["label"]
        raw = Image.open(io.BytesIO(stored))  # the stored pixels, orientation ignored
        ignored = classify(server, jpeg(raw), top_k="1").json()["predictions"][0]["label"]
        assert tagged == expected, orientation
        assert ignored != expected, orientation  # orientation really changes the answer


# --- client errors -------------------------------------------------------------------------------


def test_bad_inputs_get_clear_4xx(server: httpx.Client) -> None:
    good = jpeg(images.photo((200, 150)))
    cases = [
        (classify(server, good[: len(good) // 2]), 400, "truncated"),
        (classify(server, os.urandom(5000)), 415, "supported formats"),
        (classify(server, b"just some text, not an image", name="notes.jpg"), 415, "supported formats"),
        (classify(server, b"<html><body>hi</body></html>", name="page.jpg"), 415, "supported formats"),
        (classify(server, b""), 415, "supported formats"),
        (classify(server, images.png_bomb(100_000, 100_000)), 413, "pixel"),
        (classify(server, images.encode(Image.new("RGB", (1, 1)), "PNG")), 400, "at least"),
        (classify(server, images.encode(Image.new("RGB", (20000, 1)), "PNG")), 400, "at least"),
        (classify(server, b"\0" * (MAX_UPLOAD + 100_000)), 413, "larger than"),
        (server.post("/classify", content=b""), 400, "multipart/form-data"),
        (server.post("/classify", files={"picture": ("a.jpg", good)}), 400, "unknown form field"),
        (server.post("/classify", data={"image": "http://127.0.0.1:9/cat.jpg"}), 400, "multipart"),
        (server.post("/classify", data={"top_k": "1"}, files={"model": ("m", b"x")}), 400, "missing file field"),
        (server.post("/classify", content=b"--zz\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=zz"}),
         400, "multipart"),
        (classify(server, good, top_k="0"), 400, "top_k"),
        (classify(server, good, top_k="-1"), 400, "top_k"),
        (classify(server, good, top_k="1000000"), 400, "top_k"),
        (classify(server, good, top_k="many"), 400, "top_k"),
        (classify(server, good, top_k="true"), 400, "top_k"),  # JSON true is not the count 1
        (classify(server, good, top_k="2.5"), 400, "top_k"),
        (classify(server, good, model="no-such-model"), 404, "not served"),
        (classify(server, good, model="imagenet-lite0:7"), 404, "not served"),
        (classify(server, good, model="../../etc/passwd"), 400, "invalid model name"),
        (classify(server, good, model="%2e%2e%2fmodels"), 400, "invalid model name"),
        (classify(server, good, model="/abs/path"), 400, "invalid model name"),
    ]
    for response, status, words in cases:
        assert_client_error(response, status, words)
    assert server.get("/readyz").status_code == 200


def test_oversized_body_is_refused_before_it_is_read(server: httpx.Client) -> None:
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(4096):  # 256 MiB if anyone read it all
            sent += 1
            yield b"\xff" * 65536

    try:
        response = server.post("/classify", content=endless(),
                               headers={"content-type": "multipart/form-data; boundary=b"})
    except httpx.TransportError:  # the server answered and closed while we were still sending
        response = None
    if response is not None:
        assert_client_error(response, 413, "larger than")
    assert sent < 4096  # the server stopped reading long before the end
    assert server.get("/readyz").status_code == 200


def test_method_and_model_listing(server: httpx.Client) -> None:
    models = server.get("/models").json()["models"]
    assert len(models) == 1
    info = models[0]
    assert (info["name"], info["version"], info["labels"], info["default"]) == ("imagenet-lite0", 1, 1000, True)
    assert info["provider"] == "CPUExecutionProvider" and info["preprocessing"]["resize_size"] == 256
    assert server.post("/models").status_code == 405


# --- batches and concurrency ---------------------------------------------------------------------------


def test_batch_keeps_order_and_isolates_bad_images(server: httpx.Client) -> None:
    cat, coffee = jpeg(images.photo((300, 200))), jpeg(images.photo((300, 200), which="coffee"))
    files = [("images", ("a.jpg", cat)), ("images", ("b.jpg", b"not an image")), ("images", ("c.jpg", coffee)),
             ("images", ("d.png", images.png_bomb(90_000, 90_000)))]
    response = server.post("/classify_batch", files=files, data={"top_k": "1"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert results[0]["predictions"][0]["label"] in CATS and results[0]["error"] is None
    assert results[1]["error"]["status"] == 415 and results[1]["predictions"] is None
    assert results[2]["predictions"][0]["label"] == "espresso"
    assert results[3]["error"]["kind"] == "image_too_large"


def test_batch_limits(server: httpx.Client) -> None:
    cat = jpeg(images.photo((64, 64)))
    too_many = [("images", (f"{i}.jpg", cat)) for i in range(MAX_BATCH + 1)]
    assert_client_error(server.post("/classify_batch", files=too_many), 400, f"at most {MAX_BATCH}")
    assert_client_error(server.post("/classify_batch", data={"top_k": "1"}), 400, "field 'images'")


def test_bad_image_in_concurrent_traffic_fails_only_itself(server: httpx.Client) -> None:
    good, bad = jpeg(images.photo((320, 240))), b"\xff\xd8\xff\xe0 broken jpeg"
    payloads = [bad if i % 5 == 2 else good for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: classify(server, data, top_k="1"), payloads))
    for data, response in zip(payloads, responses, strict=True):
        if data is bad:
            assert response.status_code in (400, 415), response.text
        else:
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["label"] in CATS


def metric_total(metrics: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_concurrent_requests_are_batched(server: httpx.Client) -> None:
    before = server.get("/metrics").text
    photo = images.photo((256, 192))
    distinct = [jpeg(photo, comment=f"request {i}".encode()) for i in range(48)]  # no response cache hits
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: classify(server, data, top_k="1"), distinct))
    assert all(r.status_code == 200 for r in responses)
    after = server.get("/metrics").text
    images_run = metric_total(after, "imgclf_batch_size_sum") - metric_total(before, "imgclf_batch_size_sum")
    batches = metric_total(after, "imgclf_batch_size_count") - metric_total(before, "imgclf_batch_size_count")
    assert images_run == 48 and 1 <= batches <= 48  # how many calls a busy machine makes is not fixed: below


def test_requests_queued_together_share_one_onnx_runtime_call(repo_dir: Path) -> None:
    """The batching queue itself, in process: eight requests queued before the batching task runs go into one
    ONNX Runtime call, whatever the machine's speed (over HTTP the number of calls depends on timing)."""
    import asyncio

    from service.http.served import ServedModel
    from service.preprocessing import image_to_tensor
    from service.runtime import OnnxModel

    version = ModelRepository(repo_dir).get("imagenet-lite0")
    sizes: list[int] = []
    served = ServedModel(OnnxModel.load(version.model_path, version.manifest), max_batch_size=8,
                         on_batch=lambda _model, size, _seconds: sizes.append(size))
    tensor = image_to_tensor(jpeg(images.photo()), version.manifest.preprocessing)

    async def eight() -> list[np.ndarray]:
        return await asyncio.gather(*(served.infer(tensor) for _ in range(8)))

    answers = asyncio.run(eight())
    assert sizes == [8]
    assert all(np.allclose(a, answers[0], atol=1e-5) for a in answers)


# --- operations ---------------------------------------------------------------------------------------------


def test_health_metrics_and_docs(server: httpx.Client) -> None:
    assert server.get("/livez").status_code == 200
    classify(server, jpeg(images.photo((100, 80))))
    classify(server, b"nope")
    metrics = server.get("/metrics").text
    for name in ("imgclf_preprocess_seconds", "imgclf_inference_seconds", "imgclf_batch_size",
                 'imgclf_errors_total{kind="unsupported_format"}'):
        assert name in metrics
    info = [line for line in metrics.splitlines() if line.startswith("imgclf_model_info{")]
    assert any('model="imagenet-lite0:1"' in line and 'provider="CPUExecutionProvider"' in line for line in info)
    schema = server.get("/schema.json").json()
    assert {"/classify", "/classify_batch"} <= set(schema["paths"])
    index = server.get("/")  # BentoML 1.4 serves its Swagger UI at the root, the spec at /docs.json
    assert index.status_code == 200 and "swagger" in index.text.lower()
    assert "/classify" in server.get("/docs.json").json()["paths"]


def test_service_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import service.http.app\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'training'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_cuda_requested_without_cuda_is_a_startup_error(repo_dir: Path) -> None:
    import onnxruntime

    from service.http.catalog import Catalog
    from service.runtime import SessionError
    from service.settings import Settings

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    with pytest.raises(SessionError, match="no CUDA provider"):
        Catalog.load(Settings(model_repo=repo_dir, device="cuda"))


def test_serve_without_models_says_what_to_do(tmp_path: Path) -> None:
    result = imgclf("serve", "--repo", str(tmp_path / "empty"), without_train=True)
    assert result.returncode == 2 and "imgclf bootstrap" in result.stderr


def test_settings_from_environment() -> None:
    from service.settings import Settings

    settings = Settings.from_env({"IMGCLF_MODELS": "a, b:2", "IMGCLF_WORKERS": "2", "IMGCLF_DEVICE": "cpu"})
    assert settings.models == ["a", "b:2"] and settings.workers == 2 and settings.device == "cpu"
    with pytest.raises(ValueError, match="device"):
        Settings.from_env({"IMGCLF_DEVICE": "tpu"})


# --- batch jobs: `imgclf batch` and the /batch task ---------------------------------------------------


def _batch_files(root: Path) -> dict[str, bytes]:
    files = {
        "cats/chelsea.jpg": jpeg(images.photo()),
        "cats/chelsea_small.png": images.encode(images.photo((200, 150)), "PNG"),
        "coffee.webp": images.encode(images.photo(which="coffee"), "WEBP"),
        "rocket.jpg": jpeg(images.photo((300, 500), which="rocket")),
        "broken.jpg": b"\xff\xd8\xff\xe0 truncated",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _wait_for_task(server: httpx.Client, task_id: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = server.get("/batch/status", params={"task_id": task_id}).json()["status"]
        if status in ("success", "completed", "failure", "failed"):
            return server.get("/batch/get", params={"task_id": task_id})
        time.sleep(0.2)
    raise AssertionError("task did not finish")


def test_batch_job_and_task_agree_with_classify(server: httpx.Client, repo_dir: Path, tmp_path: Path) -> None:
    """The same files through /classify, `imgclf batch` and the /batch task: the same answers."""
    import tarfile
    import zipfile

    from service.batch.runner import BatchOptions, run_batch
    from service.settings import Settings

    files = _batch_files(tmp_path / "in")
    summary = run_batch(BatchOptions(source=str(tmp_path / "in"), model="imagenet-lite0", out=tmp_path / "o.jsonl",
                                     top_k=3), Settings.from_env({}, model_repo=repo_dir))
    offline = {Path(r["path"]).relative_to(tmp_path / "in").as_posix(): r
               for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert summary.total == len(files) == len(offline)

    with zipfile.ZipFile(tmp_path / "job.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("__MACOSX/cats/._chelsea.jpg", b"resource fork")  # skipped, like the hidden files
    with tarfile.open(tmp_path / "job.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "in", arcname=".")
    for archive in ("job.zip", "job.tar.gz"):
        submitted = server.post("/batch/submit", files={"archive": (archive, (tmp_path / archive).read_bytes())},
                                data={"top_k": "3"})
        assert submitted.status_code == 200, submitted.text
        result = _wait_for_task(server, submitted.json()["task_id"])
        assert result.status_code == 200 and "ndjson" in result.headers["content-type"]
        online = {r["path"]: r for r in map(json.loads, result.text.splitlines())}
        assert set(online) == set(files), archive
        for name, data in files.items():
            a, b = online[name], offline[name]
            assert (a["status"], a["labels"], a["error_kind"]) == (b["status"], b["labels"], b["error_kind"])
            if a["status"] == "ok":
                answer = classify(server, data, top_k="3").json()
                assert [p["label"] for p in answer["predictions"]] == a["labels"]
                for p, online_score, offline_score in zip(answer["predictions"], a["scores"], b["scores"], strict=True):
                    assert p["score"] == pytest.approx(online_score, abs=1e-5) == pytest.approx(offline_score, abs=1e-5)
    assert offline["broken.jpg"]["status"] == "error"
    assert offline["cats/chelsea.jpg"]["labels"][0] in CATS


def _zip(entries: dict[str, bytes], compression: int = 8) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(add: Callable[[Any], None]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        add(tf)
    return buf.getvalue()


def _tar_link(tf: Any) -> None:
    import tarfile

    link = tarfile.TarInfo("cat.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tf.addfile(link)


def test_batch_task_refuses_hostile_archives(server: httpx.Client) -> None:
    cat = jpeg(images.photo((64, 48)))
    cases = [
        (_zip({"ok.jpg": cat, "../evil.jpg": cat}), 400, "outside the archive"),
        (_zip({"/etc/cron.d/x.jpg": cat}), 400, "outside the archive"),
        (_zip({"a\\..\\..\\b.jpg": cat}), 400, "outside the archive"),
        (_zip({"bomb.bmp": bytes(MAX_UPLOAD - 1)}), 400, "decompression bomb"),  # ~1000x
        (_zip({f"{i}.jpg": cat for i in range(3)} | {"big.raw": bytes(MAX_UPLOAD + 1)}), 413, "bytes uncompressed"),
        (_tar(_tar_link), 400, "link"),
        (b"PK\x03\x04 not really a zip", 400, "not a readable"),
        (cat, 400, "not a readable"),
    ]
    for body, status, words in cases:
        response = server.post("/batch/submit", files={"archive": ("a.zip", body)})
        assert_client_error(response, status, words)
    ssrf = server.post("/batch/submit", files={"archive": (None, "http://169.254.169.254/latest/meta-data")})
    assert_client_error(ssrf, 400, "file upload")
    assert server.get("/readyz").status_code == 200
