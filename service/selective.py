"""Selective prediction: when is a top-1 answer worth trusting? Torch-free, shared by export and serving.

Export chooses a score threshold on the validation set for a target precision (:func:`choose_threshold`)
and records it in the manifest (:class:`Selective`); every front door then says whether the calibrated
top-1 score clears it (:func:`judge`). The rule is ``score >= threshold`` everywhere: export, the
pipeline's held-out report, serving and batch jobs, so the precision measured at export is the one a
client gets from the answers marked confident.

Why a lower confidence bound and not the measured precision: a threshold picked where the validation
sample happens to look good is optimistic on that sample; asking its 95% lower bound to reach the
target is what makes the target hold on new data (the pipeline's held-out report checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TARGET_PRECISION = 0.99
CONFIDENCE = 0.95  # of the lower bound on the precision that must reach the target (one-sided)
#: What a threshold that no score can reach is written as: above 1.0, the largest calibrated score.
UNREACHABLE = math.nextafter(1.0, 2.0)


class Selective(BaseModel):
    """The manifest's ``selective`` field: the threshold and what it reached where it was chosen."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    threshold: float | None = Field(description="top-1 calibrated score at or above which an answer is "
                                    "confident; null: no labelled data to choose one (answers say confident: null)")
    target_precision: float | None = Field(default=None, gt=0, le=1)
    precision: float | None = Field(default=None, description="precision of the confident answers where it "
                                    "was chosen; null when none is confident")
    precision_lower_bound: float | None = Field(default=None, description="its Wilson lower bound at "
                                                "`confidence`: what reached the target")
    confidence: float | None = Field(default=None, gt=0, lt=1)
    coverage: float | None = Field(default=None, ge=0, le=1, description="share of answers that are confident")
    reached: bool = Field(default=False, description="whether any threshold reaches the target; if not, no "
                          "answer is confident (threshold above 1)")
    num_images: int = Field(default=0, ge=0)
    split: str = "val"
    note: str | None = None

    @classmethod
    def unmeasured(cls, note: str) -> Selective:
        return cls(threshold=None, note=note)


@dataclass(frozen=True)
class Curve:
    """The risk-coverage curve: accepting the ``k`` highest scores gives ``coverage[k-1]``, ``risk[k-1]``."""

    scores: np.ndarray  # top-1 scores, descending
    coverage: np.ndarray
    precision: np.ndarray

    @property
    def risk(self) -> np.ndarray:
        return 1.0 - self.precision


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> Curve:
    """Precision and coverage of ``score >= t`` for every distinct ``t`` among the scores (ties together)."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must be two equal 1-d arrays")
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    hits = np.cumsum(c)
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # accept ties together
    k = np.arange(1, len(s) + 1)[last_of_tie]
    return Curve(s[last_of_tie], k / max(len(s), 1), hits[last_of_tie] / k)


def wilson_lower(hits: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """Wilson score lower bound of a binomial proportion ``hits / n`` (one-sided, ``z`` standard deviations)."""
    n = np.asarray(n, dtype=np.float64)
    p = np.asarray(hits, dtype=np.float64) / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def choose_threshold(scores: np.ndarray, correct: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION,
                     *, confidence: float = CONFIDENCE, split: str = "val") -> tuple[Selective, Curve]:
    """The lowest threshold whose confident answers reach the target precision with ``confidence``.

    The precision measured on the data the threshold is chosen on flatters it (the threshold is picked
    where that sample happens to look good), so the rule asks the Wilson lower bound of the precision,
    not the precision itself, to reach the target. The price: at precision 0.99 and confidence 0.95 it
    takes at least 268 confident answers, all right, before any threshold qualifies.
    """
    if not 0 < target_precision <= 1:
        raise ValueError(f"the target precision must be in (0, 1], got {target_precision}")
    curve = risk_coverage(scores, correct)
    n = len(np.asarray(scores))
    if n == 0:
        return Selective.unmeasured("no labelled images to choose a threshold on"), curve
    z = NormalDist().inv_cdf(confidence)
    accepted = np.rint(curve.coverage * n)
    lower = wilson_lower(curve.precision * accepted, accepted, z)
    ok = np.flatnonzero(lower >= target_precision - 1e-12)
    common = {"target_precision": target_precision, "confidence": confidence, "num_images": n, "split": split}
    if len(ok) == 0:
        needed = math.ceil(z * z * target_precision / max(1 - target_precision, 1e-12))
        return Selective(threshold=UNREACHABLE, precision=None, coverage=0.0, reached=False, **common,
                         note=f"no threshold reaches precision {target_precision:g} with confidence {confidence:g} "
                              f"on {n} {split} images (that takes at least {needed} confident answers, nearly all "
                              "right): no answer is confident"), curve
    best = int(ok[-1])  # the deepest point: the most coverage the bound allows
    return Selective(threshold=float(curve.scores[best]), precision=float(curve.precision[best]),
                     precision_lower_bound=float(lower[best]), coverage=float(curve.coverage[best]), reached=True,
                     **common), curve


def measured_at(scores: np.ndarray, correct: np.ndarray, threshold: float | None) -> dict[str, float | int | None]:
    """Precision and coverage of ``score >= threshold`` on other data (the pipeline's held-out set)."""
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    if threshold is None:
        return {"threshold": None, "precision": None, "coverage": None, "confident": 0, "images": len(scores)}
    accepted = scores >= threshold
    k = int(accepted.sum())
    return {"threshold": threshold, "precision": float(correct[accepted].mean()) if k else None,
            "coverage": k / max(len(scores), 1), "confident": k, "images": len(scores)}


# --- serving -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What an answer says about its top-1: ``confident`` is None when there is no threshold to judge by."""

    confident: bool | None
    threshold: float | None
    abstained: bool = False


def parse_min_score(value: object, *, text: bool = False) -> float | None:
    """A request's ``min_score``: a number in [0, 1], or None. Raises ValueError saying what is allowed.

    ``text``: a string holding the number is accepted too (gRPC parameters have no floating-point type);
    elsewhere a string is a client's mistake, as an empty field is.
    """
    if value is None:
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, str) and not text):  # JSON true is not a score
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"min_score must be a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"min_score must be between 0 and 1, got {number:g}")
    return number


def judge(score: float, selective: Selective | None, min_score: float | None = None,
          abstain: bool = False) -> Verdict:
    """``min_score`` (per request) overrides the manifest's threshold; without either, confident is None.

    ``abstain`` (IMGCLF_ABSTAIN): a non-confident answer abstains (its label becomes null; the
    predictions stay). An answer with no threshold never abstains: nothing says it should.
    """
    threshold = min_score if min_score is not None else (selective.threshold if selective else None)
    if threshold is None:
        return Verdict(None, None)
    confident = bool(score >= threshold)
    return Verdict(confident, threshold, abstain and not confident)
