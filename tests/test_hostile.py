"""Hostile input over HTTP, for real: `imgclf serve` in a subprocess, attacked with what clients get wrong
on purpose or by accident, and fuzzed from its own OpenAPI schema with schemathesis.

The promise under test (docs/operations.md, "Limits and guarantees"): every client mistake is a 4xx JSON object
``{"error", "kind", "status"}`` with a useful message, never a 5xx, nothing is fetched from a URL, and
the server stays ready. Cases already in tests/test_service.py::test_bad_inputs_get_clear_4xx are not
repeated here. After each test the server must still be ready and its access log free of 5xx.
"""

from __future__ import annotations

import ast
import base64
import io
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgclf.devserver import LiveServer, running_server
from tests.support import ROOT, images
from tests.support.budget import cpu_seconds
from tests.support.mutations import mutated, real_seeds

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

MAX_UPLOAD = 2 * 1024 * 1024
MAX_REQUEST = 4 * 1024 * 1024
MAX_ARCHIVE = 4 * 1024 * 1024
MAX_BATCH = 8
CATS = {"tabby", "tiger cat", "Egyptian cat"}
UPLOAD_ROUTES = {"/classify": "image", "/classify_batch": "images", "/batch/submit": "archive", "/batch": "archive",
                 "/explain": "image"}


@pytest.fixture(scope="module")
def live(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"IMGCLF_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "IMGCLF_MAX_REQUEST_BYTES": str(MAX_REQUEST),
           "IMGCLF_MAX_ARCHIVE_BYTES": str(MAX_ARCHIVE), "IMGCLF_MAX_BATCH_IMAGES": str(MAX_BATCH)}
    with running_server(imagenet_repo, tmp_path_factory.mktemp("bentoml_home"), env) as srv:
        yield srv


@pytest.fixture
def server(live: LiveServer) -> Iterator[httpx.Client]:
    """The module's server; afterwards it must be ready, and its access log must show no 5xx."""
    logged = live.log.stat().st_size
    yield live.client
    assert live.client.get("/readyz").status_code == 200
    with open(live.log, "rb") as fh:
        fh.seek(logged)
        new = fh.read().decode("utf-8", "replace")
    assert "(status=" in new, "BentoML's access log format changed: the 5xx check below would see nothing"
    answered_5xx = [line for line in new.splitlines() if "(status=5" in line]
    assert not answered_5xx, answered_5xx[:5]


