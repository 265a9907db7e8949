"""Which file a server runs: a version's int8 variant on CPUs where export preferred it, fp32 when told.

The int8 file here is ONNX Runtime's real quantization of the bootstrapped Lite0 (the export's own
gate is tested in test_export); what is tested is the choice, what /models and V2 metadata say about
it, and that the answers are the int8 file's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.answer import answer
from service.manifest import Manifest, Variant
from service.precision import preferred_variant, served_file
from service.preprocessing import image_to_tensor
from service.repository import MANIFEST, MODEL_FILE, ModelRepository, VerificationError
from service.runtime import create_session, run_logits
from tests.support import images
from tests.support.edge import calls, edge_for
from tests.support.servers import NAME, copy_repo
from training.export.variants import quantize_int8

INT8 = "model.int8.onnx"


def _variant(**fields: object) -> Variant:
    recipe = {"weight_bits": 8, "checked_with_vnni": False}
    return Variant(**{"precision": "int8", "file": INT8, "preferred_on_cpu": True, "decision": "passed",
                      "quantization": recipe, **fields})


@pytest.fixture(scope="module")
def int8_repo(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """imagenet-lite0 version 2: version 1's files plus a real int8 file, preferred on CPUs."""
    repo = copy_repo(imagenet_repo, tmp_path_factory.mktemp("int8") / "models")
    source = repo.get(NAME, 1)
    photos = [images.encode(images.photo((320, 240), which), "JPEG") for which in ("chelsea", "coffee")]
    calibration = np.stack([image_to_tensor(p, source.manifest.preprocessing) for p in photos])

    def write(staging: Path, version: int) -> Manifest:
        for file in source.path.iterdir():
            if file.is_file() and file.name != MANIFEST:
                shutil.copyfile(file, staging / file.name)
        recipe = quantize_int8(source.model_path, staging / INT8, calibration)
        variant = _variant(quantization=recipe | {"checked_with_vnni": False})
        return source.manifest.model_copy(update={"version": version, "files": {}, "variants": [variant]})

    repo.add_version(NAME, write)
    return repo


def _served(edge: object) -> dict:
    (models, metadata) = calls(edge, ("/models", {"method": "GET"}), (f"/v2/models/{NAME}", {"method": "GET"}))
    assert models.status_code == 200 and metadata.status_code == 200, (models.text, metadata.text)
    (info,) = models.json()["models"]
    return {"models": info["precision"], "v2": metadata.json()["parameters"]["precision"]}


def test_cpus_serve_the_preferred_int8_variant_and_its_answers(int8_repo: ModelRepository) -> None:
    edge = edge_for(int8_repo.root, models=[f"{NAME}:2"], device="cpu")
    assert _served(edge) == {"models": "int8", "v2": "int8"}
    photo = images.encode(images.photo((300, 200), "astronaut"), "JPEG")
    (response,) = calls(edge, ("/classify", {"files": {"image": ("a.jpg", photo)}, "data": {"top_k": "5"}}))
    assert response.status_code == 200, response.text
    version = int8_repo.get(NAME, 2)
    tensor = image_to_tensor(photo, version.manifest.preprocessing)[None]
    scores = {file: [p.score for p in answer(run_logits(create_session(version.path / file), tensor)[0],
                                             version.manifest.served_as(version.manifest.variants[0]), 5).predictions]
              for file in (INT8, MODEL_FILE)}
    assert scores[INT8] != scores[MODEL_FILE]  # so the comparison below tells the files apart
    assert [p["score"] for p in response.json()["predictions"]] == scores[INT8]


def test_imgclf_precision_fp32_forces_the_fp32_file(int8_repo: ModelRepository) -> None:
    edge = edge_for(int8_repo.root, models=[f"{NAME}:2"], device="cpu", precision="fp32")
    assert _served(edge) == {"models": "fp32", "v2": "fp32"}


def test_the_choice_follows_the_check_and_the_cpu(int8_repo: ModelRepository,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = int8_repo.get(NAME, 2).manifest
    with_variant = lambda variant: manifest.model_copy(update={"variants": [variant]})
    assert preferred_variant(with_variant(_variant()), "cpu") is not None
    assert preferred_variant(with_variant(_variant(preferred_on_cpu=False)), "cpu") is None
    assert preferred_variant(with_variant(_variant()), "cpu", "fp32") is None
    assert preferred_variant(int8_repo.get(NAME, 1).manifest, "cpu") is None  # no variant at all
    # 8-bit weights checked only with VNNI: not on a CPU without it; 7-bit ones anywhere.
    checked_on_vnni = _variant(quantization={"weight_bits": 8, "checked_with_vnni": True})
    monkeypatch.setattr("service.precision.cpu_has_vnni", lambda: False)
    assert preferred_variant(with_variant(checked_on_vnni), "cpu") is None
    assert preferred_variant(with_variant(_variant(quantization={"weight_bits": 7, "checked_with_vnni": True})),
                             "cpu") is not None
    monkeypatch.setattr("service.precision.cpu_has_vnni", lambda: True)
    assert preferred_variant(with_variant(checked_on_vnni), "cpu") is not None
    path, served = served_file(int8_repo.get(NAME, 2), "cpu")
    assert path.name == INT8 and served.export.precision == "int8" and served.version == 2


def test_a_variant_file_is_verified_like_the_model(int8_repo: ModelRepository, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    shutil.copytree(int8_repo.root / NAME, repo.root / NAME)
    folder = repo.root / NAME / "2"
    data = bytearray((folder / INT8).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / INT8).write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.int8.onnx does not match its sha256"):
        repo.get(NAME, 2)
    manifest = Manifest.model_validate_json((folder / MANIFEST).read_text())
    unlisted = manifest.model_copy(update={"files": {k: v for k, v in manifest.files.items() if k != INT8}})
    (folder / MANIFEST).write_text(unlisted.model_dump_json())
    with pytest.raises(VerificationError, match="does not list model.int8.onnx"):
        repo.get(NAME, 2)


def test_a_version_without_variants_is_written_as_before(int8_repo: ModelRepository) -> None:
    """Servers older than variants refuse unknown manifest fields: only versions that have one say so."""
    written = {v: json.loads((int8_repo.root / NAME / str(v) / MANIFEST).read_text()) for v in (1, 2)}
    assert "variants" not in written[1] and written[2]["variants"][0]["file"] == INT8
