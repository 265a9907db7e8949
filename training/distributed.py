"""Several processes, one run: torchrun's environment, the process group, DDP, data shards, gathering.

A launcher (torchrun, or ``imgclf train --nproc`` through ``training.launch``) starts N copies of
the same run and tells each one RANK, WORLD_SIZE and LOCAL_RANK; :func:`session` reads them once,
joins the process group (gloo on the CPU, NCCL on CUDA) and hands the run a :class:`DistContext`.
Without a launcher the context is the single process and every helper is the identity, so a
one-process run is exactly the run it was before.

The design rule is equivalence with one process at the same global batch. Global batch k is the
batch one process would train on (the same sampler on the same generator), each process takes
every N-th sample of it, and DDP's average of N equal-share gradients is the global batch's mean
gradient. Evaluation shards the data contiguously without padding and gathers the logits in rank
order, so every metric is computed on exactly the single-process set, in the same order.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset

from training.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

RANK_SEED_STRIDE = 0x9E3779B1  # rank r > 0 draws augmentation and dropout from its own stream


def backend_for(device: torch.device, sync_batchnorm: bool = False) -> str:
    """NCCL for CUDA, gloo for the CPU; other devices and CPU SyncBatchNorm are config errors."""
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"training with several processes runs on cpu (gloo) or cuda (nccl), not {device.type}; "
                          "set device: cpu or cuda")
    if sync_batchnorm and device.type != "cuda":
        raise ConfigError("distributed.sync_batchnorm needs CUDA (torch's SyncBatchNorm does not run on the CPU); "
                          "set it to false")
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run; the defaults are the single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo or nccl; None: one process, no process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DistContext:
        """What torchrun (or any launcher that speaks its protocol) says about this process."""
        return cls(rank=int(env.get("RANK", "0")), world_size=int(env.get("WORLD_SIZE", "1")),
                   local_rank=int(env.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run directory and logs the epochs."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def per_process_batch(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            lower = global_batch // self.world_size * self.world_size
            raise ConfigError(
                f"batch_size {global_batch} is the global batch and must divide evenly among {self.world_size} "
                f"processes; use a multiple of {self.world_size} such as {lower or self.world_size} or "
                f"{lower + self.world_size}")
        return global_batch // self.world_size

    def rank_seed(self, seed: int) -> int:
        """Rank 0 keeps the single-process seed; the others get distinct ones (no shared dropout masks)."""
        return seed + self.rank * RANK_SEED_STRIDE

    def describe(self, global_batch: int) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "global_batch_size": global_batch,
                "per_process_batch_size": self.per_process_batch(global_batch)}

    # --- the model -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """SyncBatchNorm when asked for and there is more than one process (before the optimizer is built)."""
        if self.enabled and sync_batchnorm:
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model: nn.Module, current: nn.Module) -> nn.Module:
        """DDP over the parameters that train now; ``current`` while that set is unchanged.

        DDP reduces only what required grad when it was built, so a fine-tune that unfreezes its
        backbone needs a new wrapper (the caller drops the old one, whose hooks go with it).
        """
        if not self.enabled:
            return model
        trainable = tuple(name for name, p in model.named_parameters() if p.requires_grad)
        if isinstance(current, DistributedDataParallel) and getattr(current, "imgclf_trainable", None) == trainable:
            return current
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
        wrapped.imgclf_trainable = trainable
        return wrapped

    # --- data ----------------------------------------------------------------------------------
    def train_sampler(self, base: Sampler[int], global_batch: int, drop_last: bool) -> Sampler[int]:
        return GlobalBatchSampler(base, global_batch, self.rank, self.world_size, drop_last)

    def shard_bounds(self, total: int) -> list[tuple[int, int]]:
        return [(r * total // self.world_size, (r + 1) * total // self.world_size) for r in range(self.world_size)]

    def require_shardable(self, split: str, total: int) -> None:
        """Every process evaluates at least one image of a split (checked before training starts)."""
        if self.enabled and 0 < total < self.world_size:
            raise ConfigError(f"the {split} split has {total} images, fewer than the {self.world_size} processes "
                              "that would share its evaluation; use fewer processes")

    def shard(self, loader: DataLoader) -> DataLoader:
        """This process's contiguous share of an evaluation loader: no sample twice, none left out."""
        if not self.enabled:
            return loader
        total = len(loader.dataset)  # type: ignore[arg-type]
        self.require_shardable("evaluation", total)
        lo, hi = self.shard_bounds(total)[self.rank]
        return DataLoader(Subset(loader.dataset, range(lo, hi)), batch_size=loader.batch_size,
                          num_workers=loader.num_workers)

    def gather(self, logits: torch.Tensor, targets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's shard, in rank order: the whole set in the single-process order, on every rank."""
        if not self.enabled:
            return logits, targets
        sizes = [hi - lo for lo, hi in self.shard_bounds(total)]
        out = []
        for local in (logits, targets):
            padded = local.new_zeros((max(sizes), *local.shape[1:]), device=self._comm_device)
            padded[: len(local)] = local
            parts = [torch.empty_like(padded) for _ in sizes]
            tdist.all_gather(parts, padded)
            out.append(torch.cat([part[:size].cpu() for part, size in zip(parts, sizes, strict=True)]))
        return out[0], out[1]

    # --- agreement -----------------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        summed = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        tdist.all_reduce(summed)
        return summed.cpu().tolist()

    def from_main(self, obj: T) -> T:
        """Rank 0's value on every rank: one decision (early stop, run directory) for all."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


class GlobalBatchSampler(Sampler[int]):
    """This process's share of each global batch of the single-process order ``base``.

    Global batch k is ``order[k*B:(k+1)*B]``, what one process would train on; rank r takes every
    N-th index of it (``[r::N]``, the interleaving of DistributedSampler), B/N indices. The order is
    drawn from the loader's generator, which the loop reseeds from (seed, epoch) at each epoch start:
    that reseed is what DistributedSampler's ``set_epoch`` does, and it keeps resume exact. A last
    partial batch (only when the whole split is smaller than one batch) is padded by wrapping round,
    as DistributedSampler pads.
    """

    def __init__(self, base: Sampler[int], global_batch: int, rank: int, world_size: int, drop_last: bool) -> None:
        self.base, self.global_batch, self.rank, self.world_size = base, global_batch, rank, world_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        for start in range(0, len(order), self.global_batch):
            batch = order[start:start + self.global_batch]
            if len(batch) < self.global_batch:
                if self.drop_last:
                    return
                batch += [batch[i % len(batch)] for i in range(-len(batch) % self.world_size)]
            yield from batch[self.rank::self.world_size]

    def __len__(self) -> int:
        full, rest = divmod(len(self.base), self.global_batch)  # type: ignore[arg-type]
        tail = 0 if self.drop_last or not rest else math.ceil(rest / self.world_size)
        return full * (self.global_batch // self.world_size) + tail


@contextmanager
def session(device: torch.device, sync_batchnorm: bool = False,
            env: Mapping[str, str] | None = None) -> Iterator[DistContext]:
    """This process's place in the run, from the launcher's environment; joins (and leaves) the group.

    A process group that the caller already started is used as it is and left running.
    """
    ctx = DistContext.from_env(os.environ if env is None else env)
    if not ctx.enabled:
        yield replace(ctx, device=device)
        return
    backend = backend_for(device, sync_batchnorm)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    ours = logging.getLogger("training")
    level = ours.level
    if not ctx.is_main:
        ours.setLevel(logging.WARNING)  # one voice: rank 0 logs the run, the others only their problems
    log.info("process %d of %d (%s on %s)", ctx.rank, ctx.world_size, backend, device)
    try:
        yield replace(ctx, backend=backend, device=device)
    finally:
        ours.setLevel(level)
        if owned:
            tdist.destroy_process_group()
