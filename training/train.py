"""One training run, from a resolved config to a run directory.

Run directory: ``config.yaml`` (resolved), ``data.json`` (classes, counts,
skipped files), ``metrics.jsonl``, ``checkpoints/{best,last}.pt``,
``report.json``, ``learning_curves.png``, ``confusion_matrix.png``.

Under a launcher (torchrun, ``imgclf train --nproc``) this process is one of N: the same run
directory, written by rank 0 alone, with the same files; ``report.json`` says how many processes
trained it (``training.distributed``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from service.atomic import atomic_write_json
from training import plots
from training.config import ConfigError, TrainConfig, save_config
from training.data import ImageDataset, Splits, load_splits
from training.distributed import DistContext, session
from training.evaluation import classification_report
from training.loop import (
    EarlyStopping,
    EpochCallback,
    Trainer,
    resolve_device,
    seed_everything,
)
from training.models import ModelBundle, create_model
from training.optim import build_optimizer, build_schedule, lr_rule, scaled_lr
from training.regularization import batch_mixer, param_groups
from training.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


def class_weights(splits: Splits) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1."""
    counts = Counter(s.label for s in splits.train)
    freq = torch.tensor([counts.get(i, 0) for i in range(len(splits.classes))], dtype=torch.float32)
    weights = 1.0 / freq.clamp(min=1)
    return weights * len(weights) / weights.sum()


def make_loaders(
    cfg: TrainConfig, splits: Splits, bundle: ModelBundle, generator: torch.Generator, dist: DistContext | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders; with N processes each yields this rank's share of each global batch."""
    dist = dist or DistContext()
    for split in ("val", "test"):
        dist.require_shardable(split, len(getattr(splits, split)))
    train_ds = ImageDataset(splits.train, train_transform(bundle.spec, cfg.augment))
    val_ds = ImageDataset(splits.val, eval_transform(bundle.spec))
    sampler = None
    if cfg.data.class_balance == "sampler":
        weights = class_weights(splits)[[s.label for s in splits.train]]
        sampler = WeightedRandomSampler(weights.double(), len(weights), replacement=True, generator=generator)
    common = {"batch_size": dist.per_process_batch(cfg.batch_size), "num_workers": cfg.data.num_workers}
    drop_last = len(train_ds) > cfg.batch_size
    if dist.enabled:  # the single-process order, shared out (training.distributed.GlobalBatchSampler)
        base = sampler or RandomSampler(train_ds, generator=generator)
        train = DataLoader(train_ds, sampler=dist.train_sampler(base, cfg.batch_size, drop_last), generator=generator,
                           **common)
    else:
        train = DataLoader(train_ds, shuffle=sampler is None, sampler=sampler, generator=generator,
                           drop_last=drop_last, **common)
    return train, DataLoader(val_ds, shuffle=False, **common)


def build_trainer(cfg: TrainConfig, run_dir: Path, splits: Splits, dist: DistContext | None = None) -> Trainer:
    """Everything one run needs; ``dist`` (from ``training.distributed.session``) when it is one of N processes."""
    seed_everything(cfg.seed)
    dist = dist or DistContext(device=resolve_device(cfg.device))
    device = dist.device
    bundle = create_model(cfg.model, len(splits.classes))
    model = dist.prepare(bundle.model, cfg.distributed.sync_batchnorm).to(device)
    generator = torch.Generator()
    train_loader, val_loader = make_loaders(cfg, splits, bundle, generator, dist)
    head = bundle.head if cfg.transfer.strategy != "full" else []
    lr = scaled_lr(cfg.optim, cfg.batch_size)
    groups = param_groups(model, cfg.regularization.weight_decay, lr, head, cfg.transfer.backbone_lr_mult)
    optimizer = build_optimizer(groups, cfg.optim)
    stopper = EarlyStopping.from_config(cfg.early_stopping)
    schedule = build_schedule(optimizer, cfg.schedule, cfg.epochs, len(train_loader), stopper.mode)
    weight = class_weights(splits).to(device) if cfg.data.class_balance == "loss" else None
    return Trainer(
        cfg=cfg,
        model=model,
        head=bundle.head,
        optimizer=optimizer,
        schedule=schedule,
        train_loader=train_loader,
        val_loader=val_loader,
        generator=generator,
        criterion=nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.regularization.label_smoothing),
        run_dir=run_dir,
        device=device,
        mixer=batch_mixer(cfg.regularization, len(splits.classes)),
        meta={
            "arch": cfg.model.arch,
            "classes": splits.classes,
            "spec": bundle.spec.model_dump(mode="json"),
            "weights_source": bundle.source,
        },
        stopper=stopper,
        dist=dist,
    )


