"""Adaptive batching: concurrent callers' items answered by one call of a batch function.

Modelled on Ray Serve's ``serve/batching.py``: the queue is its own small class that the model code
never sees, and it knows nothing about ONNX or manifests; it is given a synchronous function from a
list of items to one result per item (run off the event loop, in a thread) and hands each caller its
row. Adaptive: a batch takes what is already waiting (up to ``max_batch_size``) and waits at most
``wait_ms`` for more, so a lone request pays at most ``wait_ms`` and a busy server fills its batches.

Failure and shutdown: an exception in a batch reaches every caller waiting on it (each request hears of
the failure, none hangs, and the loop goes on with the next batch); an item whose caller gave up (its
future cancelled) is skipped rather than computed; :meth:`BatchQueue.close` ends the loop after what is
already queued, so the requests in flight when a model is retired still get their answers.

Everything (the queue, the futures, the loop task) lives on one event loop: the task starts on the
running loop at the first :meth:`BatchQueue.submit`, which lets the owner be built where no loop runs
yet (a worker loading its catalog).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")  # an item, as the caller submits it
R = TypeVar("R")  # its result, one per item

OnBatch = Callable[[int, float], None]  # (batch size, seconds): metrics
_STOP = object()  # put in the queue by close(): the loop ends after what is ahead of it
_Entry = tuple[Any, asyncio.Future[Any]]  # (item, the caller's future)


class BatchQueueClosedError(RuntimeError):
    """submit() after close(): the owner says what that means to its callers."""


class BatchQueue(Generic[T, R]):
    """Items submitted concurrently on one event loop go through ``batch_fn`` together."""

    def __init__(self, batch_fn: Callable[[list[T]], Sequence[R]], max_batch_size: int = 32,
                 wait_ms: float = 2.0, on_batch: OnBatch | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.wait_ms = wait_ms
        self.on_batch = on_batch
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """close() was called: no new items; the loop ends (or has ended) after the queued ones."""
        return self._closed

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The batching loop's task; None until the first submit."""
        return self._task

    async def submit(self, item: T) -> R:
        """``item``'s result, computed in a batch with whatever else is submitted meanwhile."""
        if self._closed:
            raise BatchQueueClosedError("the batching queue is closed")
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._loop(self._queue))
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future  # a cancelled caller cancels the future: the loop skips its item

    def close(self) -> None:
        """No new items; the loop answers what is already queued, then ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None:
            self._queue.put_nowait(_STOP)
            self._queue = None  # the loop holds it until it ends

    async def _loop(self, queue: asyncio.Queue[Any]) -> None:
        """One batch after another, until the stop marker close() puts in the queue."""
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is _STOP:
                return
            entries, stopping = await self._gather(queue, first)
            live = [entry for entry in entries if not entry[1].done()]
            if live:
                await self._run(live)

    async def _gather(self, queue: asyncio.Queue[Any], first: _Entry) -> tuple[list[_Entry], bool]:
        """Take what is waiting (up to max_batch_size), waiting at most wait_ms for more.

        Returns the batch and whether the stop marker came while gathering it.
        """
        entries = [first]
        deadline = time.perf_counter() + self.wait_ms / 1000
        while len(entries) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if queue.empty() and remaining <= 0:
                break
            try:
                entry = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                break
            if entry is _STOP:
                return entries, True
            entries.append(entry)
        return entries, False

    async def _run(self, live: list[_Entry]) -> None:
        """One call of the batch function, off the loop; its results, or its exception, to every caller."""
        items = [item for item, _ in live]
        try:
            start = time.perf_counter()
            results = await asyncio.to_thread(self.batch_fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - every waiting caller hears of the failure
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():  # its caller may have given up while the batch ran
                future.set_result(result)
