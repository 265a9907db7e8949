"""The answer's tensors, transport-neutral: probabilities, logits and the classification extension.

Classification (Triton ``extension_classification.md``): a requested output with
``parameters.classification = K`` comes back as BYTES ``[N, K]`` of ``"score:index:label"``, best
first. Scores are printed with 9 significant digits, which round-trips a float32 exactly, so the string
and the FP32 tensor agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.http.v2.facts import LOGITS, PROBABILITIES, ModelFacts
from service.http.v2.request import InferRequest, OutputRequest


@dataclass(frozen=True)
class OutputTensor:
    """One output to send: ``values`` is float32 ``[N, K]`` for FP32, a list of bytes (row-major) for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]
    binary: bool


def classification_strings(values: np.ndarray, labels: tuple[str, ...], k: int) -> list[bytes]:
    """Row-major ``"score:index:label"`` elements, K per row, highest score first (ties: lower index)."""
    out: list[bytes] = []
    for row in np.asarray(values, dtype=np.float32):
        for index in np.argsort(-row, kind="stable")[:k]:
            out.append(f"{float(row[index]):.9g}:{int(index)}:{labels[index]}".encode())
    return out


def build_outputs(request: InferRequest, facts: ModelFacts, probabilities: np.ndarray,
                  logits: np.ndarray | None = None) -> list[OutputTensor]:
    """The requested outputs for ``probabilities`` (and ``logits``) of the request's N items.

    ``logits`` may be None only when the request did not ask for them (check ``request.wants_logits``
    before running the model); anything else is a programming error, not a client's.
    """
    n = request.batch_size
    arrays = {PROBABILITIES: np.asarray(probabilities, dtype=np.float32)}
    if logits is not None:
        arrays[LOGITS] = np.asarray(logits, dtype=np.float32)
    for name, array in arrays.items():
        if array.shape != (n, facts.num_labels):
            raise ValueError(f"{name} has shape {array.shape}, expected {(n, facts.num_labels)}")
    return [_one(spec, arrays, facts) for spec in request.outputs]


def _one(spec: OutputRequest, arrays: dict[str, np.ndarray], facts: ModelFacts) -> OutputTensor:
    if spec.name not in arrays:
        raise ValueError(f"output {spec.name!r} was requested but not computed")
    values = arrays[spec.name]
    if spec.classification:
        strings = classification_strings(values, facts.labels, spec.classification)
        return OutputTensor(spec.name, "BYTES", (values.shape[0], spec.classification), strings, spec.binary)
    return OutputTensor(spec.name, "FP32", tuple(values.shape), values, spec.binary)
