"""PNG plots for a run: learning curves, confusion matrix, lr-finder curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from service.atomic import atomic_path


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curves(history: Sequence[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_top1"] for h in history], label="val top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1))
    ax_acc.legend()
    _save(fig, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> None:
    n = len(classes)
    size = min(4 + 0.4 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (validation)")
    _save(fig, path)


def lr_finder_curve(lrs: Sequence[float], losses: Sequence[float], suggested: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title="Learning-rate range test")
    ax.legend()
    _save(fig, path)
