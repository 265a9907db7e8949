"""The model repository: atomic versions, verification, names, aliases (serving side, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.manifest import ExportProvenance, InputSpec, Manifest, OutputSpec
from service.preprocessing import PreprocessSpec
from service.repository import (
    ModelNotFoundError,
    ModelRef,
    ModelRepository,
    RepositoryError,
    VerificationError,
)
from tests.support import ROOT
from tests.support.cli import imgclf


def tiny_onnx(path: Path) -> None:
    """A real (if trivial) ONNX classifier: global average pool + flatten over 2 channels."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "tiny", [x], [y],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def writer(name: str):
    def write(staging: Path, version: int) -> Manifest:
        tiny_onnx(staging / "model.onnx")
        (staging / "labels.txt").write_text("a\nb\n")
        return Manifest(
            name=name, version=version, created_at=datetime.now(UTC), architecture="tiny", labels=["a", "b"],
            input=InputSpec(shape=["batch", 2, 8, 8]), output=OutputSpec(shape=["batch", 2]),
            preprocessing=PreprocessSpec(input_size=(8, 8), resize_size=8, mean=(0.5,) * 3, std=(0.5,) * 3),
            export=ExportProvenance(exporter="dynamo", opset=18, versions={}), files={},
        )

    return write


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def test_versions_grow_and_verify(repo: ModelRepository) -> None:
    first = repo.add_version("tiny", writer("tiny"))
    second = repo.add_version("tiny", writer("tiny"))
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert repo.versions("tiny") == [1, 2]
    files = second.manifest.files
    assert set(files) == {"model.onnx", "labels.txt"} and files["model.onnx"].size > 0
    assert repo.get("tiny", 2).manifest == second.manifest


def test_versions_never_reuse_a_number(repo: ModelRepository) -> None:
    import shutil

    repo.add_version("tiny", writer("tiny"))
    repo.add_version("tiny", writer("tiny"))
    shutil.rmtree(repo.root / "tiny" / "2")
    assert repo.add_version("tiny", writer("tiny")).manifest.version == 3


def test_failure_while_writing_leaves_nothing(repo: ModelRepository) -> None:
    def broken(staging: Path, version: int) -> Manifest:
        (staging / "model.onnx").write_bytes(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        repo.add_version("tiny", broken)
    assert repo.versions("tiny") == []
    assert not list((repo.root / "tiny").glob(".staging-*"))


def test_killed_mid_write_leaves_no_loadable_version(repo: ModelRepository) -> None:
    """A real SIGKILL in the middle of writing a version."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from service.repository import ModelRepository\n"
        "def write(staging, version):\n"
        "    (staging / 'model.onnx').write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ModelRepository(sys.argv[1]).add_version('tiny', write)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(repo.root)], cwd=ROOT, check=False)
    assert result.returncode == -9
    assert repo.versions("tiny") == []
    with pytest.raises(ModelNotFoundError):
        repo.get("tiny")
    assert repo.add_version("tiny", writer("tiny")).manifest.version == 1  # stale staging cleaned up
    assert not list((repo.root / "tiny").glob(".staging-*"))


def test_tampered_file_is_refused(repo: ModelRepository) -> None:
    version = repo.add_version("tiny", writer("tiny"))
    model = version.path / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.onnx does not match its sha256"):
        repo.get("tiny", 1)


def test_manifest_with_wrong_schema_is_refused(repo: ModelRepository) -> None:
    version = repo.add_version("tiny", writer("tiny"))
    manifest = json.loads((version.path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (version.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match="schema"):
        repo.get("tiny", 1)


@pytest.mark.parametrize(
    "text",
    ["../etc", "a/b", "/abs/path", "..", "%2e%2e", "Upper", "x" * 80, "tiny:../1", "tiny:-1", "tiny:0", "tiny:1.5",
     "tiny:١", "", "tiny:", "a\\b", "a\x00b"],
)
def test_traversal_and_bad_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid model"):
        ModelRef.parse(text)


def test_repository_methods_validate_names(repo: ModelRepository) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        repo.versions("../../etc")
    with pytest.raises(ValueError, match="invalid model name"):
        repo.add_version("../evil", writer("evil"))


def test_promote_and_rollback(repo: ModelRepository) -> None:
    for _ in range(2):
        repo.add_version("tiny", writer("tiny"))
    with pytest.raises(ModelNotFoundError, match="no production version"):
        repo.get("tiny")
    assert repo.promote("tiny", 1) == {"production": 1}
    assert repo.promote("tiny", 2) == {"production": 2, "previous": 1}
    assert repo.get("tiny").manifest.version == 2
    assert repo.rollback("tiny") == {"production": 1, "previous": 2}
    assert repo.get("tiny").manifest.version == 1
    with pytest.raises(ModelNotFoundError, match="no version 7"):
        repo.promote("tiny", 7)


def test_demote_undoes_a_first_promotion(repo: ModelRepository) -> None:
    repo.add_version("tiny", writer("tiny"))
    repo.promote("tiny", 1)
    assert repo.demote("tiny") == {}
    with pytest.raises(ModelNotFoundError, match="no production version"):
        repo.get("tiny")
    assert repo.versions("tiny") == [1]  # the version itself stays, only the alias goes


def test_rollback_without_previous(repo: ModelRepository) -> None:
    repo.add_version("tiny", writer("tiny"))
    repo.promote("tiny", 1)
    with pytest.raises(RepositoryError, match="no previous version"):
        repo.rollback("tiny")


def test_cannot_promote_a_tampered_version(repo: ModelRepository) -> None:
    version = repo.add_version("tiny", writer("tiny"))
    (version.path / "labels.txt").write_text("x\ny\n")
    with pytest.raises(VerificationError):
        repo.promote("tiny", 1)
    assert repo.aliases("tiny") == {}


def test_models_cli_without_torch(repo: ModelRepository) -> None:
    repo.add_version("tiny", writer("tiny"))
    repo.add_version("tiny", writer("tiny"))
    root = str(repo.root)
    assert imgclf("models", "promote", "tiny", "2", "--repo", root, without_train=True).returncode == 0
    listed = imgclf("models", "list", "--repo", root, without_train=True)
    assert listed.returncode == 0 and "tiny: 1, 2 (production)" in listed.stdout
    shown = imgclf("models", "show", "tiny", "--repo", root, without_train=True)
    assert json.loads(shown.stdout)["version"] == 2
    assert imgclf("models", "verify", "tiny:1", "--repo", root, without_train=True).returncode == 0
    (repo.root / "tiny" / "1" / "model.onnx").write_bytes(b"tampered")
    failed = imgclf("models", "verify", "tiny:1", "--repo", root, without_train=True)
    assert failed.returncode == 1 and "sha256" in failed.stderr
    bad = imgclf("models", "show", "../../etc", "--repo", root, without_train=True)
    assert bad.returncode == 2 and "invalid model name" in bad.stderr
    assert imgclf("models", "rollback", "tiny", "--repo", root, without_train=True).returncode == 2
