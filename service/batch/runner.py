"""Run a batch job: list lazily, score in parallel, write durable chunks, resume after a crash.

The unit of work is a batch (``batch_size`` files, decoded and inferred by one worker); the unit of
durability is a chunk (``chunk_size`` files, written and journalled together, ``job_state``). This
module only picks the executor (``local`` or ``ray_engine``, both fed the same chunks) and writes
what comes back.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

from service.batch.inputs import InputError, count_inputs, iter_inputs
from service.batch.job import BatchOptions, BatchSummary, Chunk, ScorerSpec, chunks
from service.batch.job_state import JobIdentity, JobState, JobStateError, OutputFormat
from service.batch.local import local_results, worker_pool
from service.batch.outputs import open_output
from service.batch.progress import progress_bar
from service.precision import served_file
from service.preprocessing import DecodeLimits
from service.repository import ModelRef, open_repository
from service.settings import Settings, usable_cores

log = logging.getLogger(__name__)

__all__ = ["BatchOptions", "BatchSummary", "run_batch", "usable_cores"]  # the names callers import from here


class PendingChunks:
    """The chunks still to score, skipping those the interrupted run finished; counts every chunk listed.

    A finished chunk must list the same inputs as before (same digest); :meth:`check_complete`, once
    the listing is exhausted, refuses a listing that has become shorter.
    """

    def __init__(self, all_chunks: Iterable[Chunk], state: JobState) -> None:
        self._chunks, self._state = all_chunks, state
        self.listed = 0

    def __iter__(self) -> Iterator[Chunk]:
        for chunk in self._chunks:
            self.listed += 1
            done = self._state.done.get(chunk.id)
            if done is None:
                yield chunk
            elif done.digest != chunk.digest:
                raise JobStateError(
                    f"cannot resume: the inputs changed since the interrupted run (chunk {chunk.id}, from input "
                    f"#{chunk.items[0][0]}, lists other files); rerun with --overwrite")

    def check_complete(self) -> None:
        if any(chunk_id >= self.listed for chunk_id in self._state.done):
            raise JobStateError("cannot resume: the inputs changed since the interrupted run (fewer inputs now); "
                                "rerun with --overwrite")


def run_batch(options: BatchOptions, settings: Settings, *, show_progress: bool = False) -> BatchSummary:
    """Score every input of ``options.source`` into ``options.out``; raises on a job failure only."""
    started = time.perf_counter()
    ref = ModelRef.parse(options.model)
    repo = open_repository(settings.model_repo, settings.repo_cache, settings.store_writes)
    version = repo.get(ref.name, ref.version)  # verified sha256 + schema (downloaded first from a URL)
    manifest = version.manifest
    if options.top_k > len(manifest.labels):
        raise ValueError(f"--top-k {options.top_k} is more than the model's {len(manifest.labels)} labels")
    identity = JobIdentity(
        source=options.source, model=manifest.name, version=manifest.version,
        format=options.format or OutputFormat.for_path(Path(str(options.out))), top_k=options.top_k,
        chunk_size=options.chunk_size, ordered=options.ordered)
    listing = iter_inputs(options.source)
    first = next(listing, None)  # fail on a bad INPUT before touching the output
    if first is None:
        raise InputError(f"no images found in {options.source}")
    state = JobState.open(open_output(options.out), identity, resume=options.resume, overwrite=options.overwrite,
                          kill_at=options.kill_at)
    resumed = state.rows_done
    workers = options.workers or usable_cores()
    processed = 0
    if not state.finished:  # else only the interrupted run's clean-up was left
        device = settings.device if options.engine == "local" else "cpu"
        model_file, served = served_file(version, device, settings.precision)  # int8 where the server runs it
        spec = ScorerSpec(str(model_file), served, options.top_k, options.batch_size,
                          DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels), device)
        pending = PendingChunks(chunks(itertools.chain([first], listing), options.chunk_size), state)
        with ExitStack() as stack:
            if options.engine == "ray":
                from service.batch.ray_engine import ray_results  # Ray is an optional extra

                results = ray_results(iter(pending), spec, workers, options.ordered, options.ray_address)
            else:
                pool = stack.enter_context(worker_pool(options.executor, workers, spec))
                results = local_results(pool, iter(pending), options.batch_size, workers, options.ordered)
            advance = stack.enter_context(progress_bar(count_inputs(options.source), resumed, show_progress))
            for chunk, rows in results:
                state.write_chunk(chunk.id, chunk.digest, rows)
                processed += len(rows)
                advance(len(rows))
        pending.check_complete()
    state.finish()
    return _summary(options, state, resumed, processed, workers, time.perf_counter() - started)


def _summary(options: BatchOptions, state: JobState, resumed: int, processed: int, workers: int,
             wall: float) -> BatchSummary:
    kinds: Counter[str] = Counter()
    for entry in state.done.values():
        kinds.update(entry.errors)
    total = state.rows_done
    ok = sum(r.ok for r in state.done.values())
    return BatchSummary(
        out=options.out, model=state.identity.model, version=state.identity.version, total=total, ok=ok,
        error=total - ok, errors_by_kind=dict(kinds), resumed_rows=resumed, processed=processed, wall_s=wall,
        images_per_s=processed / wall if wall > 0 else 0.0, engine=options.engine, workers=workers)
