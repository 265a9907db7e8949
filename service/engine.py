"""ONNX Runtime sessions: providers chosen deliberately, never a silent CPU fallback."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class EngineError(RuntimeError):
    pass


def create_session(model_path: str | os.PathLike[str], device: Device = "cpu", intra_op_threads: int = 0) -> ort.InferenceSession:
    """A session on the asked device; ``cuda`` without a working CUDA provider is an error."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise EngineError(f"IMGCLF_DEVICE=cuda but onnxruntime has no CUDA provider (available: {available})")
    providers = [CUDA, CPU] if device in ("cuda", "auto") and CUDA in available else [CPU]
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(Path(model_path)), sess_options=options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise EngineError(f"CUDA provider failed to initialise for {model_path}; session runs on {session.get_providers()}")
    log.info("loaded %s on %s", model_path, session.get_providers()[0])
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