def assert_error(response: httpx.Response, status: int | tuple[int, ...], words: str = "") -> dict:
    """A 4xx error object, JSON, exactly ``{"error", "kind", "status"}``, saying ``words``."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "kind", "status"}, body
    assert body["status"] == response.status_code and body["kind"] and body["error"], body
    assert words.lower() in body["error"].lower(), body
    return body


def jpeg(img: Image.Image) -> bytes:
    return images.encode(img.convert("RGB"), "JPEG", quality=90)


GOOD = jpeg(images.photo((160, 120)))


def classify(client: httpx.Client, data: bytes, name: str = "x.jpg", **fields: str) -> httpx.Response:
    return client.post("/classify", files={"image": (name, data)}, data=fields)


def zipped(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def upload(client: httpx.Client, route: str, data: bytes, name: str = "x.jpg", **fields: str) -> httpx.Response:
    """``data`` in the file field of ``route`` (an archive route gets it zipped as one entry)."""
    if route in ("/batch", "/batch/submit"):
        data, name = zipped({name: data}), "upload.zip"
    return client.post(route, files={UPLOAD_ROUTES[route]: (name, data)}, data=fields)


# --- hostile files ------------------------------------------------------------------------------------


def many_page_tiff(pages: int) -> bytes:
    """A 16x16 grey TIFF of ``pages`` directories sharing one strip (cheap to build, costly to walk)."""
    entries = 8
    ifd_size = 2 + 12 * entries + 4
    strip_at = 8
    first_ifd = strip_at + 256
    out = bytearray(b"II*\x00" + struct.pack("<I", first_ifd) + bytes(range(256)))
    for page in range(pages):
        at = first_ifd + page * ifd_size
        nxt = at + ifd_size if page < pages - 1 else 0
        fields = [(256, 3, 1, 16), (257, 3, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                  (273, 4, 1, strip_at), (278, 3, 1, 16), (279, 4, 1, 256)]
        out += struct.pack("<H", entries)
        for tag, typ, count, value in fields:
            packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, typ, count) + packed
        out += struct.pack("<I", nxt)
    return bytes(out)


def tiff_ifd_loop() -> bytes:
    """A TIFF whose directory names itself as the next one: walking the pages never ends."""
    data = bytearray(many_page_tiff(1))
    first_ifd = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<I", data, len(data) - 4, first_ifd)
    return bytes(data)


def animated(fmt: str, frames: int, **kwargs: object) -> bytes:
    shots = [Image.new("RGB", (32, 32), (255, 0, 0))] + [Image.new("RGB", (32, 32), (0, 0, 255))] * (frames - 1)
    return images.encode(shots[0], fmt, save_all=True, append_images=shots[1:], **kwargs)


def truncated(fmt: str, keep: float) -> bytes:
    data = images.encode(images.photo((120, 90)), fmt)
    return data[: max(16, int(len(data) * keep))]


# --- bodies and fields --------------------------------------------------------------------------------


def test_empty_and_malformed_bodies(server: httpx.Client) -> None:
    multipart = {"content-type": "multipart/form-data; boundary=zz"}
    cases = [
        (server.post("/classify", content=b"", headers=multipart), 400, "multipart"),
        (server.post("/classify", content=b"--zz--\r\n", headers=multipart), 400, "missing file field"),
        (server.post("/classify", content=b"x" * 100, headers={"content-type": "multipart/form-data"}), 400,
         "multipart"),
        (server.post("/classify", content=GOOD, headers={"content-type": "image/jpeg"}), 400, "multipart/form-data"),
        (server.post("/classify", json={"image": "aGVsbG8="}), 400, "multipart/form-data"),
        (server.post("/classify_batch", content=b"", headers=multipart), 400, "multipart"),
        (server.post("/batch/submit", content=b"", headers=multipart), 400, "multipart"),
        (server.post("/classify", files={"Image": ("a.jpg", GOOD)}), 400, "unknown form field"),
        (server.post("/classify", files={"images": ("a.jpg", GOOD)}), 400, "unknown form field"),
        (server.post("/classify_batch", files={"image": ("a.jpg", GOOD)}), 400, "unknown form field"),
        (server.post("/batch/submit", files={"file": ("a.zip", zipped({"a.jpg": GOOD}))}), 400, "unknown form field"),
        (server.post("/classify", files=[("image", ("a.jpg", GOOD)), ("image", ("b.jpg", GOOD))]), 400, "at most 1"),
        (server.post("/classify", files={"image": ("a.jpg", GOOD)}, data={"top_k": "1", "debug": "1"}), 400,
         "unknown form field"),
        (server.post("/classify", files={"image": ("a.jpg", GOOD)}, data={"top_k": ["1", "1000000"]}), 400,
         "more than once"),
        (server.post("/batch/submit", files={"archive": ("a.zip", zipped({"a.jpg": GOOD}))},
                     data={"model": ["imagenet-lite0", "../x"]}), 400, "more than once"),
    ]
    for response, status, words in cases:
        assert_error(response, status, words)


def test_truncated_files_of_every_format(server: httpx.Client) -> None:
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        for keep in (0.3, 0.7, 0.98):
            assert_error(classify(server, truncated(fmt, keep)), 400, fmt)


def test_polyglot_and_html_files_named_jpg(server: httpx.Client) -> None:
    script = b"<script>alert(document.cookie)</script>"
    html = b"<!DOCTYPE html><html><body>" + script + b"</body></html>"
    refused = [
        (b"GIF89a/*" + b"\x00" * 8 + b"*/=1;" + script, 400),  # GIF header that is also JavaScript
        (b"\xff\xd8\xff\xe0" + html, 400),  # JPEG magic, then a page
        (b"\x89PNG\r\n\x1a\n" + html, 400),
        (b"BM" + html, (400, 413)),  # the page's bytes read as a BMP header claim billions of pixels
        (html, 415),
        (b"<?php system($_GET['c']); ?>", 415),
        (b"%PDF-1.4\n" + html, 415),
        (b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>", 415),
        (b"PK\x03\x04" + html, 415),  # zip
        (b"MZ\x90\x00" + bytes(60), 415),  # Windows executable
        (b"\x7fELF\x02\x01\x01" + bytes(64), 415),
    ]
    for data, status in refused:
        for name in ("photo.jpg", "photo.html", "../../index.html"):
            body = assert_error(classify(server, data, name=name), status)
            assert "<script" not in body["error"] and "<?php" not in body["error"]  # nothing reflected
    # A real image carrying a payload (a page in a JPEG comment, a zip appended) is only ever an image:
    # the service classifies its pixels and answers JSON; it never serves the bytes back.
    carrier = GOOD[:2] + b"\xff\xfe" + struct.pack(">H", len(html) + 2) + html + GOOD[2:] + zipped({"x": html})
    response = classify(server, carrier, name="photo.jpg", top_k="1")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert b"<script" not in response.content


BOMBS = {
    "png": lambda: images.png_bomb(100_000, 100_000),
    "jpeg": lambda: images.jpeg_bomb(65_500, 65_500),
    "gif-canvas": lambda: images.gif_bomb(65_535, 65_535),
    "gif-frame": lambda: images.gif_bomb(65_535, 65_535, in_frame=True),
    "tiff": lambda: images.tiff_bomb(100_000, 100_000),
    "webp": lambda: images.webp_bomb(16_383, 16_383),
    "bmp": lambda: images.bmp_bomb(100_000, 100_000),
}


@pytest.mark.parametrize("name", BOMBS)
def test_pixel_bombs_are_413_without_decoding(server: httpx.Client, live: LiveServer, name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < 1024
    with cpu_seconds(live.proc.pid) as cpu:  # the server's work (all its processes), not the wait
        assert_error(classify(server, data), 413, "pixels")
    assert cpu.seconds < 2.0


def test_thousands_of_frames_are_answered_from_the_first_frame_quickly(server: httpx.Client,
                                                                      live: LiveServer) -> None:
    """Valid animations are images: 200 from their first frame, for about the work of one frame."""
    gif, _ = images.many_frame_gif(5000)
    files = {
        "gif-5000-frames": gif,
        "apng-3000-frames": animated("PNG", 3000),
        "webp-3000-frames": animated("WEBP", 3000, lossless=True),
        "tiff-3000-pages": many_page_tiff(3000),
        "tiff-pages-in-a-loop": tiff_ifd_loop(),
    }
    for name, data in files.items():
        with cpu_seconds(live.proc.pid) as cpu:
            response = classify(server, data, name=name, top_k="1")
        assert response.status_code == 200, (name, response.text)
        assert cpu.seconds < 3.0, (name, cpu.seconds)


def test_extreme_shapes(server: httpx.Client, live: LiveServer) -> None:
    def png(w: int, h: int) -> bytes:
        return images.png_bytes(w, h, rows=bytes(w * h))

    for w, h in ((1, 20_000), (7, 7), (7, 1000)):
        assert_error(classify(server, png(w, h)), 400, "at least")
    assert_error(classify(server, images.png_bytes(0, 0, idat=zlib.compress(b""))), 400)
    for w, h in ((8, 8), (65_535, 8), (8, 65_535)):  # thin but legal: resized by the crop window only
        with cpu_seconds(live.proc.pid) as cpu:
            response = classify(server, png(w, h), top_k="1")
        assert response.status_code == 200, ((w, h), response.text)
        assert cpu.seconds < 3.0, ((w, h), cpu.seconds)


# --- bodies over the limits, fast and slow -----------------------------------------------------------------


def _multipart_stream(field: str, chunks: int, chunk: bytes, delay: float, sent: list[int]) -> Iterator[bytes]:
    yield f'--b\r\nContent-Disposition: form-data; name="{field}"; filename="a.bin"\r\n\r\n'.encode()
    for _ in range(chunks):
        sent[0] += 1
        if delay:
            time.sleep(delay)
        yield chunk


@pytest.mark.parametrize(("route", "limit"), [("/classify", MAX_UPLOAD), ("/classify_batch", MAX_REQUEST),
                                              ("/batch/submit", MAX_ARCHIVE)])
def test_bodies_over_the_limit_fast_or_trickling_are_413(server: httpx.Client, route: str, limit: int) -> None:
    field = UPLOAD_ROUTES[route]
    # Fast, with its length declared: refused from the header.
    declared = server.post(route, files={field: ("a.bin", b"\0" * (limit + 100_000))})
    assert_error(declared, 413, "larger than")
    # Streamed without a length (chunked), 64 KiB every 10 ms: refused as soon as it passes the limit.
    chunk, total = b"\xff" * 65536, 4 * limit // 65536
    for delay in (0.0, 0.01):
        sent = [0]
        try:
            response = server.post(route, content=_multipart_stream(field, total, chunk, delay, sent),
                                   headers={"content-type": "multipart/form-data; boundary=b"})
        except httpx.TransportError:  # the server answered and closed while we were still sending
            response = None
        if response is not None:
            assert_error(response, 413, "larger than")
        assert sent[0] < total, (route, delay)  # it stopped reading long before the end
        assert server.get("/readyz").status_code == 200


# --- fields: top_k and model -------------------------------------------------------------------------------

BAD_TOP_K = ["0", "-1", "1000000", "many", "", "1.5", "1e309", "NaN", "[1]", '{"k": 1}', "null",
             "99999999999999999999999", "0x10"]


@pytest.mark.parametrize("route", ["/classify", "/classify_batch", "/batch/submit"])
def test_bad_top_k_on_every_route(server: httpx.Client, route: str) -> None:
    for value in BAD_TOP_K:
        assert_error(upload(server, route, GOOD, top_k=value), 400, "top_k")


HOSTILE_MODELS = {
    # (value, status): 400 for what is not a model reference at all, 404 for a well-formed one not served
    "../../etc/passwd": 400, "..%2f..%2fetc%2fpasswd": 400, "%2e%2e%2f%2e%2e%2f": 400, "..": 400,
    "/etc/passwd": 400, "C:\\Windows\\win.ini": 400, "\\\\server\\share": 400, "~root": 400,
    "file:///etc/passwd": 400, "imagenet-lite0/../../x": 400, "imagenet-lite0:../1": 400,
    "imagenet-lite0:%2e%2e": 400, "imagenet-lite0:0": 400, "imagenet-lite0:-1": 400, "imagenet-lite0:1:2": 400,
    "imagenet-lite0\x00.onnx": 400, "IMAGENET-LITE0": 400, "a" * 5000: 400, " imagenet-lite0": 400,
    "imagenet-lite0:99999999999999999999": 404, "no-such-model": 404, "no-such-model:1": 404,
    "123": 400, "true": 400,  # JSON-looking values: BentoML decodes them to a number and a boolean
}


@pytest.mark.parametrize("route", ["/classify", "/classify_batch", "/batch/submit"])
def test_hostile_model_names_on_every_route(server: httpx.Client, route: str) -> None:
    for value, status in HOSTILE_MODELS.items():
        body = assert_error(upload(server, route, GOOD, model=value), status)
        assert body["kind"] in ("invalid_model", "unknown_model", "invalid_request"), body
        assert len(body["error"]) < 6000


def test_unknown_paths_methods_and_task_ids_get_json_errors(server: httpx.Client) -> None:
    for path in ("/nope", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd", "/static/..%5c..%5cwin.ini",
                 "/" + "a" * 4000):
        assert_error(server.get(path), 404, "no endpoint")
    for path in ("/classify/../../etc/passwd", "/models/../admin/reload"):  # the client removes dot segments
        assert_error(server.get(path), 404)
    for method, path in (("GET", "/classify"), ("PUT", "/classify"), ("DELETE", "/classify_batch"),
                         ("GET", "/batch/submit")):
        assert_error(server.request(method, path), 405, "not allowed")
    for task_id in ("../../etc/passwd", "%00", "' OR 1=1 --", "x" * 10_000, "\u202e\u0000"):
        for path in ("/batch/status", "/batch/get"):
            assert_error(server.get(path, params={"task_id": task_id}), 404, "not found")
        assert_error(server.post("/batch/retry", params={"task_id": task_id}), 404, "not found")
    assert_error(server.get("/batch/status"), 400, "task_id")


def test_upload_file_names_are_never_used(server: httpx.Client, tmp_path: Path) -> None:
    """Names longer than a file system allows were a 500 inside BentoML (it names its temp file after
    them); traversal, absolute and control-character names are inert: formats come from the bytes."""
    target = tmp_path / "pwned.jpg"
    names = ["a" * 300 + ".jpg", "é" * 200 + ".jpg", "../" * 20 + str(target).lstrip("/"), str(target),
             "x\x00y.jpg", "a\r\nContent-Type: text/html.jpg", "C:\\Windows\\system32\\x.jpg", ".", "/"]
    for name in names:
        response = classify(server, GOOD, name=name, top_k="1")
        assert response.status_code == 200, (name, response.text)
        assert response.json()["predictions"][0]["label"] in CATS
    files = [("images", (name, GOOD)) for name in names[:MAX_BATCH]]
    response = server.post("/classify_batch", files=files, data={"top_k": "1"})
    assert response.status_code == 200, response.text
    assert all(r["error"] is None for r in response.json()["results"])
    submitted = server.post("/batch/submit", files={"archive": ("z" * 400 + ".zip", zipped({"a.jpg": GOOD}))})
    assert submitted.status_code == 200, submitted.text
    assert not target.exists()


# --- no server-side fetching ---------------------------------------------------------------------------------


class Listener:
    """A local TCP port that records every connection made to it (it should see none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def test_no_file_field_fetches_a_url(server: httpx.Client, listener: Listener) -> None:
    """BentoML downloads a string in a file field; the guard refuses it on every upload route, whatever the
    body's encoding, and the server never connects anywhere."""
    urls = [f"http://127.0.0.1:{listener.port}/cat.jpg", f"https://127.0.0.1:{listener.port}/a.zip",
            f"  http://localhost:{listener.port}/x  ", f'"http://127.0.0.1:{listener.port}/q"',
            "file:///etc/passwd", "s3://bucket/cat.jpg", "data:image/png;base64,iVBORw0KGgo="]
    for route, field in UPLOAD_ROUTES.items():
        for url in urls:
            assert_error(server.post(route, data={field: url}), 400)  # multipart text field
            assert_error(server.post(route, files={field: (None, url)}), 400, "file upload")
            assert_error(server.post(route, json={field: url}), 400, "multipart/form-data")
            assert_error(server.post(route, content=f"{field}={url}".encode(),
                                     headers={"content-type": "application/x-www-form-urlencoded"}), 400)
        mixed = [(field, ("a.jpg", GOOD)), (field, (None, urls[0]))]
        assert_error(server.post(route, files=mixed), 400)
    time.sleep(0.5)
    assert listener.connections == 0


# --- admin token ----------------------------------------------------------------------------------------------


def test_admin_token_is_only_compared_in_constant_time() -> None:
    """Timing cannot be measured reliably in CI, so read the code: the token meets the request's only in
    hmac.compare_digest, never in ==, != or `in`. (Off by default, 401s and never logged:
    tests/test_reload.py::test_admin_is_off_without_a_token and ::test_token_is_required_and_checked.)"""
    tree = ast.parse((ROOT / "service" / "http" / "admin.py").read_text())

    def mentions_token(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Attribute) and n.attr == "_token" for n in ast.walk(node))

    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and mentions_token(n)]
    unsafe = [ast.unparse(n) for n in compares
              if not all(isinstance(op, (ast.Is, ast.IsNot)) for op in n.ops)]  # `is None` is fine
    assert not unsafe, unsafe
    digests = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "hmac.compare_digest"]
    assert any(mentions_token(n) for n in digests)


