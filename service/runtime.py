"""ONNX Runtime for one model version: providers chosen deliberately, a synchronous model, top-k.

The CUDA provider is used when asked for and present; ``cuda`` without a working CUDA provider is an
error, never a silent CPU fallback. :class:`OnnxModel` is what batch jobs, export checks and the
HTTP side share; the HTTP side adds its batching queue around it (``service.http.batching``), and
answers are made from its logits by ``service.answer``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
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


class SessionError(RuntimeError):
    """An ONNX Runtime session cannot run: the device is missing, or the session was released."""


def check_device(device: Device) -> None:
    """Raise SessionError when ``device`` cannot work here at all (a start-up error, not one model's)."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise SessionError(f"IMGCLF_DEVICE=cuda but onnxruntime has no CUDA provider (available: {available})")


def on_cuda(device: Device) -> bool:
    """Whether a session for ``device`` runs on CUDA (``auto``: when the provider is installed)."""
    return device in ("cuda", "auto") and CUDA in ort.get_available_providers()


def create_session(
    model_path: str | os.PathLike[str] | bytes, device: Device = "cpu", intra_op_threads: int = 0
) -> ort.InferenceSession:
    """A session on the asked device; ``cuda`` without a working CUDA provider is an error.

    ``model_path`` may be the model's bytes (what a Ray actor on another node receives).
    """
    check_device(device)
    providers = [CUDA, CPU] if on_cuda(device) else [CPU]
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = model_path if isinstance(model_path, bytes) else str(Path(model_path))
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise SessionError(f"CUDA provider failed to start; the session runs on {session.get_providers()}")
    log.debug("loaded a session on %s", session.get_providers()[0])
    return session


LOGITS = "logits"  # the output export names; a graph for explanations adds "features" beside it


def logits_output(session: ort.InferenceSession) -> str:
    """The logits output by name: ``logits`` when the graph has one, else its first output (older files)."""
    names = [o.name for o in session.get_outputs()]
    return LOGITS if LOGITS in names else names[0]


def run_outputs(session: ort.InferenceSession, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
    """The named outputs for a float32 NCHW batch (ONNX Runtime computes only what they need)."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
    return [np.asarray(out, dtype=np.float32) for out in session.run(list(names), feed)]


def run_logits(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Logits for a float32 NCHW batch; only the logits output is asked for, even when the graph has more."""
    return run_outputs(session, [logits_output(session)], batch)[0]


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
    directory: Path | None = None  # the version directory, when loaded from a file (explanations read it)

    @classmethod
    def load(cls, model: str | os.PathLike[str] | bytes, manifest: Manifest, device: Device = "cpu",
             threads: int = 0) -> OnnxModel:
        """``model`` is the ONNX file's path, or its bytes (what a Ray actor on another node receives)."""
        start = time.perf_counter()
        session = create_session(model, device, threads)
        directory = None if isinstance(model, bytes) else Path(model).parent
        return cls(manifest, session, time.perf_counter() - start, directory=directory)

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
            raise SessionError(f"{self.key} has released its session")
        return self.session

    def warm_up(self, max_batch_size: int = max(WARMUP_BATCH_SIZES)) -> None:
        """Run every batch size bucket once, so the first requests do not pay for it."""
        spec = self.manifest.preprocessing
        for size in WARMUP_BATCH_SIZES:
            if size <= max_batch_size:
                run_logits(self._session(), np.zeros((size, spec.channels, *spec.input_size), np.float32))
        explain = self.manifest.explain
        if explain is not None and explain.feature_output:  # the first POST /explain must not pay for its plan
            self.run([LOGITS, explain.feature_output], np.zeros((1, spec.channels, *spec.input_size), np.float32))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return run_logits(self._session(), batch)

    def run(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        """Several outputs at once, e.g. ``["logits", "features"]`` for explanations (``LOGITS``: by name)."""
        session = self._session()
        return run_outputs(session, [logits_output(session) if n == LOGITS else n for n in names], batch)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a batch (temperature from the manifest): whole-array scoring for
        evaluations; an answer to a request is ``service.answer.answer``."""
        return softmax(self.logits(batch), self.manifest.temperature)
