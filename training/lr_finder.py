"""The learning-rate range test (Smith, 2017; as popularised by fastai).

The learning rate grows exponentially batch by batch from ``start_lr`` to
``end_lr``; the loss is smoothed, the test stops once the loss diverges, and the
suggestion is the rate where the smoothed loss falls fastest.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.atomic import atomic_write_json
from training import plots
from training.config import TrainConfig
from training.data import load_splits
from training.loop import epoch_seed, seed_everything
from training.optim import scaled_lr
from training.train import build_trainer

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    suggested_lr: float


def suggest(lrs: list[float], losses: list[float]) -> float:
    """Steepest descent of the smoothed loss, ignoring the noisy first and last points."""
    if len(losses) < 5:
        return lrs[int(np.argmin(losses))] / 10
    grads = np.gradient(np.asarray(losses), np.log10(np.asarray(lrs)))
    lo, hi = len(grads) // 10, max(len(grads) * 9 // 10, len(grads) // 10 + 1)
    return float(lrs[lo + int(np.argmin(grads[lo:hi]))])


def lr_find(
    cfg: TrainConfig,
    out_dir: Path,
    *,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    num_iter: int = 100,
    beta: float = 0.9,
    diverge: float = 4.0,
) -> LRFindResult:
    """Run the range test on the training split and save ``lr_find.png`` and ``lr_find.json``."""

    splits = load_splits(cfg.data, cfg.seed)
    trainer = build_trainer(cfg, out_dir, splits)
    seed_everything(epoch_seed(cfg.seed, 0), trainer.generator)
    trainer.start_epoch(0)
    ratios = [g["lr"] / scaled_lr(cfg.optim, cfg.batch_size) for g in trainer.optimizer.param_groups]
    gamma = (end_lr / start_lr) ** (1 / max(num_iter - 1, 1))
    batches = itertools.islice(itertools.cycle(trainer.train_loader), num_iter)
    lrs, losses, avg, best = [], [], 0.0, math.inf
    for step, (x, y) in enumerate(batches):
        lr = start_lr * gamma**step
        for group, ratio in zip(trainer.optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        avg = beta * avg + (1 - beta) * trainer.train_step(x, y)  # the real step: L1, clipping, mixup, AMP
        smoothed = avg / (1 - beta ** (step + 1))
        if not math.isfinite(smoothed) or (step > 5 and smoothed > diverge * best):
            log.info("loss diverged at lr %.2e; stopping the range test", lr)
            break
        best = min(best, smoothed)
        lrs.append(lr)
        losses.append(smoothed)
    if not lrs:
        raise RuntimeError("the loss diverged at the first step; lower start_lr")
    result = LRFindResult(lrs, losses, suggest(lrs, losses))
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.lr_finder_curve(lrs, losses, result.suggested_lr, out_dir / "lr_find.png")
    atomic_write_json(out_dir / "lr_find.json", {"suggested_lr": result.suggested_lr, "lrs": lrs, "losses": losses})
    return result
