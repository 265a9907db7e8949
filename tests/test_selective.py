"""Knowing when not to trust an answer: the threshold chosen at export holds on held-out data, and every
front door says whether an answer clears it (``confident``), honours ``min_score`` and abstains under
IMGCLF_ABSTAIN=1; the bootstrap ImageNet model has no validation set and answers ``confident: null``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imgclf.devserver import LiveServer
from service.batch.rows import csv_header, encode_rows
from service.batch.scoring import Scorer
from service.preprocessing import DecodeLimits, image_to_tensor
from service.repository import ModelRepository
from service.runtime import OnnxModel
from service.selective import (
    UNREACHABLE,
    choose_threshold,
    judge,
    measured_at,
    parse_min_score,
    wilson_lower,
)
from tests.support.servers import serve
from tests.support.trust import NAME, TARGET, DigitsModel, copy_repo, digits_model
from training.data import Sample
from training.pipeline.metrics import holdout_metrics

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

IMAGENET = "imagenet-lite0"


# --- the rule ------------------------------------------------------------------------------------------


def test_threshold_reaches_the_target_with_its_lower_bound_and_maximal_coverage() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.2, 1.0, 5000)
    correct = rng.uniform(0, 1, 5000) < scores ** 0.3  # higher scores are right more often
    selective, curve = choose_threshold(scores, correct, 0.95)
    assert selective.reached and selective.precision_lower_bound >= 0.95
    accepted = scores >= selective.threshold
    assert selective.coverage == pytest.approx(accepted.mean())
    assert selective.precision == pytest.approx(correct[accepted].mean())
    assert selective.precision_lower_bound < selective.precision  # the bound asks for more than the sample shows
    z = 1.6448536269514722  # one-sided 95%
    k = np.arange(1, len(scores) + 1)
    hits = np.cumsum(correct[np.argsort(-scores, kind="stable")])
    deeper = k > accepted.sum()  # every lower threshold accepts more and breaks the bound
    assert np.all(wilson_lower(hits[deeper], k[deeper], z) < 0.95)
    assert curve.coverage[-1] == 1.0 and np.all(np.diff(curve.coverage) > 0)


def test_ties_go_together_and_unreachable_targets_mark_nothing_confident() -> None:
    scores = np.array([1.0] * 400 + [0.5] * 100)
    correct = np.array([True] * 400 + [False] * 100)
    selective, _ = choose_threshold(scores, correct, 0.99)
    assert selective.threshold == 1.0 and selective.coverage == 0.8
    few, _ = choose_threshold(np.array([0.9, 0.8]), np.array([True, True]), 0.99)
    assert not few.reached and few.threshold == UNREACHABLE > 1.0 and few.coverage == 0.0
    assert "268 confident answers" in few.note
    assert judge(1.0, few).confident is False
    empty, _ = choose_threshold(np.array([]), np.array([], dtype=bool))
    assert empty.threshold is None and judge(0.9, empty).confident is None


def test_judge_min_score_and_abstention() -> None:
    selective, _ = choose_threshold(np.linspace(0, 1, 1000), np.linspace(0, 1, 1000) > 0.5, 0.9)
    assert 0.3 < selective.threshold < 0.5
    t = selective.threshold
    assert judge(t, selective).confident is True and judge(t - 1e-9, selective).confident is False
    assert judge(0.1, selective, min_score=0.05).confident is True  # the request's threshold wins
    assert judge(0.1, selective, abstain=True).abstained and not judge(0.99, selective, abstain=True).abstained
    assert judge(0.1, None, abstain=True) == judge(0.1, None)  # no threshold: never abstains
    assert parse_min_score(0.5) == 0.5 and parse_min_score(None) is None and parse_min_score(1) == 1.0
    assert parse_min_score("0.5", text=True) == 0.5  # over gRPC a number travels as a string
    for bad in ("high", "0.5", "", 1.5, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match="min_score"):
            parse_min_score(bad)


# --- a trained digits model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    return digits_model(tmp_path_factory)


def _probabilities(model: OnnxModel, images: list[bytes]) -> np.ndarray:
    return model.probabilities(np.stack([image_to_tensor(d, model.manifest.preprocessing) for d in images]))


def test_threshold_reaches_the_target_precision_on_held_out_data(digits: DigitsModel) -> None:
    version = ModelRepository(digits.repo).get(NAME)
    m = version.manifest
    s = m.selective
    assert s is not None and s.reached and s.target_precision == TARGET and s.split == "val"
    assert s.precision_lower_bound >= TARGET and 0.5 < s.coverage <= 1.0 and s.num_images == m.metrics.num_images
    model = OnnxModel.load(version.model_path, m)
    images = digits.holdout_images()
    probs = _probabilities(model, [d for d, _ in images])
    truth = np.array([m.labels.index(label) for _, label in images])
    predicted = probs.argmax(1)
    held_out = measured_at(probs.max(1).astype(np.float64), predicted == truth, s.threshold)
    assert held_out["precision"] >= TARGET, held_out  # what the threshold promises, on images it never saw
    assert held_out["coverage"] > 0.5, held_out
    # the pipeline's evaluate step reports the same figures from the same logits
    logits = model.logits(np.stack([image_to_tensor(d, m.preprocessing) for d, _ in images]))
    paths = sorted(digits.holdout.rglob("*.png"))
    samples = [Sample(p, m.labels.index(p.parent.name)) for p in paths]
    report = holdout_metrics(logits, samples, m.labels, m.temperature, s.threshold)
    assert report["selective"]["precision"] == pytest.approx(held_out["precision"])
    assert report["selective"]["coverage"] == pytest.approx(held_out["coverage"])
    # the drift reference and the model card come from the same validation pass
    ref = m.reference
    assert ref is not None and ref.num_images == s.num_images
    assert sum(ref.class_frequencies.values()) == pytest.approx(1.0) and set(ref.class_frequencies) == set(m.labels)
    assert sum(ref.score_frequencies) == pytest.approx(1.0) and len(ref.score_frequencies) == len(ref.score_edges) + 1
    card = (version.path / "MODEL_CARD.md").read_text()
    assert "When to trust an answer" in card and f"{s.threshold:.6g}" in card and "risk_coverage.png" in card
    assert "risk_coverage.png" in m.files


def test_the_bootstrap_model_says_it_has_no_threshold(imagenet_repo: Path) -> None:
    m = ModelRepository(imagenet_repo).get(IMAGENET).manifest
    assert m.selective is not None and m.selective.threshold is None and "no validation set" in m.selective.note
    assert m.reference is None
    assert "no validation set" in (imagenet_repo / IMAGENET / str(m.version) / "MODEL_CARD.md").read_text()


def test_batch_rows_carry_confident(digits: DigitsModel) -> None:
    version = ModelRepository(digits.repo).get(NAME)
    model = OnnxModel.load(version.model_path, version.manifest)
    scorer = Scorer(model, top_k=3, batch_size=8, limits=DecodeLimits())
    images = digits.holdout_images()[:40]
    rows = list(scorer.score_sources((i, f"{i}.png", lambda d=d: d) for i, (d, _) in enumerate(images)))
    probs = _probabilities(model, [d for d, _ in images])
    threshold = version.manifest.selective.threshold
    assert [r.confident for r in rows] == [bool(p.max() >= threshold) for p in probs]
    assert "confident" in csv_header(3)
    line = json.loads(encode_rows(rows[:1], "jsonl", NAME, 1, 3))
    assert line["confident"] is rows[0].confident


# --- every front door ------------------------------------------------------------------------------


@dataclass
class Live:
    server: LiveServer
    sure: bytes  # a held-out digit the model is confident about
    unsure: bytes  # one under the threshold
    threshold: float


@pytest.fixture(scope="module")
def live(digits: DigitsModel, imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("selective_server")
    repo = copy_repo(digits, root / "models", imagenet=imagenet_repo)
    version = repo.get(NAME)
    model = OnnxModel.load(version.model_path, version.manifest)
    images = [d for d, _ in digits.holdout_images()]
    scores = _probabilities(model, images).max(1)
    t = version.manifest.selective.threshold
    sure = images[int(np.argmax(scores))]
    below = [i for i in np.argsort(scores) if scores[i] < t - 0.05]
    assert below, "no held-out image is clearly under the threshold"
    with serve(repo.root, root, IMGCLF_ABSTAIN="1") as server:
        yield Live(server, sure, images[int(below[-1])], t)


def _classify(live: Live, image: bytes, **fields: str) -> dict:
    response = live.server.client.post("/classify", files={"image": ("d.png", image)}, data=fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_classify_says_confident_and_abstains_under_the_threshold(live: Live) -> None:
    sure = _classify(live, live.sure, model=NAME)
    assert (sure["confident"], sure["abstained"], sure["threshold"]) == (True, False, live.threshold)
    assert sure["label"] == sure["predictions"][0]["label"]
    unsure = _classify(live, live.unsure, model=NAME)
    assert (unsure["confident"], unsure["abstained"], unsure["label"]) == (False, True, None)
    assert unsure["predictions"] and unsure["predictions"][0]["score"] < live.threshold  # kept, marked
    lenient = _classify(live, live.unsure, model=NAME, min_score="0")
    assert (lenient["confident"], lenient["threshold"], lenient["label"]) == (True, 0.0, lenient["predictions"][0]["label"])
    bad = live.server.client.post("/classify", files={"image": ("d.png", live.sure)}, data={"min_score": "2"})
    assert bad.status_code == 400 and "min_score" in bad.json()["error"]


def test_classify_batch_judges_each_image(live: Live) -> None:
    files = [("images", ("a.png", live.sure)), ("images", ("b.png", live.unsure)), ("images", ("c.png", b"junk"))]
    response = live.server.client.post("/classify_batch", files=files, data={"model": NAME, "top_k": "2"})
    assert response.status_code == 200, response.text
    a, b, c = response.json()["results"]
    assert (a["confident"], a["abstained"], a["label"] is not None) == (True, False, True)
    assert (b["confident"], b["abstained"], b["label"], len(b["predictions"])) == (False, True, None, 2)
    assert c["error"] and c["confident"] is None and c["predictions"] is None


def test_the_model_without_a_threshold_answers_confident_null(live: Live) -> None:
    image = live.sure
    plain = _classify(live, image, model=IMAGENET)
    assert (plain["confident"], plain["threshold"], plain["abstained"]) == (None, None, False)
    assert plain["label"] == plain["predictions"][0]["label"]  # nothing to abstain by
    strict = _classify(live, image, model=IMAGENET, min_score="0.9999")
    assert (strict["confident"], strict["abstained"], strict["label"]) == (False, True, None)
    models = {m["name"]: m for m in live.server.client.get("/models").json()["models"]}
    assert models[IMAGENET]["threshold"] is None and "no validation set" in models[IMAGENET]["selective"]["note"]
    assert models[NAME]["threshold"] == live.threshold and models[NAME]["selective"]["reached"]


def _v2(live: Live, model: str, images: list[bytes], **parameters: object) -> dict:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(d).decode() for d in images]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
    if parameters:
        body["parameters"] = parameters
    response = live.server.client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_open_inference_protocol_says_confident_in_the_response_parameters(live: Live) -> None:
    one = _v2(live, NAME, [live.sure])
    assert one["parameters"] == {"confident": True, "threshold": live.threshold}
    two = _v2(live, NAME, [live.sure, live.unsure])
    assert two["parameters"]["confident"] is False and two["parameters"]["confident_items"] == "true,false"
    lenient = _v2(live, NAME, [live.unsure], min_score=0.0)
    assert lenient["parameters"] == {"confident": True, "threshold": 0.0}
    assert "parameters" not in _v2(live, IMAGENET, [live.sure])  # no threshold: nothing to say
    bad = live.server.client.post(f"/v2/models/{NAME}/infer", json={
        "parameters": {"min_score": "x"}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                      "parameters": {"content_type": "base64"},
                                                      "data": [base64.b64encode(live.sure).decode()]}]})
    assert bad.status_code == 400 and "min_score" in bad.json()["error"]


def test_explain_says_whether_the_explained_answer_is_confident(live: Live) -> None:
    for image, expected in ((live.sure, True), (live.unsure, False)):
        response = live.server.client.post("/explain", files={"image": ("d.png", image)}, data={"model": NAME})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["confident"], body["threshold"]) == (expected, live.threshold)
    png = live.server.client.post("/explain", files={"image": ("d.png", live.unsure)},
                                  data={"model": NAME, "format": "png"})
    assert png.status_code == 200 and png.headers["x-confident"] == "false"
    plain = live.server.client.post("/explain", files={"image": ("d.png", live.sure)}, data={"model": IMAGENET})
    assert plain.status_code == 200 and plain.json()["confident"] is None


def test_grpc_answers_carry_the_same_parameters() -> None:
    from service.http.v2 import grpc_codec
    from service.http.v2.request import InferRequest
    from service.http.v2.serving import confidence_parameters
    from service.selective import Verdict

    parameters = confidence_parameters([Verdict(True, 0.97), Verdict(False, 0.97)])
    assert parameters == {"confident": False, "threshold": 0.97, "confident_items": "true,false"}
    response = grpc_codec.encode_response(InferRequest("digits", 1, ()), [], parameters)
    assert response.parameters["confident"].bool_param is False
    assert response.parameters["confident_items"].string_param == "true,false"
    assert float(response.parameters["threshold"].string_param) == 0.97  # gRPC parameters hold no floats
    assert confidence_parameters([Verdict(None, None)]) == {}