def final_report(trainer: Trainer, splits: Splits, wall_seconds: float) -> dict[str, Any]:
    """Metrics of the restored best model, through the serving path's preprocessing."""
    val_logits, val_targets = trainer.predict(trainer.val_loader)
    report: dict[str, Any] = classification_report(val_logits, val_targets, splits.classes)
    report |= {
        "split": "val",
        "arch": trainer.cfg.model.arch,
        "pretrained": trainer.cfg.model.pretrained,
        "weights_source": trainer.meta["weights_source"],
        "best_epoch": trainer.stopper.best_epoch,
        "epochs_run": trainer.epoch,
        "stopped_early": trainer.stopper.should_stop,
        "monitor": trainer.stopper.monitor,
        "wall_seconds": wall_seconds,  # this invocation, data loading and evaluation included
        "train_seconds": sum(row["seconds"] for row in trainer.history),  # all epochs, across resumes
        "data": splits.summary(),
        "preprocessing": trainer.meta["spec"],
        "distributed": trainer.dist.describe(trainer.cfg.batch_size)
        | {"sync_batchnorm": trainer.dist.enabled and trainer.cfg.distributed.sync_batchnorm},
        "lr_rule": lr_rule(trainer.cfg.optim, trainer.cfg.batch_size),
    }
    if splits.test:
        test_loader = DataLoader(
            ImageDataset(splits.test, trainer.val_loader.dataset.transform), batch_size=trainer.cfg.batch_size
        )
        report["test"] = classification_report(*trainer.predict(test_loader), splits.classes)
    return report


def load_initial_weights(trainer: Trainer, checkpoint: Path) -> None:
    """Warm start: every weight from another run's checkpoint (same architecture and classes)."""
    state = torch.load(checkpoint, map_location=trainer.device, weights_only=False)
    if state.get("arch") != trainer.meta["arch"] or state.get("classes") != trainer.meta["classes"]:
        raise ConfigError(
            f"cannot warm-start from {checkpoint}: it is {state.get('arch')} over {state.get('classes')}, "
            f"this run is {trainer.meta['arch']} over {trainer.meta['classes']}"
        )
    trainer.model.load_state_dict(state["model"])
    trainer.meta["weights_source"] = f"warm start from {checkpoint}"
    log.info("warm start from %s", checkpoint)


def train(
    cfg: TrainConfig, run_dir: Path, *, resume: bool = False, callbacks: Sequence[EpochCallback] = (),
    init_weights: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run and write every output; returns the report.

    ``init_weights``: a checkpoint (``best.pt`` of an earlier run) to start from instead of the
    config's initial weights; same architecture and classes. Under a launcher every process calls
    this with the same arguments; rank 0's ``run_dir`` is the one used, and every rank returns the
    report (the same metrics; its own wall time). ``callbacks`` run on every rank after each epoch.
    """
    started = time.perf_counter()
    with session(resolve_device(cfg.device), cfg.distributed.sync_batchnorm) as dist:
        run_dir = Path(dist.from_main(str(run_dir)))  # a default name with a time stamp must not differ
        return _run(cfg, run_dir, dist, started, resume=resume, callbacks=callbacks, init_weights=init_weights)


def _run(
    cfg: TrainConfig, run_dir: Path, dist: DistContext, started: float, *, resume: bool,
    callbacks: Sequence[EpochCallback], init_weights: Path | None,
) -> dict[str, Any]:
    splits = load_splits(cfg.data, cfg.seed)
    if splits.skipped:
        log.warning("%d unreadable images skipped", len(splits.skipped))
    log.info("train class counts: %s", splits.class_counts("train"))
    trainer = build_trainer(cfg, run_dir, splits, dist)
    if resume:
        if not trainer.last_path.is_file():
            raise ConfigError(f"cannot resume: {trainer.last_path} does not exist")
        trainer.load(trainer.last_path)
        log.info("resumed %s after epoch %d", run_dir, trainer.epoch)
    else:
        if init_weights is not None:
            load_initial_weights(trainer, Path(init_weights))
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
    if dist.is_main:
        atomic_write_json(run_dir / "data.json", splits.summary() | {"skipped_files": splits.skipped})
    trainer.fit(callbacks)
    trainer.restore_best()
    report = final_report(trainer, splits, time.perf_counter() - started)
    if dist.is_main:
        atomic_write_json(run_dir / "report.json", report)
        plots.learning_curves(trainer.history, run_dir / "learning_curves.png")
        plots.confusion_matrix(report["confusion_matrix"], splits.classes, run_dir / "confusion_matrix.png")
    log.info("val top1 %.4f top5 %.4f (best epoch %d)", report["top1"], report["top5"], report["best_epoch"])
    return report
