"""ONNX Runtime for one model version: providers chosen deliberately, batching, top-k.

The CUDA provider is used when asked for and present; ``cuda`` without a
working CUDA provider is an error, never a silent CPU fallback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
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
    """One loaded model version: its session, manifest and a batching queue."""

    manifest: Manifest
    session: ort.InferenceSession
    load_seconds: float
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    on_batch: Callable[[ModelEngine, int, float], None] | None = field(default=None, repr=False)  # metrics
    _queue: asyncio.Queue | None = field(default=None, repr=False)

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
        return self.session.get_providers()[0]

    def warm_up(self) -> None:
        """Run every batch size bucket once, so the first requests do not pay for it."""
        spec = self.manifest.preprocessing
        for size in WARMUP_BATCH_SIZES:
            if size <= self.max_batch_size:
                run_logits(self.session, np.zeros((size, spec.channels, *spec.input_size), np.float32))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a batch (temperature from the manifest)."""
        return softmax(run_logits(self.session, batch), self.manifest.temperature)

    async def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Probabilities for one image; concurrent callers are batched together."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batch_loop(self._queue))
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((tensor, future))
        return await future

    async def _batch_loop(self, queue: asyncio.Queue) -> None:
        """Adaptive batching: take what is waiting (up to max_batch_size), wait briefly for more."""
        while True:
            items = [await queue.get()]
            deadline = time.perf_counter() + self.batch_wait_ms / 1000
            while len(items) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if queue.empty() and remaining <= 0:
                    break
                try:
                    items.append(queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
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
