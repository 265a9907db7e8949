"""A model as the HTTP side serves it: an :class:`OnnxModel` plus a batching queue and a lifecycle.

Batching is hand-written rather than BentoML's ``batchable=True``: BentoML batches one static API
signature, while here every model (and every version a reload brings) has its own queue, and each
image is decoded and validated alone before it joins a batch, so a bad image never fails others.

Lifecycle under hot reload: a request holds a :meth:`ServedModel.lease` from picking the model to its
answer; :meth:`retire` marks a replaced model, and once its last lease ends the batching task stops
and the session is dropped, so its memory goes back. Leases, retire and the batching task all live on
one worker's event loop, which is what makes "pick and lease" atomic.
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

from service.explainer import Explainer
from service.manifest import Manifest
from service.memory import release_memory
from service.runtime import LOGITS, EngineError, OnnxModel, softmax

log = logging.getLogger(__name__)

BatchHook = Callable[["ServedModel", int, float], None]  # (model, batch size, seconds): metrics
_STOP = object()  # put in a queue to end its batching task


class EngineRetiredError(EngineError):
    """The model was replaced by a reload and has released its session; pick the current one."""


@dataclass
class ServedModel:
    model: OnnxModel
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    on_batch: BatchHook | None = field(default=None, repr=False)
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _leases: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)  # the batching task
    _explainer: Explainer | None = field(default=None, repr=False)  # built on the first /explain

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

    def warm_up(self) -> None:
        self.model.warm_up(self.max_batch_size)

    async def explainer(self) -> Explainer:
        """How to explain this model (its head read and checked once, off the loop); ExplainError if unreadable."""
        if self._explainer is None:
            self._explainer = await asyncio.to_thread(Explainer, self.model)
        return self._explainer

    # --- lifecycle ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Hold the model for one request: a reload retires it only after every lease ends."""
        if self._retired:
            raise EngineRetiredError(f"{self.key} was retired by a reload")
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
        if self._queue is not None:
            self._queue.put_nowait(_STOP)  # the batching task ends after what is already queued
            self._queue = None
        if self.model.session is not None:
            self.model.provider  # noqa: B018 - remembered for the metrics of a retired model
            self.model.session = None  # the last reference: ONNX Runtime frees weights and arena
            release_memory()
            log.info("retired %s", self.key)

    # --- batching ----------------------------------------------------------------------------------
    async def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for one image; concurrent callers are batched together."""
        return softmax(await self.infer_logits(tensor), self.manifest.temperature)

    async def infer_logits(self, tensor: np.ndarray) -> np.ndarray:
        """Raw logits for one image, from the same batching queue as :meth:`infer`."""
        return await self._submit(tensor, ())

    async def infer_outputs(self, tensor: np.ndarray, extra: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        """Logits and the ``extra`` graph outputs (e.g. ``("features",)`` for /explain) for one image.

        Same queue, same batches as :meth:`infer`: a batch runs once with every output its items ask for
        (the features lie on the way to the logits, so asking for them costs a copy, not a second pass).
        """
        return await self._submit(tensor, extra)

    async def _submit(self, tensor: np.ndarray, extra: tuple[str, ...]) -> Any:
        if self.model.session is None:  # fail fast instead of starting a new batching task
            raise EngineRetiredError(f"{self.key} was retired by a reload")
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._batch_loop(self._queue))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((tensor, future, extra))
        return await future

    async def _batch_loop(self, queue: asyncio.Queue) -> None:
        """Adaptive batching: take what is waiting (up to max_batch_size), wait briefly for more.

        Ends at the stop marker that retirement puts in the queue.
        """
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is _STOP:
                return
            items = [first]
            deadline = time.perf_counter() + self.batch_wait_ms / 1000
            while len(items) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if queue.empty() and remaining <= 0:
                    break
                try:
                    item = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if item is _STOP:
                    stopping = True
                    break
                items.append(item)
            live = [item for item in items if not item[1].done()]
            if live:
                await self._run(live)

    async def _run(self, live: list[tuple[np.ndarray, asyncio.Future, tuple[str, ...]]]) -> None:
        """One ONNX Runtime call for the batch; an item with ``extra`` outputs gets (logits, *extra) rows."""
        extra = tuple(dict.fromkeys(name for _, _, wanted in live for name in wanted))
        try:
            start = time.perf_counter()
            batch = np.stack([t for t, _, _ in live])
            if extra:
                outputs = await asyncio.to_thread(self.model.run, (LOGITS, *extra), batch)
            else:
                outputs = [await asyncio.to_thread(self.model.logits, batch)]
            if self.on_batch is not None:
                self.on_batch(self, len(live), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - every waiting request hears of the failure
            for _, f, _ in live:
                if not f.done():
                    f.set_exception(exc)
            return
        by_name = dict(zip(extra, outputs[1:], strict=True))
        for i, (_, f, wanted) in enumerate(live):
            if not f.done():
                f.set_result((outputs[0][i], *(by_name[n][i] for n in wanted)) if wanted else outputs[0][i])
