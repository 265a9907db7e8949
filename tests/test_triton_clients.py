"""Triton's own example clients, unmodified (tests/triton_examples/), against a real `imgclf serve`.

Each runs as a subprocess, as a user coming from Triton would run it, and must print a cat class for
scikit-image's chelsea photo and espresso for coffee. They name a model's one-input views:
``<model>.pixels`` (one FP32 NCHW input; the clients resize and scale the photo themselves) and
``<model>.image`` (one BYTES input of encoded files, as Triton's DALI ensembles take).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgclf.devserver import free_port
from tests.support import ROOT
from tests.support.servers import NAME, serve
from training.sample_images import real_photos

pytestmark = pytest.mark.slow  # a server and client subprocesses: not in `make test-quick`

EXAMPLES = ROOT / "tests" / "triton_examples"
CATS = {"tabby", "tiger cat", "Egyptian cat", "lynx", "Persian cat", "Siamese cat"}
LINE = re.compile(r"^\s+(?P<score>[-\d.e]+) \((?P<index>\d+)\) = (?P<label>.+)$")


@dataclass(frozen=True)
class Ports:
    http: str
    grpc: str


@pytest.fixture(scope="module")
def server(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    port = free_port()
    env = {"IMGCLF_WORKERS": "1", "IMGCLF_GRPC_PORT": str(port), "IMGCLF_GRPC_HOST": "127.0.0.1"}
    with serve(imagenet_repo, tmp_path_factory.mktemp("triton-clients"), **env) as live:
        yield Ports(live.url.removeprefix("http://"), f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee"):
        out[name] = folder / f"{name}.jpg"
        out[name].write_bytes(real_photos()[name])
    return out


def run(client: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / client), *args], capture_output=True, text=True,
                            timeout=180, check=False, cwd=EXAMPLES)
    assert result.returncode == 0, f"{client} {' '.join(args)}:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def top_labels(output: str) -> list[str]:
    """The first printed class of each image, in order."""
    labels, fresh = [], True
    for line in output.splitlines():
        match = LINE.match(line)
        if match and fresh:
            labels.append(match["label"])
        fresh = match is None
    return labels


@pytest.mark.parametrize("how", ["http", "grpc", "grpc-streaming"])
def test_image_client(server: Ports, photos: dict[str, Path], how: str) -> None:
    url = server.http if how == "http" else server.grpc
    extra = [] if how == "http" else ["-i", "grpc", *(["--streaming"] if "streaming" in how else [])]
    for photo, expected in (("chelsea", CATS), ("coffee", {"espresso"})):
        output = run("image_client.py", "-m", f"{NAME}.pixels", "-s", "INCEPTION", "-c", "3", "-u", url, *extra,
                     str(photos[photo]))
        assert "PASS" in output and len(top_labels(output)) == 1 and top_labels(output)[0] in expected, output
        assert sum(1 for line in output.splitlines() if LINE.match(line)) == 3, output  # -c 3: three classes


@pytest.mark.parametrize("streaming", [False, True])
def test_grpc_image_client(server: Ports, photos: dict[str, Path], streaming: bool) -> None:
    for photo, expected in (("chelsea", CATS), ("coffee", {"espresso"})):
        output = run("grpc_image_client.py", "-m", f"{NAME}.pixels", "-s", "INCEPTION", "-c", "2", "-u", server.grpc,
                     *(["--streaming"] if streaming else []), str(photos[photo]))
        assert "PASS" in output and top_labels(output)[0] in expected, output


@pytest.mark.parametrize("protocol", ["HTTP", "gRPC"])
def test_ensemble_image_client_sends_encoded_files(server: Ports, photos: dict[str, Path], protocol: str) -> None:
    url = server.http if protocol == "HTTP" else server.grpc
    output = run("ensemble_image_client.py", "-m", f"{NAME}.image", "-c", "3", "-i", protocol, "-u", url,
                 str(photos["chelsea"].parent))  # a folder: both photos in one batch, in name order
    chelsea, coffee = top_labels(output)
    assert chelsea in CATS and coffee == "espresso", output