# --- fuzzing over HTTP ----------------------------------------------------------------------------------------


def test_mutated_photos_in_batches_fail_only_themselves(server: httpx.Client) -> None:
    """Damaged real photos of every format, eight to a request: each gets predictions or its own 4xx."""
    seeds = list(real_seeds().values())
    statuses: dict[int, int] = {}

    @settings(max_examples=30, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(mutated(seeds), min_size=MAX_BATCH, max_size=MAX_BATCH))
    def batch(files: list[bytes]) -> None:
        response = server.post("/classify_batch", files=[("images", (f"{i}.jpg", d)) for i, d in enumerate(files)],
                               data={"top_k": "1"})
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            status = 200 if result["error"] is None else result["error"]["status"]
            assert status == 200 or 400 <= status < 500, result
            assert (result["predictions"] is None) == (status != 200), result
            if result["error"] is not None:  # the message itself, not a JSON rendering of the error
                assert result["error"]["message"] and not result["error"]["message"].startswith("{"), result
            statuses[status] = statuses.get(status, 0) + 1

    batch()
    assert statuses.get(200) and statuses.get(400), statuses


# --- schemathesis: the service's own OpenAPI schema -----------------------------------------------------------

# Where BentoML 1.4's generated schema is wrong, and the exclusion for each (nothing else is excluded):
# - it documents every API as answering 200, 400, 404 or 500, but the service also answers 413 (upload or
#   image too large) and 415 (not an image) on its upload routes, as docs/serving.md documents: those two codes,
#   on those routes, are not checked against the schema;
# - it documents POST /batch/submit as answering a TaskStatusResponse, whose created_at and executed_at are
#   required, but BentoML answers {"task_id", "status"} only: that response is checked for exactly those;
# - it documents one content type per API, but POST /explain answers image/png when asked (format=png):
#   that content type, on that route, is not checked against the schema.
UNDOCUMENTED_BY_BENTOML = {413, 415}
EXAMPLES_PER_OPERATION = 60


