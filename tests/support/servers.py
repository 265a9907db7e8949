"""What the server tests share: private repository copies, `imgclf serve` subprocesses, their requests.

Every scenario uses the session's bootstrapped ``imagenet-lite0`` repository (the ``imagenet_repo``
fixture), copied before it is changed, and a real server started with ``serve``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from imgclf.devserver import LiveServer, running_server
from service.repository import MODEL_FILE, ModelRepository, copy_writer

from . import images

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

NAME = "imagenet-lite0"
TOKEN = "test-admin-token-3f9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# What RSS may grow by across reloads before a test calls it a leak. A retired lite0 session that stayed
# alive holds about 335 MB (its weights and the arena of the warm-up at batch 1, 8 and 32, measured with
# three sessions kept in one process), so one leaked session in any number of reloads is over the limit,
# and so is a leak of the weights alone (18 MB) at every one of test_reload's twenty reloads,
# while glibc's arenas still settle by tens of MB over the first reloads (+68 MB after three under two CPU
# hogs; +58 MB over twenty after four warm-up reloads in a quiet CI run; benchmarks/NOTES.md).
RELOAD_GROWTH_LIMIT_MB = 150


@dataclass
class V2Server:
    """A live server with IMGCLF_GRPC_PORT, and Triton's clients for both of its V2 front doors."""

    live: LiveServer
    grpc_url: str
    repo: ModelRepository | None = None

    @property
    def http(self) -> httpclient.InferenceServerClient:
        import tritonclient.http as httpclient  # grpc and protobuf load only for the tests that use them

        return httpclient.InferenceServerClient(self.live.url.removeprefix("http://"), network_timeout=120)

    @property
    def grpc(self) -> grpcclient.InferenceServerClient:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)


def copy_repo(source: Path, target: Path) -> ModelRepository:
    """A private copy of the session's bootstrapped repository (never mutate the shared one)."""
    shutil.copytree(source, target)
    return ModelRepository(target)


def add_copy(repo: ModelRepository, source: int = 1) -> int:
    """A new version with the same weights: a cheap stand-in for a retrained model."""
    return repo.add_version(NAME, copy_writer(repo.get(NAME, source).path)).manifest.version


def add_model(root: Path, name: str, label_prefix: str = "") -> None:
    """A second model: the version folder copied under ``name``, its manifest renamed (labels prefixed)."""
    shutil.copytree(root / NAME, root / name)
    path = root / name / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["name"] = name
    manifest["labels"] = [label_prefix + label for label in manifest["labels"]]
    path.write_text(json.dumps(manifest, indent=2))


def corrupt(repo: ModelRepository, version: int) -> None:
    """Flip 64 bytes in the middle of a version's model file: its sha256 no longer matches."""
    path = repo.root / NAME / str(version) / MODEL_FILE
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@contextmanager
def serve(repo: Path, home: Path, **env: str) -> Iterator[LiveServer]:
    """`imgclf serve` on ``repo`` with ``env`` added; the 60 s client timeout only catches hangs.

    One worker unless ``env`` says otherwise: these scenarios follow one worker's reloads and state.
    """
    with running_server(repo, home, {"IMGCLF_MAX_BATCH_SIZE": "8", "IMGCLF_WORKERS": "1", **env},  # quick reloads
                        client_timeout_s=60) as live:
        yield live


def jpeg_photo(size: tuple[int, int] = (96, 72), quality: int = 90) -> bytes:
    """A real photo of a cat as JPEG bytes."""
    return images.encode(images.photo(size).convert("RGB"), "JPEG", quality=quality)


IMAGE = jpeg_photo()


def classify(client: httpx.Client) -> httpx.Response:
    return client.post("/classify", files={"image": ("cat.jpg", IMAGE)}, data={"top_k": "1"})


def served_version(client: httpx.Client) -> int:
    response = classify(client)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def reload(client: httpx.Client) -> httpx.Response:
    return client.post("/admin/reload", headers=AUTH)


def switch_to(server: LiveServer, repo: ModelRepository, version: int) -> dict:
    """Promote ``version`` and reload: the server must answer that it now serves it."""
    repo.promote(NAME, version)
    response = reload(server.client)
    assert response.status_code == 200, response.text
    assert response.json()["models"] == [{"name": NAME, "version": version}]
    return response.json()
