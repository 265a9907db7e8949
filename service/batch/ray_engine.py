"""``--engine ray``: the same per-batch function, run by Ray Data on a pool of actors.

Each actor holds one single-threaded ONNX Runtime session (built once, like a
local worker) and scores batches with :meth:`Scorer.score`. The model travels
to the actors through Ray's object store, so nodes need no copy of the
repository; the inputs must be readable from every node (a shared filesystem
or fsspec URLs). Rows come back to the driver, which writes the durable,
resumable output exactly as the local engine does.

On a cluster: ``RAY_ADDRESS=ray://head:10001 imgclf batch ... --engine ray``
(or ``--ray-address``); ``--workers`` sets the number of actors, one CPU each.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from service.batch.job import Chunk, ScorerSpec
from service.batch.rows import Row, to_columns

log = logging.getLogger(__name__)

RAY_EXTRA_HINT = "--engine ray needs the ray extra: pip install 'imgclf[ray]'"


class RayScorer:
    """A Ray Data actor: one scorer, built from the spec once per actor."""

    def __init__(self, spec: ScorerSpec, model_ref: Any) -> None:
        import ray

        self.scorer = replace(spec, model=ray.get(model_ref)).build()
        self.model, self.version = spec.manifest.name, spec.manifest.version

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        """Rows as the job's records (rows.py, the one schema), plus the chunk each belongs to."""
        items = list(zip((int(i) for i in batch["index"]), (str(p) for p in batch["path"]), strict=True))
        records = (row.to_record(self.model, self.version) for row in self.scorer.score(items))
        return to_columns(records, extra={"chunk": [int(c) for c in batch["chunk"]]})


def ray_results(
    pending: Iterator[Chunk], spec: ScorerSpec, workers: int, ordered: bool, address: str | None
) -> Iterator[tuple[Chunk, list[Row]]]:
    """Finished chunks, regrouped from Ray's row stream (in input order when ``ordered``)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RuntimeError(f"{RAY_EXTRA_HINT} ({exc})") from exc
    todo = {chunk.id: chunk for chunk in pending}  # the driver holds the list of pending paths
    if not todo:
        return
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = ordered
    context.enable_progress_bars = False
    items = [{"chunk": c.id, "index": i, "path": p} for c in todo.values() for i, p in c.items]
    model_ref = ray.put(Path(str(spec.model)).read_bytes() if isinstance(spec.model, str) else spec.model)
    dataset = ray.data.from_items(items).map_batches(
        RayScorer, batch_size=spec.batch_size, concurrency=workers, num_cpus=1,
        fn_constructor_kwargs={"spec": replace(spec, model=b""), "model_ref": model_ref},
    )
    del items
    arrived: defaultdict[int, list[Row]] = defaultdict(list)
    for r in dataset.iter_rows():
        chunk_id = int(r["chunk"])
        arrived[chunk_id].append(Row.from_record(r))
        chunk = todo[chunk_id]
        if len(arrived[chunk_id]) == len(chunk.items):
            rows = sorted(arrived.pop(chunk_id), key=lambda row: row.index)
            del todo[chunk_id]
            yield chunk, rows
