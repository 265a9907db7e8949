"""The training loop: one epoch, evaluation, checkpoints, early stopping, exact resume.

Reproducibility comes from reseeding every random source at the start of each
epoch from (seed, epoch): a run resumed from the checkpoint of epoch k replays
epochs k+1.. exactly as the uninterrupted run would, on the CPU.

The same loop runs as one of N processes (``training.distributed``): DDP averages the
gradients, the data order is the single-process one, evaluation is sharded and gathered,
rank 0 alone writes, and rank 0's early-stopping decision is everyone's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from service.atomic import atomic_path, atomic_write_text
from training.config import EarlyStoppingConfig, TrainConfig
from training.distributed import DistContext
from training.evaluation import topk_accuracy
from training.optim import Schedule
from training.regularization import apply_train_mode, l1_penalty, set_backbone_frozen

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


def seed_everything(seed: int, generator: torch.Generator | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if generator is not None:
        generator.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA; bf16 where the GPU has it."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


@dataclass
class EarlyStopping:
    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    enabled: bool = False
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig) -> EarlyStopping:
        return cls(cfg.monitor, cfg.patience, cfg.min_delta, cfg.enabled)

    @property
    def mode(self) -> str:
        return "min" if self.monitor.endswith("loss") else "max"

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's monitored value; True when it is the best so far."""
        sign = 1.0 if self.mode == "max" else -1.0
        improved = self.best is None or sign * (value - self.best) > self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for a loader, in order, in eval mode."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(targets)


@dataclass
class Trainer:
    """Everything one run needs; ``fit`` runs it, ``save``/``load`` make it resumable."""

    cfg: TrainConfig
    model: nn.Module
    head: list[str]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator
    criterion: nn.Module
    run_dir: Path
    device: torch.device
    mixer: Callable | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # classes, spec, arch: what export needs
    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    stopper: EarlyStopping = field(default_factory=EarlyStopping)
    dist: DistContext = field(default_factory=DistContext)  # one process unless a launcher says otherwise

    def __post_init__(self) -> None:
        self.net: nn.Module = self.model  # what training steps call: the model, or DDP around it
        self.amp_dtype = autocast_dtype(self.cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    # --- paths -------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"

    # --- one epoch ---------------------------------------------------------------------------
    def backbone_frozen(self, epoch: int) -> bool:
        t = self.cfg.transfer
        return t.strategy == "linear_probe" or (t.strategy == "fine_tune" and epoch < t.head_epochs)

    def start_epoch(self, epoch: int) -> None:
        """Freeze or unfreeze the backbone for this epoch and put the model in training mode."""
        frozen = self.backbone_frozen(epoch)
        set_backbone_frozen(self.model, self.head, frozen)
        apply_train_mode(self.model, self.head, frozen, self.cfg.transfer.freeze_bn)
        net = self.dist.wrap(self.model, self.net)
        if net is not self.net:
            self.net = net
            gc.collect()  # a replaced DDP wrapper must be gone, and its gradient hooks with it

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step with every regularizer of the config; returns the loss."""
        reg = self.cfg.regularization
        x, y = x.to(self.device), y.to(self.device)
        if self.mixer is not None:
            x, y = self.mixer(x, y)
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            loss = self.criterion(self.net(x), y)
        if reg.l1 > 0:
            loss = loss + reg.l1 * l1_penalty(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if reg.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), reg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def train_epoch(self, epoch: int) -> float:
        self.start_epoch(epoch)
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=None if self.dist.is_main else True)
        for x, y in bar:
            total += self.train_step(x, y) * len(x)
            count += len(x)
            self.schedule.after_batch()
            bar.set_postfix(loss=f"{total / count:.4f}")
        total, count = self.dist.all_sum([total, count])  # the mean over the global batch, on every rank
        return total / max(count, 1)

    def predict(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of a whole loader: this rank's shard, gathered in order."""
        logits, targets = predict(self.model, self.dist.shard(loader), self.device)
        return self.dist.gather(logits, targets, len(loader.dataset))  # type: ignore[arg-type]

    def evaluate(self) -> dict[str, float]:
        logits, targets = self.predict(self.val_loader)
        return {
            "val_loss": F.cross_entropy(logits, targets).item(),
            "val_top1": topk_accuracy(logits, targets, 1),
            "val_top5": topk_accuracy(logits, targets, 5),
        }

    # --- the run -----------------------------------------------------------------------------
    def fit(self, callbacks: Sequence[EpochCallback] = ()) -> None:
        while self.epoch < self.cfg.epochs and not self.dist.from_main(self.stopper.should_stop):
            epoch = self.epoch
            seed = epoch_seed(self.cfg.seed, epoch)
            seed_everything(self.dist.rank_seed(seed))
            self.generator.manual_seed(seed)  # the data order: the same on every rank
            start = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            metrics = self.dist.from_main(self.evaluate())  # rank 0's numbers drive every rank's schedule
            self.schedule.after_epoch(metrics[self.stopper.monitor])
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                **metrics,
                "lr": self.optimizer.param_groups[-1]["lr"],
                "backbone_frozen": self.backbone_frozen(epoch),
                "seconds": time.perf_counter() - start,
            }
            self.epoch = epoch + 1
            self.history.append(row)
            if self.stopper.update(metrics[self.stopper.monitor], self.epoch):
                self.save(self.best_path, full=False)
            self.save(self.last_path, full=True)
            self.write_metrics()
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_top1 %.4f (%.1fs)",
                self.epoch, self.cfg.epochs, train_loss, metrics["val_loss"], metrics["val_top1"], row["seconds"],
            )
            for callback in callbacks:
                callback(row)
        if self.stopper.should_stop:
            log.info("early stopping after epoch %d; best epoch %d", self.epoch, self.stopper.best_epoch)

    def write_metrics(self) -> None:
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, path: Path, *, full: bool) -> None:
        """Rank 0 writes; the other ranks hold the same weights and optimizer state."""
        if not self.dist.is_main:
            return
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "config": self.cfg.model_dump(mode="json"),
            **self.meta,
        }
        if full:
            state |= {
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "history": self.history,
                "stopper": self.stopper.state_dict(),
                "world_size": self.dist.world_size,
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "generator": self.generator.get_state(),
                },
            }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]
        self.stopper.load_state_dict(state["stopper"])
        self.epoch = state["epoch"]
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a %d-process run with %d processes: same data order and rank-0 random draws, "
                        "gradients summed in another grouping (equal to float rounding, not bit for bit)",
                        state.get("world_size", 1), self.dist.world_size)
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        self.generator.set_state(rng["generator"].cpu())

    def restore_best(self) -> None:
        self.dist.barrier()  # rank 0 has written best.pt
        state = torch.load(self.best_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
