"""``imgclf train``, ``imgclf lr-find`` and ``imgclf archs``: the training side (needs the train extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imgclf.cli.common import (
    ArchOpt,
    BatchOpt,
    ConfigOpt,
    DataOpt,
    EpochsOpt,
    LrOpt,
    PretrainedOpt,
    SeedOpt,
    SizeOpt,
    WeightsOpt,
    fail,
    require_training,
    train_overrides,
    user_errors,
)

if TYPE_CHECKING:
    from training.config import TrainConfig

app = typer.Typer()


def resolve(config: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < recipe < --config file < flags; a bad file or key raises ConfigError (a user error)."""
    from training.config import resolve_config

    return resolve_config(config, overrides)


@app.command()
def train(
    config: ConfigOpt = None,
    data: DataOpt = None,
    arch: ArchOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    image_size: SizeOpt = None,
    seed: SeedOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<arch>-<time>)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this directory")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="training processes on this machine (DDP: gloo on "
                                       "the CPU, NCCL with one GPU each); --batch-size stays the global batch")] = 1,
) -> None:
    """Fine-tune or train a CNN; writes checkpoints, metrics, report.json and plots to the run directory.

    Also runs as one of N processes under ``torchrun --nproc-per-node=N -m imgclf.cli train ...``.
    """
    require_training()
    import logging
    import os
    import time

    from training.distributed import DistContext
    from training.launch import LaunchError, run_training

    here = DistContext.from_env(os.environ)  # torchrun's RANK/WORLD_SIZE, if it started this process
    if here.enabled and nproc > 1:
        fail(f"this process is already one of {here.world_size} (started by torchrun); drop --nproc")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)  # the launcher's config dump
    overrides = train_overrides(data=data, arch=arch, pretrained=pretrained, weights=weights, epochs=epochs,
                                batch_size=batch_size, lr=lr, image_size=image_size, seed=seed)
    if resume is not None:
        if overrides or config or out:
            fail("--resume continues a run with its saved config.yaml; give no other options (but --nproc)")
        cfg = resolve(resume / "config.yaml", {})
        run_dir = resume
    else:
        cfg = resolve(config, overrides)
        run_dir = out or Path("runs") / f"{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    with user_errors(ValueError, LaunchError):  # what the data and model builders reject (ConfigError, DataError)
        report = run_training(cfg, run_dir, nproc=nproc, resume=resume is not None)
    if not here.is_main:
        return  # under torchrun, rank 0 speaks for the run
    typer.echo(
        f"{run_dir}: val top-1 {report['top1']:.4f}, top-5 {report['top5']:.4f}, "
        f"best epoch {report['best_epoch']}/{report['epochs_run']}, "
        f"ECE {report['ece_before_temperature']:.4f} -> {report['ece_after_temperature']:.4f} "
        f"(T={report['temperature']:.3f}), {report['wall_seconds']:.0f} s"
    )


@app.command("lr-find")
def lr_find(
    config: ConfigOpt = None,
    data: DataOpt = None,
    arch: ArchOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = None,
    image_size: SizeOpt = None,
    seed: SeedOpt = None,
    start_lr: Annotated[float, typer.Option(help="first learning rate")] = 1e-6,
    end_lr: Annotated[float, typer.Option(help="last learning rate")] = 1.0,
    num_iter: Annotated[int, typer.Option(help="number of batches")] = 100,
    out: Annotated[Path, typer.Option("--out", help="where lr_find.png and lr_find.json go")] = Path("runs/lr-find"),
) -> None:
    """Learning-rate range test: prints a suggested rate and saves the loss-vs-rate plot."""
    require_training()
    from training.lr_finder import lr_find as run_lr_find

    cfg = resolve(config, train_overrides(data=data, arch=arch, pretrained=pretrained, weights=weights,
                                          batch_size=batch_size, image_size=image_size, seed=seed))
    result = run_lr_find(cfg, out, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
    typer.echo(f"suggested learning rate: {result.suggested_lr:.3g} (plot: {out / 'lr_find.png'})")


@app.command("archs")
def archs() -> None:
    """Architectures that `imgclf train --arch` accepts."""
    require_training()
    from training.models import list_models

    typer.echo("\n".join(list_models()))
