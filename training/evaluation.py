"""Metrics for a set of logits: accuracy, per-class scores, confusion, calibration."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).double().mean().item()


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean() * (conf[mask].mean() - correct[mask].mean()).abs()
    return ece.item()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Temperature scaling: the single T > 0 minimising validation NLL of softmax(logits / T)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().clamp(0.05, 20.0).item())


def classification_report(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """Everything report.json says about one split; logits come from the shared preprocessing."""
    logits, targets = logits.float().cpu(), targets.cpu()
    preds = logits.argmax(dim=1).numpy()
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets.numpy(), preds, labels=labels, zero_division=0
    )
    temperature = fit_temperature(logits, targets)
    return {
        "top1": topk_accuracy(logits, targets, 1),
        "top5": topk_accuracy(logits, targets, 5),
        "loss": F.cross_entropy(logits, targets).item(),
        "num_images": len(targets),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(targets.numpy(), preds, labels=labels).tolist(),
        "temperature": temperature,
        "ece_before_temperature": expected_calibration_error(logits.softmax(1), targets),
        "ece_after_temperature": expected_calibration_error((logits / temperature).softmax(1), targets),
    }