def _image_bodies() -> Callable[[str, dict], dict]:
    """Puts real images into a generated multipart body, so positive cases reach inference too."""
    cat = jpeg(images.photo((96, 72)))
    archive = zipped({"cat.jpg": cat, "coffee.png": images.encode(images.photo((64, 48), which="coffee"), "PNG")})
    v2_cat = base64.b64encode(cat).decode()

    def fill(path: str, body: dict) -> dict:
        if path in ("/classify", "/explain") and "image" in body:
            return {**body, "image": cat}
        if path == "/classify_batch" and "images" in body:
            return {**body, "images": [cat] * max(1, min(len(body["images"]), MAX_BATCH))}
        if path in ("/batch", "/batch/submit") and "archive" in body:
            return {**body, "archive": archive}
        if path.startswith("/v2/models/") and path.endswith("/infer") and "inputs" in body:  # V2, curl-style
            return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [v2_cat],
                                "parameters": {"content_type": "base64"}}]}
        return body

    return fill


def _fuzz_operation(
    op: Any, mode: Any, base_url: str, checks: list, fill: Callable[[str, dict], dict], statuses: Counter
) -> list[str]:
    """Run EXAMPLES_PER_OPERATION schemathesis cases against one operation; the failures, described.

    ``statuses`` counts (operation, status) answered.
    """
    from schemathesis import GenerationMode

    failures: list[str] = []

    @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), real_image=st.booleans())
    def run(case: Any, real_image: bool) -> None:
        if real_image and mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body = fill(case.path, case.body)
        response = case.call(base_url=base_url, timeout=60)
        statuses[op.label, response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except (AssertionError, BaseExceptionGroup) as exc:  # a Failure, or a FailureGroup of them
            failures.append(f"{mode.value} {op.label}: {str(exc)[:1500]}")

    run()
    return failures


@pytest.mark.timeout(600)
def test_openapi_schema_fuzzing(live: LiveServer, server: httpx.Client) -> None:
    """Every operation of /docs.json, positive and negative cases: no 5xx, documented status codes and
    content types, and bodies that match the response schemas."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    def documented_status(ctx: Any, response: Any, case: Any) -> bool | None:
        if response.status_code in UNDOCUMENTED_BY_BENTOML and case.path in UPLOAD_ROUTES:
            return None
        return status_code_conformance(ctx, response, case)

    def documented_content_type(ctx: Any, response: Any, case: Any) -> bool | None:
        kind = response.headers.get("content-type") or response.headers.get("Content-Type") or ""
        kind = kind[0] if isinstance(kind, list) and kind else kind
        if case.path == "/explain" and str(kind).startswith("image/png"):
            return None  # format=png: BentoML documents one content type per API (JSON here)
        return content_type_conformance(ctx, response, case)

    def documented_body(ctx: Any, response: Any, case: Any) -> bool | None:
        if (case.method, case.path, response.status_code) == ("POST", "/batch/submit", 200):
            body = response.json()
            assert set(body) == {"task_id", "status"} and body["status"] == "in_progress", body
            return True
        return response_schema_conformance(ctx, response, case)

    schema = schemathesis.openapi.from_url(f"{live.url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /classify", "POST /classify_batch", "POST /batch/submit", "GET /batch/status"} <= labels
    fill = _image_bodies()
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        checks = [not_a_server_error, documented_status, documented_content_type, documented_body]
        if mode == GenerationMode.NEGATIVE:
            checks.append(negative_data_rejection)
        for op in operations:
            if mode == GenerationMode.NEGATIVE and not (len(op.body) or any(True for _ in op.iter_parameters())):
                continue  # nothing to make invalid (health and metrics endpoints)
            failures += _fuzz_operation(op, mode, live.url, checks, fill, statuses)
    assert not failures, "\n\n".join(failures[:10])
    for label in ("POST /classify", "POST /classify_batch", "POST /batch/submit"):  # inference was reached
        assert statuses[label, 200] > 0, statuses
    assert {"POST /v2/models/{model_name}/infer", "GET /v2/models/{model_name}/versions/{model_version}"} <= labels
    assert statuses["POST /v2/models/{model_name}/infer", 200] > 0, statuses  # V2 inference too
    assert sum(statuses.values()) > 10 * EXAMPLES_PER_OPERATION, statuses
