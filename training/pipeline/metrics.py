"""What step 5 (evaluate) measures on the held-out set, and the smoke image step 9 (deploy) checks.

Unlike ``training.evaluation.classification_report``, which fits a temperature on the data it is
given, these use each model's own recorded temperature: candidate and production are compared as
they would serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.repository import ModelVersion
from service.runtime import softmax
from service.selective import measured_at
from training.data import Sample
from training.evaluation import expected_calibration_error, topk_accuracy
from training.export import Candidate, onnx_logits
from training.pipeline.data import ValidatedData
from training.pipeline.deploy import SmokeCheck

SMOKE_TARGET_SCORE = 0.8


def holdout_metrics(logits: np.ndarray, samples: list[Sample], labels: list[str], temperature: float,
                    threshold: float | None = None) -> dict[str, Any]:
    """top-1, top-5, recall per class, ECE of softmax(logits / T) with the model's own T; and the precision
    and coverage of the answers at or above the model's confidence ``threshold`` (chosen on validation)."""
    targets = torch.tensor([s.label for s in samples])
    probs = softmax(logits, temperature)
    predicted = probs.argmax(1)
    scores = probs[np.arange(len(probs)), predicted].astype(np.float64)
    t = torch.from_numpy(logits).float()
    preds = logits.argmax(1)
    recall = {name: float((preds[targets.numpy() == i] == i).mean())
              for i, name in enumerate(labels) if bool((targets == i).any())}
    return {
        "num_images": len(samples),
        "top1": topk_accuracy(t, targets, 1),
        "top5": topk_accuracy(t, targets, 5),
        "ece": expected_calibration_error((t / temperature).softmax(1), targets),
        "temperature": temperature,
        "per_class_recall": recall,
        "selective": measured_at(scores, predicted == targets.numpy(), threshold),
    }


def pick_smoke(logits: np.ndarray, samples: list[Sample], labels: list[str], temperature: float) -> SmokeCheck | None:
    """A held-out image the candidate gets right, with the score the service must answer with.

    Not the most confident one: a saturated score (0.9999) is the same for many models, while an
    unsaturated one (closest to 0.8) identifies this model, so another model answering under the
    same name and version number fails the check.
    """
    probs = softmax(logits, temperature)
    preds = probs.argmax(1)
    correct = [i for i, s in enumerate(samples) if preds[i] == s.label]
    if not correct:
        return None
    best = min(correct, key=lambda i: abs(float(probs[i, preds[i]]) - SMOKE_TARGET_SCORE))
    sample = samples[best]
    return SmokeCheck(image=sample.read(), filename=Path(sample.name).name, source=sample.name,
                      label=labels[int(preds[best])], index=int(preds[best]), score=float(probs[best, preds[best]]))


def candidate_metrics(candidate: Candidate, validated: ValidatedData) -> tuple[dict[str, Any], SmokeCheck | None]:
    """The checked candidate file through ONNX Runtime on the held-out set, and the smoke image it picks."""
    labels, spec = candidate.source.labels, candidate.source.spec
    samples = validated.holdout_samples(labels)
    logits = onnx_logits(candidate.path, samples, spec)
    temperature = (candidate.report or {}).get("temperature", 1.0)
    threshold = candidate.measured.selective.threshold if candidate.measured else None
    return (holdout_metrics(logits, samples, labels, temperature, threshold),
            pick_smoke(logits, samples, labels, temperature))


def production_metrics(production: ModelVersion, validated: ValidatedData) -> dict[str, Any]:
    """Production on the same held-out images, at its own temperature and threshold."""
    m = production.manifest
    samples = validated.holdout_samples(m.labels)
    logits = onnx_logits(production.model_path, samples, m.preprocessing)
    threshold = m.selective.threshold if m.selective else None
    return holdout_metrics(logits, samples, m.labels, m.temperature, threshold) | {"version": m.version}


def selective_summary(selective: dict[str, Any]) -> str:
    """What the confidence threshold chosen on validation gives on the held-out set, for the step summary."""
    if selective["threshold"] is None:
        return ""
    if selective["precision"] is None:
        return " (no held-out answer confident)"
    return (f" (confident from {selective['threshold']:.4g}: precision {selective['precision']:.4f}, "
            f"coverage {selective['coverage']:.3f})")
