"""``imgclf train --nproc N`` and the pipeline's ``train.nproc``: N training processes on this machine.

The same as ``torchrun --standalone --nproc-per-node=N -m imgclf.cli train ...``, through torch's
launcher API (``LaunchConfig`` + ``elastic_launch``): the elastic agent runs a local rendezvous,
gives each worker RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, watches them and stops them
all when one fails. Each worker calls :func:`training.train.train`, which reads that environment,
so the launched run and a torchrun run are the same code.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError, TrainConfig
from training.distributed import DistContext, backend_for
from training.loop import EpochCallback, resolve_device
from training.train import train

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LaunchError(RuntimeError):
    """A worker failed; the message is the first failure's (its traceback is in the workers' log)."""


def check_launch(cfg: TrainConfig, nproc: int) -> None:
    """What would stop every worker, said once before any starts: batch split, device, backend."""
    DistContext(world_size=nproc).per_process_batch(cfg.batch_size)
    device = resolve_device(cfg.device)
    backend_for(device, cfg.distributed.sync_batchnorm)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--nproc {nproc} needs one GPU per process; torch sees {torch.cuda.device_count()}")


def threads_per_process(nproc: int, device: torch.device) -> int | None:
    """On the CPU, the cores shared out (torchrun's OMP_NUM_THREADS=1 wastes them on a big machine);
    None (torch's default) when the user set OMP_NUM_THREADS or the work is on a GPU."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def run_training(
    cfg: TrainConfig, run_dir: Path, *, nproc: int = 1, resume: bool = False, init_weights: Path | None = None,
    callbacks: Sequence[EpochCallback] = (),
) -> dict[str, Any]:
    """:func:`training.train.train` in ``nproc`` processes (in this one when 1); returns rank 0's report.

    ``callbacks`` reach the workers by pickling: module-level functions only.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, not {nproc}")
    if nproc == 1:
        return train(cfg, run_dir, resume=resume, callbacks=callbacks, init_weights=init_weights)
    check_launch(cfg, nproc)
    # Only a launch needs the launcher: `imgclf train` alone does not pay for importing it.
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args = (cfg.model_dump(mode="json"), str(run_dir), resume, str(init_weights) if init_weights else None,
            threads_per_process(nproc, resolve_device(cfg.device)), logging.getLogger().getEffectiveLevel(),
            list(callbacks))
    log.info("starting %d training processes", nproc)
    with tempfile.TemporaryDirectory(prefix="imgclf-launch-") as logs:  # the agent's error files, then gone
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"imgclf-{uuid.uuid4().hex[:12]}",
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
                              logs_specs=DefaultLogsSpecs(log_dir=logs))
        try:
            results = elastic_launch(config, worker)(*args)
        except ChildFailedError as exc:
            raise LaunchError(f"{nproc}-process training failed: {failures(exc)}") from exc
    return results[0]


def failures(exc: Any) -> str:
    """Each failed rank's exception in one line (a rank whose peer died says only that: read them all)."""
    parts = []
    for rank, failure in sorted(exc.failures.items()):
        message = failure.message
        if isinstance(message, dict):  # the error file's {"message": ..., "extraInfo": {traceback}}
            message = message.get("message", message)
        parts.append(f"rank {rank}: {str(message).splitlines()[0] if str(message) else failure.exitcode}")
    return "; ".join(parts)


def worker(
    cfg_json: dict[str, Any], run_dir: str, resume: bool, init_weights: str | None, threads: int | None,
    log_level: int, callbacks: list[EpochCallback],
) -> dict[str, Any]:
    """One launched process (module level: spawn pickles it by name into a fresh interpreter)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = TrainConfig.model_validate(cfg_json)
    return train(cfg, Path(run_dir), resume=resume, callbacks=callbacks,
                 init_weights=Path(init_weights) if init_weights else None)
