"""Seeing drift while serving: the PSI window against the validation reference, and the answer metrics.

A live server (one worker, IMGCLF_DRIFT_WINDOW=100, IMGCLF_METRICS_MAX_LABELS=3) serves copies of the
same digits model under several names, so each stream has a window of its own: one drawn like the
validation split (ok), one of a single class and one of inverted digits (drift), one that has not
filled its window yet (not_enough_data), and one whose manifest has no reference (no_reference).
"""

from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from imgclf.devserver import LiveServer
from service.drift import DriftReference, Window, build_reference, psi, score_edges
from service.preprocessing import image_to_tensor
from service.repository import ModelRepository
from service.runtime import OnnxModel
from tests.support.servers import serve
from tests.support.trust import NAME, DigitsModel, copy_repo, digits_model, metric

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

WINDOW = 100
MAX_LABELS = 3
STREAMS = ("digits-like", "digits-one", "digits-inverted", "digits-half", "digits-noref")


# --- the index and the window ---------------------------------------------------------------------


def test_psi_is_zero_for_the_reference_itself_and_grows_with_the_shift() -> None:
    expected = np.array([0.1] * 10)
    assert psi(expected, np.full(10, 50), 500) == pytest.approx(0.0, abs=1e-12)
    mild, strong = np.array([60, 40] + [50] * 8), np.array([500] + [0] * 9)
    assert 0 < psi(expected, mild, 500) < 0.05
    assert psi(expected, strong, 500) > 1
    assert np.isfinite(psi(np.array([1.0, 0.0]), np.array([0, 100]), 100))  # empty bins stay finite


def test_score_bins_are_validation_quantiles_and_saturated_scores_share_one() -> None:
    scores = np.r_[np.linspace(0.5, 0.99, 60), np.ones(40)]
    edges = score_edges(scores)
    assert edges == sorted(set(edges)) and edges[-1] == 1.0  # 1.0 is the lower edge of its own bin
    ref = build_reference(np.arange(100) % 4, scores, ["a", "b", "c", "d"], np.arange(100) % 4)
    assert ref.score_frequencies[-1] == pytest.approx(0.4) and sum(ref.score_frequencies) == pytest.approx(1)
    assert ref.class_frequencies == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}


def test_window_rolls_and_says_not_enough_data_until_full() -> None:
    labels = ["a", "b"]
    ref = DriftReference(num_images=100, class_frequencies={"a": 0.5, "b": 0.5}, score_edges=[0.9],
                         score_frequencies=[0.5, 0.5])
    window = Window(ref, labels, size=20)
    for i in range(19):
        window.add(i % 2, 0.5 if i % 4 < 2 else 0.95)
    assert window.status(0.25, 0.25).verdict == "not_enough_data"
    window.add(1, 0.95)
    assert window.status(0.25, 0.25).verdict == "ok"
    for _ in range(20):  # the old answers roll out: only class a, low scores now
        window.add(0, 0.5)
    status = window.status(0.25, 0.25)
    assert (status.window, status.verdict) == (20, "drift") and status.class_psi > 1 and status.score_psi > 1
    assert Window(None, labels, 20).status(0.25, 0.25).verdict == "no_reference"


# --- a live server -----------------------------------------------------------------------------------


@dataclass
class Live:
    server: LiveServer
    model: OnnxModel  # the digits model, run here to know what the server must have answered
    validation: list[bytes]
    training: list[tuple[bytes, str]]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    digits: DigitsModel = digits_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("drift_server")
    repo = copy_repo(digits, root / "models", extra_names=STREAMS, manifest_update={"digits-noref": {"reference": None}})
    version = ModelRepository(repo.root).get(NAME)
    model = OnnxModel.load(version.model_path, version.manifest)
    with serve(repo.root, root, IMGCLF_DRIFT_WINDOW=str(WINDOW), IMGCLF_METRICS_MAX_LABELS=str(MAX_LABELS)) as server:
        yield Live(server, model, [d for d, _ in digits.validation_images()], digits.training_images())


