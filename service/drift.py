"""Is what a model serves still like what it was validated on? Population stability, torch-free.

Export stores a :class:`DriftReference` in the manifest: how often the model answers each class on
the validation set, and a histogram of its top-1 scores there. Each worker keeps a rolling
:class:`Window` of its last answers per model and compares the two with the population stability
index, ``PSI = sum((a - e) * ln(a / e))`` over the classes and over the score bins.

Why the model's own answers on validation, not the validation labels: serving has no labels, so
the like-for-like reference for the served answers is what the same model answered on data it is
known to handle. Why score bins at the validation quantiles: a calibrated model's top-1 scores bunch
near 1, and equal-width bins would put nearly everything in the last one and see no shift at all.

PSI has a noise floor: for K bins and a window of n answers drawn like the reference it is about
(K - 1) / n. Keep the window large against the number of classes (docs/trust-and-retrain.md).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCORE_BINS = 10
SMOOTHING = 0.5  # added to every count before proportions are taken: an empty bin must not be infinite
Verdict = Literal["ok", "drift", "not_enough_data", "no_reference"]


class DriftReference(BaseModel):
    """The manifest's ``reference`` field: the validation set as the model answered it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    split: str = "val"
    num_images: int = Field(ge=1)
    class_frequencies: dict[str, float] = Field(description="share of validation images the model answers "
                                                "with each class (its top-1), every label present")
    label_frequencies: dict[str, float] = Field(default_factory=dict, description="share of each true label")
    score_edges: list[float] = Field(description="inner edges of the top-1 score bins (validation quantiles); "
                                     "bin i holds edges[i-1] <= score < edges[i]")
    score_frequencies: list[float] = Field(description="share of validation images in each score bin")


def score_edges(scores: np.ndarray, bins: int = SCORE_BINS) -> list[float]:
    """Inner bin edges at the quantiles of ``scores``, without repeats (saturated scores tie at 1.0)."""
    quantiles = np.quantile(np.asarray(scores, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return sorted({float(q) for q in quantiles})


def bin_of(score: float | np.ndarray, edges: list[float]) -> np.ndarray:
    return np.searchsorted(np.asarray(edges), score, side="right")


def build_reference(predicted: np.ndarray, scores: np.ndarray, labels: list[str], targets: np.ndarray | None = None,
                    *, split: str = "val") -> DriftReference:
    """The reference from the model's top-1 classes and scores on labelled data (``targets``: true labels)."""
    n = len(predicted)
    if n == 0:
        raise ValueError("a drift reference needs at least one image")
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=len(labels))
    edges = score_edges(scores)
    bins = np.bincount(bin_of(np.asarray(scores, dtype=np.float64), edges), minlength=len(edges) + 1)
    truth = {} if targets is None else dict(zip(labels, (np.bincount(targets, minlength=len(labels)) / n).tolist(),
                                                strict=True))
    return DriftReference(split=split, num_images=n, class_frequencies=dict(zip(labels, (counts / n).tolist(),
                                                                                strict=True)),
                          label_frequencies=truth, score_edges=edges, score_frequencies=(bins / n).tolist())


def psi(expected: np.ndarray, counts: np.ndarray, reference_images: int) -> float:
    """Population stability index of observed ``counts`` against ``expected`` proportions measured on
    ``reference_images`` images; both sides are smoothed as counts, so an empty bin stays finite."""
    expected = np.asarray(expected, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    e = (expected / max(expected.sum(), 1e-12) * reference_images + SMOOTHING) / (
        reference_images + SMOOTHING * len(expected))
    a = (counts + SMOOTHING) / (counts.sum() + SMOOTHING * len(counts))
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class DriftStatus:
    window: int  # answers in the window now
    size: int  # the window's capacity
    class_psi: float | None
    score_psi: float | None
    verdict: Verdict


class Window:
    """The last ``size`` answers of one model in one worker: counts per class and per score bin.

    Updated from the event loop and read by /models and metrics; a lock keeps the counts and the
    queue in step should a thread ever call it (batch callbacks run in threads).
    """

    def __init__(self, reference: DriftReference | None, labels: list[str], size: int) -> None:
        self.reference, self.size = reference, size
        self._answers: deque[tuple[int, int]] = deque()
        self._lock = threading.Lock()
        if reference is not None:
            self._expected_classes = np.array([reference.class_frequencies.get(name, 0.0) for name in labels])
            self._expected_scores = np.asarray(reference.score_frequencies)
            self._classes = np.zeros(len(labels), np.int64)
            self._scores = np.zeros(len(reference.score_edges) + 1, np.int64)

    def add(self, index: int, score: float) -> None:
        if self.reference is None:
            return
        b = int(bin_of(score, self.reference.score_edges))
        with self._lock:
            self._answers.append((index, b))
            self._classes[index] += 1
            self._scores[b] += 1
            if len(self._answers) > self.size:
                old_class, old_bin = self._answers.popleft()
                self._classes[old_class] -= 1
                self._scores[old_bin] -= 1

    def status(self, class_threshold: float, score_threshold: float) -> DriftStatus:
        if self.reference is None:
            return DriftStatus(0, self.size, None, None, "no_reference")
        with self._lock:
            n = len(self._answers)
            classes, scores = self._classes.copy(), self._scores.copy()
        if n == 0:
            return DriftStatus(0, self.size, None, None, "not_enough_data")
        ref_n = self.reference.num_images
        class_psi, score_psi = psi(self._expected_classes, classes, ref_n), psi(self._expected_scores, scores, ref_n)
        if n < self.size:
            verdict: Verdict = "not_enough_data"
        elif class_psi > class_threshold or score_psi > score_threshold:
            verdict = "drift"
        else:
            verdict = "ok"
        return DriftStatus(n, self.size, class_psi, score_psi, verdict)
