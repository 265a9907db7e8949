"""A model as the HTTP side serves it: an :class:`OnnxModel` plus a batching queue and a lifecycle.

Batching is hand-written rather than BentoML's ``batchable=True``: BentoML batches one static API
signature, while here every model (and every version a reload brings) has its own queue, and each
image is decoded and validated alone before it joins a batch, so a bad image never fails others. The
queue itself is :class:`service.http.batching.BatchQueue`, which knows nothing about ONNX; what is
model-specific (stack the tensors, one ONNX Runtime call, split the rows) is :meth:`ServedModel._run_batch`.
It times those three phases of every batch (:class:`~service.http.stats.BatchRun`, recorded by
:func:`~service.http.stats.record_batch` for Triton's statistics) and each item learns its wait in
the queue and its batch's phases (:meth:`ServedModel.infer_timed`).

Lifecycle under hot reload: a request holds a :meth:`ServedModel.lease` from picking the model to its
answer; :meth:`retire` marks a replaced model, and once its last lease ends the batching task stops
and the session is dropped, so its memory goes back. Leases, retire and the batching task all live on
one worker's event loop, which is what makes "pick and lease" atomic. (What explains a model is kept
per worker, beside it, by :class:`service.http.explainers.Explainers`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.http.batching import BatchQueue
from service.http.stats import BatchRun, ItemTiming, record_batch
from service.manifest import Manifest
from service.memory import release_memory
from service.runtime import LOGITS, OnnxModel, SessionError

log = logging.getLogger(__name__)

BatchHook = Callable[["ServedModel", int, float], None]  # (model, batch size, seconds): metrics
# One image's tensor, the extra graph outputs it asks for and when it was submitted (perf_counter_ns).
Item = tuple[np.ndarray, tuple[str, ...], int]


class ModelRetiredError(SessionError):
    """The model was replaced by a reload and has released its session; pick the current one."""


@dataclass
class ServedModel:
    model: OnnxModel
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    on_batch: BatchHook | None = field(default=None, repr=False)
    _batches: BatchQueue[Item, Any] = field(init=False, repr=False)
    _leases: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._batches = BatchQueue(self._run_batch, self.max_batch_size, self.batch_wait_ms, self._observe)

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def key(self) -> str:
        return self.model.key

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def load_seconds(self) -> float:
        return self.model.load_seconds

    @property
    def closed(self) -> bool:
        """Retired and drained: the session is gone."""
        return self.model.session is None

    @property
    def _task(self) -> asyncio.Task[None] | None:
        """The batching task (None before the first request): tests check that retirement ends it."""
        return self._batches.task

    def warm_up(self) -> None:
        self.model.warm_up(self.max_batch_size)

    # --- lifecycle ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Hold the model for one request: a reload retires it only after every lease ends."""
        if self._retired:
            raise ModelRetiredError(f"{self.key} was retired by a reload")
        self._leases += 1
        try:
            yield self
        finally:
            self._leases -= 1
            if self._retired and self._leases == 0:
                self._shut_down()

    def retire(self) -> None:
        """No new leases; the session goes once the requests in flight on it have their answers."""
        self._retired = True
        if self._leases == 0:
            self._shut_down()

    def close(self) -> None:
        """Drop the session now (a model that never served, e.g. a refused reload's)."""
        self._retired = True
        self._shut_down()

    def _shut_down(self) -> None:
        self._batches.close()  # the batching task ends after what is already queued
        if self.model.session is not None:
            self.model.provider  # noqa: B018 - remembered for the metrics of a retired model
            self.model.session = None  # the last reference: ONNX Runtime frees weights and arena
            release_memory()
            log.info("retired %s", self.key)

    # --- batching ----------------------------------------------------------------------------------
    async def infer(self, tensor: np.ndarray) -> np.ndarray:
        """One image's logits; concurrent callers are batched together. Answers are made from them by
        ``service.answer.answer`` (the one place for temperature, top-k and the verdict)."""
        return (await self._submit(tensor, ()))[0]

    async def infer_timed(self, tensor: np.ndarray) -> tuple[np.ndarray, ItemTiming]:
        """:meth:`infer`, and how long the image waited in the queue and what its batch's phases took."""
        return await self._submit(tensor, ())

    async def infer_outputs(self, tensor: np.ndarray, extra: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        """Logits and the ``extra`` graph outputs (e.g. ``("features",)`` for /explain) for one image.

        Same queue, same batches as :meth:`infer`: a batch runs once with every output its items ask for
        (the features lie on the way to the logits, so asking for them costs a copy, not a second pass).
        """
        return (await self._submit(tensor, extra))[0]

    async def _submit(self, tensor: np.ndarray, extra: tuple[str, ...]) -> tuple[Any, ItemTiming]:
        if self.model.session is None or self._batches.closed:  # fail fast: the queue takes no more
            raise ModelRetiredError(f"{self.key} was retired by a reload")
        submitted = time.perf_counter_ns()
        row, run = await self._batches.submit((tensor, extra, submitted))
        return row, ItemTiming(max(run.started_ns - submitted, 0), run)

    def _run_batch(self, items: list[Item]) -> list[tuple[Any, BatchRun]]:
        """One ONNX Runtime call for the batch (in the queue's thread), timed; an item with ``extra``
        outputs gets a ``(logits, *extra)`` row, the others their logits row, each with the batch's run."""
        started = time.perf_counter_ns()
        extra = tuple(dict.fromkeys(name for _, wanted, _ in items for name in wanted))
        batch = np.stack([tensor for tensor, _, _ in items])
        stacked = time.perf_counter_ns()
        outputs = self.model.run((LOGITS, *extra), batch) if extra else [self.model.logits(batch)]
        ran = time.perf_counter_ns()
        by_name = dict(zip(extra, outputs[1:], strict=True))
        rows = [(outputs[0][i], *(by_name[n][i] for n in wanted)) if wanted else outputs[0][i]
                for i, (_, wanted, _) in enumerate(items)]
        run = BatchRun(len(items), started, stacked - started, ran - stacked, time.perf_counter_ns() - ran)
        record_batch(self.key, run)  # Triton's statistics
        return [(row, run) for row in rows]

    def _observe(self, size: int, seconds: float) -> None:
        if self.on_batch is not None:
            self.on_batch(self, size, seconds)