def _send(client: httpx.Client, model: str, images: list[bytes]) -> None:
    for start in range(0, len(images), 25):
        files = [("images", (f"{i}.png", d)) for i, d in enumerate(images[start:start + 25])]
        response = client.post("/classify_batch", files=files, data={"model": model, "top_k": "1"})
        assert response.status_code == 200, response.text
        assert all(r["predictions"] for r in response.json()["results"])


def _drift(client: httpx.Client, model: str) -> dict:
    return next(m["drift"] for m in client.get("/models").json()["models"] if m["name"] == model)


def _inverted(data: bytes) -> bytes:
    out = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).save(out, "PNG")
    return out.getvalue()


def test_drift_verdicts_for_each_stream(live: Live) -> None:
    client = live.server.client
    rng = random.Random(0)
    assert _drift(client, "digits-like") == {"window": 0, "size": WINDOW, "class_psi": None, "score_psi": None,
                                             "verdict": "not_enough_data"}
    _send(client, "digits-like", rng.sample(live.validation, WINDOW))
    like = _drift(client, "digits-like")
    assert (like["window"], like["verdict"]) == (WINDOW, "ok"), like
    threes = [d for d, label in live.training if label == "3"]
    _send(client, "digits-one", threes[:WINDOW])
    one = _drift(client, "digits-one")
    assert one["verdict"] == "drift" and one["class_psi"] > 1, one
    _send(client, "digits-inverted", [_inverted(d) for d in rng.sample(live.validation, WINDOW)])
    inverted = _drift(client, "digits-inverted")
    assert inverted["verdict"] == "drift" and inverted["score_psi"] > 0.25, inverted
    _send(client, "digits-half", threes[:WINDOW // 2])
    half = _drift(client, "digits-half")
    assert (half["window"], half["verdict"]) == (WINDOW // 2, "not_enough_data") and half["class_psi"] > 1, half
    _send(client, "digits-noref", live.validation[:10])
    assert _drift(client, "digits-noref")["verdict"] == "no_reference"
    text = client.get("/metrics").text
    assert metric(text, "imgclf_drift_index", model="digits-one:1", kind="class") == pytest.approx(
        one["class_psi"], rel=1e-6)
    assert metric(text, "imgclf_drift_index", model="digits-inverted:1", kind="score") == pytest.approx(
        inverted["score_psi"], rel=1e-6)
    assert "imgclf_drift_index{" not in "".join(line for line in text.splitlines() if "digits-noref" in line)


def test_answer_metrics_count_known_traffic(live: Live) -> None:
    client = live.server.client
    images = live.validation[:40] + [_inverted(d) for d in live.validation[40:60]]
    probs = live.model.probabilities(np.stack([image_to_tensor(d, live.model.manifest.preprocessing) for d in images]))
    labels = [live.model.manifest.labels[i] for i in probs.argmax(1)]
    scores = probs.max(1)
    threshold = live.model.manifest.selective.threshold
    for data in images:  # one by one: the order decides which labels get their own series
        response = client.post("/classify", files={"image": ("d.png", data)}, data={"model": "digits", "top_k": "1"})
        assert response.status_code == 200, response.text
    text = client.get("/metrics").text
    series = dict.fromkeys(labels)  # first come, first served
    own = list(series)[:MAX_LABELS]
    counts = Counter(label if label in own else "other" for label in labels)
    for label, n in counts.items():
        assert metric(text, "imgclf_predictions_total", model="digits:1", label=label) == n, label
    assert metric(text, "imgclf_predictions_total", model="digits:1") == len(images)
    assert metric(text, "imgclf_top1_score_count", model="digits:1") == len(images)
    assert metric(text, "imgclf_top1_score_sum", model="digits:1") == pytest.approx(float(scores.sum()), rel=1e-5)
    assert metric(text, "imgclf_not_confident_total", model="digits:1") == int((scores < threshold).sum())
    assert int((scores < threshold).sum()) > 0  # the inverted digits are among them
