"""ONNX Runtime for one model version: providers chosen deliberately, a synchronous model, top-k.

The CUDA provider is used when asked for and present; ``cuda`` without a working CUDA provider is an
error, never a silent CPU fallback. :class:`OnnxModel` is what batch jobs, export checks and the
HTTP side share; the HTTP side adds its batching queue around it (``service.http.served``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
WARMUP_BATCH_SIZES = (1, 8, 32)


class EngineError(RuntimeError):
    pass


def check_device(device: Device) -> None:
    """Raise EngineError when ``device`` cannot work here at all (a start-up error, not one model's)."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise EngineError(f"IMGCLF_DEVICE=cuda but onnxruntime has no CUDA provider (available: {available})")


def create_session(
    model_path: str | os.PathLike[str] | bytes, device: Device = "cpu", intra_op_threads: int = 0
) -> ort.InferenceSession:
    """A session on the asked device; ``cuda`` without a working CUDA provider is an error.

    ``model_path`` may be the model's bytes (what a Ray actor on another node receives).
    """
    check_device(device)
    available = ort.get_available_providers()
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
class OnnxModel:
    """One model version in ONNX Runtime: its manifest and session, called synchronously."""

    manifest: Manifest
    session: ort.InferenceSession | None
    load_seconds: float = 0.0
    _provider: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, model: str | os.PathLike[str] | bytes, manifest: Manifest, device: Device = "cpu",
             threads: int = 0) -> OnnxModel:
        """``model`` is the ONNX file's path, or its bytes (what a Ray actor on another node receives)."""
        start = time.perf_counter()
        session = create_session(model, device, threads)
        return cls(manifest, session, time.perf_counter() - start)

    @property
    def key(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @property
    def provider(self) -> str:
        """The execution provider; still known after the session is dropped (for metrics)."""
        if self._provider is None:
            self._provider = self._session().get_providers()[0]
        return self._provider

    def _session(self) -> ort.InferenceSession:
        if self.session is None:
            raise EngineError(f"{self.key} has released its session")
        return self.session

    def warm_up(self, max_batch_size: int = max(WARMUP_BATCH_SIZES)) -> None:
        """Run every batch size bucket once, so the first requests do not pay for it."""
        spec = self.manifest.preprocessing
        for size in WARMUP_BATCH_SIZES:
            if size <= max_batch_size:
                run_logits(self._session(), np.zeros((size, spec.channels, *spec.input_size), np.float32))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return run_logits(self._session(), batch)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a batch (temperature from the manifest)."""
        return softmax(self.logits(batch), self.manifest.temperature)

    def top_k(self, probs: np.ndarray, k: int) -> list[Prediction]:
        return top_k(probs, self.manifest.labels, k)
