"""The one function from a model's logits to an answer: calibrated scores, top-k, the verdict.

Every front door answers through :func:`answer` (``/classify``, ``/classify_batch``, the Open
Inference Protocol over REST and gRPC, batch jobs), so the same logits give the same scores, labels
and ``confident`` everywhere. ``/explain`` judges the class it explains with the same
:func:`~service.selective.judge`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.manifest import Manifest
from service.runtime import Prediction, softmax, top_k
from service.selective import Verdict, judge


@dataclass(frozen=True)
class Answer:
    """One image's answer: every class's calibrated score, the top-k, and the verdict on the top-1."""

    probabilities: np.ndarray
    predictions: list[Prediction]
    verdict: Verdict

    @property
    def label(self) -> str | None:
        """The top-1 label, or None when the answer abstains."""
        return None if self.verdict.abstained else self.predictions[0].label


def answer(logits: np.ndarray, manifest: Manifest, k: int, min_score: float | None = None,
           abstain: bool = False) -> Answer:
    """One image's logits -> its answer, with the manifest's temperature, labels and threshold.

    ``min_score`` replaces the manifest's threshold for this request; ``abstain`` makes an answer under
    the threshold carry no label (``IMGCLF_ABSTAIN``).
    """
    probabilities = softmax(logits, manifest.temperature)
    predictions = top_k(probabilities, manifest.labels, max(k, 1))
    verdict = judge(predictions[0].score, manifest.selective, min_score, abstain)
    return Answer(probabilities, predictions, verdict)
