"""The per-batch function of a batch job: paths in, one row per path out.

The same :class:`Scorer` runs in the local worker processes and in the Ray
actors, and it walks the same path as the HTTP service: ``image_to_tensor``
with the model's own preprocessing spec, then the engine's calibrated
probabilities and top-k.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.batch.inputs import read_input
from service.engine import Device, ModelEngine, create_session, top_k
from service.manifest import Manifest
from service.preprocessing import DecodeLimits, ImageInputError, image_to_tensor

log = logging.getLogger(__name__)

Item = tuple[int, str]  # (position in the input listing, path)


@dataclass(frozen=True, slots=True)
class Row:
    """One input's outcome. Bad files are rows too: a batch job never stops for one."""

    index: int
    path: str
    status: Literal["ok", "error"]
    labels: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    error_kind: str | None = None
    error_message: str | None = None


def error_row(index: int, path: str, kind: str, message: str) -> Row:
    return Row(index, path, "error", error_kind=kind, error_message=message)


class Scorer:
    """One ONNX Runtime session and the settings to score batches of files with it."""

    def __init__(
        self, model: str | os.PathLike[str] | bytes, manifest: Manifest, *, top_k: int, batch_size: int,
        limits: DecodeLimits, device: Device = "cpu", threads: int = 1,
    ) -> None:
        self.engine = ModelEngine(manifest, create_session(model, device, threads), load_seconds=0.0)
        self.top_k, self.batch_size, self.limits = top_k, batch_size, limits

    def tensor(self, data: bytes) -> np.ndarray:
        return image_to_tensor(data, self.engine.manifest.preprocessing, self.limits)

    def score(self, items: Sequence[Item]) -> list[Row]:
        """Rows for ``items`` in their order; files are decoded one by one and inferred in batches."""
        rows: list[Row | None] = [None] * len(items)
        pending: list[tuple[int, np.ndarray]] = []  # (position in items, tensor)
        for position, (index, path) in enumerate(items):
            try:
                pending.append((position, self.tensor(read_input(path, self.limits.max_bytes))))
            except ImageInputError as exc:
                rows[position] = error_row(index, path, exc.kind, str(exc))
            except OSError as exc:
                rows[position] = error_row(index, path, "read_error", f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug, not the file's fault: record it and keep the job going
                log.exception("unexpected error on %s", path)
                rows[position] = error_row(index, path, "internal_error", f"{type(exc).__name__}: {exc}")
            if len(pending) == self.batch_size:
                self._infer(pending, items, rows)
                pending = []
        if pending:
            self._infer(pending, items, rows)
        return rows  # type: ignore[return-value] - every position is filled above

    def _infer(self, pending: list[tuple[int, np.ndarray]], items: Sequence[Item], rows: list[Row | None]) -> None:
        probs = self.engine.probabilities(np.stack([t for _, t in pending]))
        labels = self.engine.manifest.labels
        for (position, _), p in zip(pending, probs, strict=True):
            index, path = items[position]
            best = top_k(p, labels, self.top_k)
            rows[position] = Row(index, path, "ok", tuple(b.label for b in best), tuple(b.score for b in best))
