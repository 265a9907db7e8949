"""Optimizers and learning-rate schedules, built from the config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler

from training.config import OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak rate a run uses: ``lr``, or under linear scaling ``lr`` times the global batch over the
    reference batch. It depends on the global batch only, never on the process count, so the same
    config trains the same model with 1 or N processes."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch / cfg.lr_reference_batch
    return cfg.lr


def lr_rule(cfg: OptimConfig, global_batch: int) -> dict[str, Any]:
    """How the rate was chosen, for report.json."""
    return {"scaling": cfg.lr_scaling, "base_lr": cfg.lr,
            "reference_batch": cfg.lr_reference_batch if cfg.lr_scaling == "linear" else None,
            "lr": scaled_lr(cfg, global_batch)}


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass
class Schedule:
    """Wraps one torch scheduler and knows whether it steps per batch or per epoch."""

    scheduler: Any
    per_batch: bool

    def after_batch(self) -> None:
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self, monitored: float) -> None:
        if isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored)
        elif not self.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float, cosine: bool = True):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int, monitor_mode: str
) -> Schedule:
    total = epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.name in ("constant", "cosine"):
        fn = warmup_cosine(total, warmup, cfg.min_lr_ratio, cosine=cfg.name == "cosine")
        return Schedule(lr_scheduler.LambdaLR(optimizer, fn), per_batch=True)
    if cfg.name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct = cfg.warmup_epochs / epochs if cfg.warmup_epochs else 0.3
        return Schedule(
            lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=min(pct, 0.9)),
            per_batch=True,
        )
    if cfg.name == "step":
        return Schedule(lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma), per_batch=False)
    return Schedule(
        lr_scheduler.ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=cfg.gamma, patience=cfg.plateau_patience),
        per_batch=False,
    )
