"""Step 6 of the pipeline (gate): may the candidate replace production? Pure rules over measured numbers.

Both models are measured on the same held-out images through ONNX Runtime and the shared
preprocessing (``training.pipeline.metrics.holdout_metrics``). The decision keeps every rule with the
numbers that decided it, so the run record can say exactly why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from training.pipeline.config import GateConfig

EPS = 1e-9  # equal accuracies are equal, whatever the float rounding

Basis = Literal["compared_with_production", "no_production", "label_set_changed"]


class Rule(BaseModel):
    name: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    detail: str


class GateDecision(BaseModel):
    passed: bool
    basis: Basis
    reason: str  # one line: why it may be promoted, or every rule that failed
    rules: list[Rule]


def decide(
    cfg: GateConfig,
    candidate: dict[str, Any] | None,
    production: dict[str, Any] | None,
    *,
    export_error: str | None = None,
    label_set_changed: bool = False,
) -> GateDecision:
    """``candidate``/``production``: held-out metrics (top1, per_class_recall); None when not measured."""
    basis: Basis = ("label_set_changed" if label_set_changed else
                    "compared_with_production" if production is not None else "no_production")
    rules = [Rule(name="export_checks", passed=export_error is None,
                  detail=export_error or "ONNX checker, inference-mode graph, symbolic batch, parity with PyTorch "
                  "at batch sizes 1/7/32, batch invariance: all passed")]
    if candidate is not None and cfg.min_top1 is not None:
        rules.append(Rule(name="min_top1", passed=candidate["top1"] + EPS >= cfg.min_top1, value=candidate["top1"],
                          threshold=cfg.min_top1,
                          detail=f"candidate top-1 {candidate['top1']:.4f}, floor {cfg.min_top1:.4f}"))
    if candidate is not None and basis == "compared_with_production":
        assert production is not None
        floor = production["top1"] - cfg.top1_tolerance
        rules.append(Rule(
            name="top1", passed=candidate["top1"] + EPS >= floor, value=candidate["top1"], threshold=floor,
            detail=f"candidate top-1 {candidate['top1']:.4f} vs production {production['top1']:.4f} "
                   f"(tolerance {cfg.top1_tolerance:.4f})"))
        drops = {c: production["per_class_recall"][c] - r for c, r in candidate["per_class_recall"].items()}
        worst = max(drops, key=lambda c: drops[c])
        too_much = sorted(c for c, d in drops.items() if d > cfg.max_class_recall_drop + EPS)
        rules.append(Rule(
            name="class_recall", passed=not too_much, value=drops[worst], threshold=cfg.max_class_recall_drop,
            detail=(f"largest recall drop {drops[worst]:.4f} on class {worst!r} "
                    f"({production['per_class_recall'][worst]:.4f} -> {candidate['per_class_recall'][worst]:.4f}, "
                    f"limit {cfg.max_class_recall_drop:.4f})" + (f"; over the limit: {too_much}" if too_much else "")
                    if drops[worst] > 0 else "no class's recall fell")))
    failed = [r for r in rules if not r.passed]
    if failed:
        reason = "; ".join(f"{r.name} failed ({r.detail})" for r in failed)
    elif basis == "no_production":
        reason = "no production version yet: promoted on the export checks alone" + (
            " and the top-1 floor" if cfg.min_top1 is not None else "")
    elif basis == "label_set_changed":
        reason = "label set changed (allowed): a new model, not compared with production; promoted on the export " \
                 "checks" + (" and the top-1 floor" if cfg.min_top1 is not None else "")
    else:
        reason = "every rule passed: " + "; ".join(r.detail for r in rules[1:])
    return GateDecision(passed=not failed, basis=basis, reason=reason, rules=rules)
