"""ONNX Runtime for one model version: providers chosen deliberately, batching, top-k.

The CUDA provider is used when asked for and present; ``cuda`` without a
working CUDA provider is an error, never a silent CPU fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest
from service.repository import ModelVersion

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
WARMUP_BATCH_SIZES = (1, 8, 32)


class EngineError(RuntimeError):
    pass


class EngineRetiredError(EngineError):
    """The engine was replaced by a reload and has released its session; pick the current one."""


_STOP = object()  # put in an engine's queue to end its batching task


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas (default: 8 per core), before the worker's threads start allocating.

    Decode threads, ONNX Runtime's pools and the sessions each reload builds and drops spread over
    many arenas, each keeping its own high-water mark: in the soak (benchmarks/soak.py, 20,000
    requests, 20 reloads) RSS grew 54 MB after warm-up with the default, and still rising; 33 MB
    with this call in the worker (26 MB with MALLOC_ARENA_MAX=2 for the whole process tree), level
    after about 20 reloads, at the same throughput. False where there is no glibc (nothing to do).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))


def release_memory() -> None:
    """Hand freed heap back to the OS. glibc keeps what a dropped session freed (tens of MB per
    reload, spread over threads' arenas) unless asked; without this RSS climbs with every reload."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def create_session(
    model_path: str | os.PathLike[str] | bytes, device: Device = "cpu", intra_op_threads: int = 0
) -> ort.InferenceSession:
    """A session on the asked device; ``cuda`` without a working CUDA provider is an error.

    ``model_path`` may be the model's bytes (what a Ray actor on another node receives).
    """
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise EngineError(f"IMGCLF_DEVICE=cuda but onnxruntime has no CUDA provider (available: {available})")
    providers = [CUDA, CPU] if device in ("cuda", "auto") and CUDA in available else [CPU]
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = model_path if isinstance(model_path, bytes) else str(Path(model_path))
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise EngineError(f"CUDA provider failed to start; the session runs on {session.get_providers()}")
    log.debug("loaded a session on %s", session.get_providers()[0])
    return session


def run_logits(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Logits for a float32 NCHW batch."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0].astype(np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [Prediction(labels[i], int(i), float(probs[i])) for i in order]


@dataclass
class ModelEngine:
    """One loaded model version: its session, manifest and a batching queue.

    Lifecycle under hot reload: a request holds a :meth:`lease` from picking the
    engine to its answer; :meth:`retire` marks a replaced engine, and once its
    last lease ends the batching task stops and the session is dropped, so its
    memory goes back. Leases, retire and the batching task all live on the one
    event loop of a worker, which is what makes "pick and lease" atomic.
    """

    manifest: Manifest
    session: ort.InferenceSession | None
    load_seconds: float
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    on_batch: Callable[[ModelEngine, int, float], None] | None = field(default=None, repr=False)  # metrics
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _leases: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    _provider: str | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)  # the batching task, ended on retirement

    @classmethod
    def load(cls, version: ModelVersion, device: Device, threads: int, max_batch_size: int = 32,
             batch_wait_ms: float = 2.0) -> ModelEngine:
        start = time.perf_counter()
        session = create_session(version.model_path, device, threads)
        return cls(version.manifest, session, time.perf_counter() - start, max_batch_size, batch_wait_ms)

    @property
    def key(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @property
    def provider(self) -> str:
        """The execution provider; still known after retirement (for metrics)."""
        if self._provider is None:
            self._provider = self._session().get_providers()[0]
        return self._provider

    @property
    def closed(self) -> bool:
        """Retired and drained: the session is gone."""
        return self.session is None

    def _session(self) -> ort.InferenceSession:
        if self.session is None:
            raise EngineRetiredError(f"{self.key} was retired by a reload")
        return self.session

    def warm_up(self) -> None:
        """Run every batch size bucket once, so the first requests do not pay for it."""
        spec = self.manifest.preprocessing
        for size in WARMUP_BATCH_SIZES:
            if size <= self.max_batch_size:
                run_logits(self._session(), np.zeros((size, spec.channels, *spec.input_size), np.float32))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a batch (temperature from the manifest)."""
        return softmax(run_logits(self._session(), batch), self.manifest.temperature)

    # --- lifecycle ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self) -> Iterator[ModelEngine]:
        """Hold the engine for one request: a reload retires it only after every lease ends."""
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
        """Drop the session now (an engine that never served, e.g. a refused reload's)."""
        self._retired = True
        self._shut_down()

    def _shut_down(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(_STOP)  # the batching task ends after what is already queued
            self._queue = None
        if self.session is not None:
            self.session = None  # the last reference: ONNX Runtime frees weights and arena
            release_memory()
            log.info("retired %s", self.key)

    async def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Probabilities for one image; concurrent callers are batched together."""
        self._session()  # a retired engine fails fast instead of starting a new batching task
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._batch_loop(self._queue))
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((tensor, future))
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
            live = [(t, f) for t, f in items if not f.done()]
            if not live:
                continue
            try:
                start = time.perf_counter()
                probs = await asyncio.to_thread(self.probabilities, np.stack([t for t, _ in live]))
                if self.on_batch is not None:
                    self.on_batch(self, len(live), time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - every waiting request hears of the failure
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), p in zip(live, probs, strict=True):
                if not f.done():
                    f.set_result(p)
