"""At export: the confidence threshold for a target precision, the drift reference, the risk-coverage plot.

Both come from the same numbers serving will compute: ONNX Runtime on the file being registered, the
shared preprocessing, and the softmax of logits / the temperature fitted on the same validation set
(``service.runtime.softmax``). The threshold rule itself lives on the serving side
(``service.selective``) so that export, the pipeline's held-out report and every front door agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.drift import DriftReference, build_reference
from service.manifest import Manifest
from service.preprocessing import PreprocessSpec
from service.runtime import softmax
from service.selective import DEFAULT_TARGET_PRECISION, Curve, Selective, choose_threshold
from training.data import Sample
from training.export.parity import onnx_logits

PLOT = "risk_coverage.png"
NO_VALIDATION = ("no validation set was given at export: no threshold was chosen, so answers say "
                 "confident: null (a request's min_score still applies)")


@dataclass(frozen=True)
class Measured:
    selective: Selective
    reference: DriftReference
    curve: Curve


def top1(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and score per row, the score as serving reports it (``float`` of the float32 value)."""
    predicted = probs.argmax(1)
    return predicted, probs[np.arange(len(probs)), predicted].astype(np.float64)


def measure(path: Path, samples: Sequence[Sample], spec: PreprocessSpec, labels: list[str], temperature: float,
            target_precision: float = DEFAULT_TARGET_PRECISION) -> Measured:
    """Threshold and drift reference from the validation images through ONNX Runtime on ``path``."""
    probs = softmax(onnx_logits(path, samples, spec), temperature)
    targets = np.array([s.label for s in samples])
    predicted, scores = top1(probs)
    selective, curve = choose_threshold(scores, predicted == targets, target_precision)
    return Measured(selective, build_reference(predicted, scores, labels, targets), curve)


def risk_coverage_plot(curve: Curve, selective: Selective, path: Path) -> None:
    """Risk (1 - precision of the confident answers) against coverage, the chosen point marked."""
    from training import plots  # matplotlib: only when a plot is written

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(curve.coverage, curve.risk, drawstyle="steps-post", label="risk at each threshold")
    if selective.target_precision is not None:
        ax.axhline(1 - selective.target_precision, color="grey", linestyle="--",
                   label=f"target: precision {selective.target_precision:g}")
    if selective.reached and selective.coverage is not None and selective.precision is not None:
        ax.plot([selective.coverage], [1 - selective.precision], "o", color="C3",
                label=f"threshold {selective.threshold:.4g}: coverage {selective.coverage:.3f}")
    ax.set(xlabel="coverage (share of answers marked confident)", ylabel="risk (1 - precision)",
           title=f"Risk-coverage on {selective.num_images} {selective.split} images", xlim=(0, 1.02))
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    plots._save(fig, path)


def card_lines(manifest: Manifest) -> list[str]:
    """The model card's paragraph on when to trust an answer."""
    s = manifest.selective
    if s is None:
        return []
    if s.threshold is None:
        return ["", f"**When to trust an answer.** {s.note or NO_VALIDATION}"]
    if not s.reached:
        return ["", f"**When to trust an answer.** {s.note}", "", f"![risk-coverage curve]({PLOT})"]
    return [
        "",
        (f"**When to trust an answer.** An answer is marked confident when its top-1 calibrated score is at least "
         f"{s.threshold:.6g}: on the {s.num_images} {s.split} images that held for {s.coverage:.1%} of them, with "
         f"precision {s.precision:.4f} (target {s.target_precision:g}). Below it the answer still comes back, "
         "marked not confident (or without a label under IMGCLF_ABSTAIN=1)."),
        "",
        f"![risk-coverage curve]({PLOT})",
    ]
