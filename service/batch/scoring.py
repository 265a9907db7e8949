"""The per-batch function of a batch job: paths in, one row per path out.

The same :class:`Scorer` runs in the local worker processes and in the Ray
actors, and it walks the same path as the HTTP service: ``image_to_tensor``
with the model's own preprocessing spec, then ``service.answer.answer``
(calibrated scores, top-k, the verdict) on each row of a batch's logits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import numpy as np

from service.answer import answer
from service.batch.inputs import read_input
from service.batch.rows import Item, Row, error_row
from service.manifest import Manifest
from service.preprocessing import DecodeLimits, ImageInputError, image_to_tensor
from service.runtime import Device, OnnxModel

log = logging.getLogger(__name__)

__all__ = ["Item", "Row", "Scorer", "error_row"]  # Row and Item live in rows.py, with their schema


class Scorer:
    """A model and the settings to score batches of files with it."""

    def __init__(self, model: OnnxModel, *, top_k: int, batch_size: int, limits: DecodeLimits) -> None:
        self.model, self.top_k, self.batch_size, self.limits = model, top_k, batch_size, limits

    @classmethod
    def create(
        cls, model: str | os.PathLike[str] | bytes, manifest: Manifest, *, top_k: int, batch_size: int,
        limits: DecodeLimits, device: Device = "cpu", threads: int = 1,
    ) -> Scorer:
        """A scorer with a session of its own (one per worker)."""
        onnx_model = OnnxModel.load(model, manifest, device, threads)
        return cls(onnx_model, top_k=top_k, batch_size=batch_size, limits=limits)

    def score(self, items: Sequence[Item]) -> list[Row]:
        """Rows for files, in their order."""
        max_bytes = self.limits.max_bytes
        return list(self.score_sources((i, path, partial(read_input, path, max_bytes)) for i, path in items))

    def score_sources(self, sources: Iterable[tuple[int, str, Callable[[], bytes]]]) -> Iterator[Row]:
        """Rows in input order for (index, name, read) sources: decoded one by one, inferred in batches.

        Any failure to read or decode becomes that input's error row; nothing else is affected.
        """
        window: list[Row | np.ndarray] = []  # rows and tensors in input order, until a batch is full
        names: list[tuple[int, str]] = []
        tensors = 0
        for index, name, read in sources:
            names.append((index, name))
            try:
                window.append(image_to_tensor(read(), self.model.manifest.preprocessing, self.limits))
                tensors += 1
            except ImageInputError as exc:
                window.append(error_row(index, name, exc.kind, str(exc)))
            except OSError as exc:
                window.append(error_row(index, name, "read_error", f"{type(exc).__name__}: {exc}"))
            except Exception as exc:  # a bug, not the file's fault: record it and keep the job going
                log.exception("unexpected error on %s", name)
                window.append(error_row(index, name, "internal_error", f"{type(exc).__name__}: {exc}"))
            if tensors == self.batch_size:
                yield from self._resolve(window, names)
                window, names, tensors = [], [], 0
        yield from self._resolve(window, names)

    def _resolve(self, window: list[Row | np.ndarray], names: list[tuple[int, str]]) -> Iterator[Row]:
        batch = [t for t in window if isinstance(t, np.ndarray)]
        logits = iter(self.model.logits(np.stack(batch)) if batch else [])
        for entry, (index, name) in zip(window, names, strict=True):
            if isinstance(entry, Row):
                yield entry
                continue
            result = answer(next(logits), self.model.manifest, self.top_k)
            best = result.predictions
            yield Row(index, name, "ok", tuple(b.label for b in best), tuple(b.score for b in best),
                      confident=result.verdict.confident)
