"""Run a batch job: list lazily, score in parallel, write durable chunks, resume after a crash.

The unit of work is a batch (``batch_size`` files, decoded and inferred by one
worker); the unit of durability is a chunk (``chunk_size`` files, written and
journalled together). Each worker process holds its own single-threaded ONNX
Runtime session and does both decoding and inference, so ``workers`` = cores
keeps every core busy with no tensor ever crossing a process boundary.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.batch.inputs import InputError, count_inputs, iter_inputs
from service.batch.output import JobIdentity, JobState, JobStateError, OutputFormat
from service.batch.progress import progress_bar
from service.batch.scoring import Item, Row, Scorer
from service.engine import Device
from service.manifest import Manifest
from service.preprocessing import DecodeLimits
from service.repository import ModelRef, ModelRepository
from service.settings import Settings

log = logging.getLogger(__name__)


class BatchOptions(BaseModel):
    """One job, as the CLI flags describe it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="directory, glob, or manifest (one path per line, or CSV with a path column)")
    model: str = Field(description="NAME or NAME:VERSION; NAME means its production version")
    out: Path
    format: OutputFormat | None = Field(default=None, description="default: from the output's suffix, else jsonl")
    top_k: int = Field(default=5, ge=1)
    batch_size: int = Field(default=8, ge=1, description="images per ONNX Runtime call and per worker task; "
                            "single-threaded CPU sessions are fastest at 1-8 (benchmarks/NOTES.md), GPUs want more")
    workers: int = Field(default=0, ge=0, description="parallel workers; 0: one per usable core")
    chunk_size: int = Field(default=512, ge=1, description="rows written and journalled together")
    ordered: bool = Field(default=False, description="write rows in input order (else as chunks finish)")
    resume: bool = False
    overwrite: bool = False
    engine: Literal["local", "ray"] = "local"
    executor: Literal["process", "thread"] = Field(
        default="process", description="local workers: processes (measured faster: no GIL between decoders) or threads")
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: RAY_ADDRESS or a local Ray")


class BatchSummary(BaseModel):
    out: Path
    model: str
    version: int
    total: int
    ok: int
    error: int
    errors_by_kind: dict[str, int]
    resumed_rows: int = Field(description="rows already written by the interrupted run")
    processed: int = Field(description="rows scored by this run")
    wall_s: float
    images_per_s: float = Field(description="processed / wall_s")
    engine: str
    workers: int


@dataclass(frozen=True)
class Chunk:
    id: int
    items: list[Item]
    digest: str = field(repr=False)


@dataclass(frozen=True)
class ScorerSpec:
    """Everything a worker needs to build its own :class:`Scorer` (picklable, sent once)."""

    model: str | bytes  # a path, or the model's bytes for workers on other machines
    manifest: Manifest
    top_k: int
    batch_size: int
    limits: DecodeLimits
    device: Device = "cpu"
    threads: int = 1

    def build(self) -> Scorer:
        return Scorer.create(self.model, self.manifest, top_k=self.top_k, batch_size=self.batch_size,
                             limits=self.limits, device=self.device, threads=self.threads)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunks(paths: Iterator[str], size: int) -> Iterator[Chunk]:
    indexed = enumerate(paths)
    for chunk_id in itertools.count():
        items = list(itertools.islice(indexed, size))
        if not items:
            return
        digest = hashlib.sha256("\n".join(p for _, p in items).encode()).hexdigest()
        yield Chunk(chunk_id, items, digest)


# --- local engine: a pool of workers, each with its own scorer -------------------------------------
_worker = threading.local()  # the worker's scorer: per process for processes, per thread for threads


def _init_worker(spec: ScorerSpec) -> None:
    _worker.scorer = spec.build()


def _score(items: list[Item]) -> list[Row]:
    return _worker.scorer.score(items)


def _ready() -> bool:
    return True


@contextmanager
def worker_pool(kind: str, workers: int, spec: ScorerSpec) -> Iterator[Executor]:
    """A started pool: every worker has built its scorer before the first chunk is sent.

    Processes are forked on Linux (they inherit the imported modules: no second start-up) before
    any thread of ours exists; elsewhere they are spawned.
    """
    if kind == "thread":
        pool: Executor = ThreadPoolExecutor(workers, initializer=_init_worker, initargs=(spec,))
    else:
        method = "fork" if sys.platform == "linux" else "spawn"
        context = multiprocessing.get_context(method)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(spec,))
    with pool:
        for future in [pool.submit(_ready) for _ in range(workers)]:
            future.result()  # a worker that cannot load the model fails the job here, clearly
        yield pool


def _next_finished(
    in_flight: deque[tuple[Chunk, list[Future[list[Row]]]]], ordered: bool
) -> tuple[Chunk, list[Row]]:
    """Take one finished chunk off ``in_flight``: the oldest when ordered, else whichever is done first."""
    while True:
        for position, (chunk, futures) in enumerate(in_flight):
            if ordered or all(f.done() for f in futures):
                del in_flight[position]
                return chunk, [row for f in futures for row in f.result()]
        wait([f for _, fs in in_flight for f in fs if not f.done()], return_when=FIRST_COMPLETED)


def local_results(
    pool: Executor, pending: Iterator[Chunk], batch_size: int, workers: int, ordered: bool
) -> Iterator[tuple[Chunk, list[Row]]]:
    """Finished chunks from a local pool. At most a few batches per worker are queued ahead, so
    memory stays flat however many inputs there are."""
    in_flight: deque[tuple[Chunk, list[Future[list[Row]]]]] = deque()
    for chunk in pending:
        futures = [pool.submit(_score, chunk.items[i:i + batch_size]) for i in range(0, len(chunk.items), batch_size)]
        in_flight.append((chunk, futures))
        limit = max(4 * workers, 2 * len(futures))  # two chunks, so workers never wait on the writer
        while len(in_flight) > 1 and sum(len(fs) for _, fs in in_flight) > limit:
            yield _next_finished(in_flight, ordered)
    while in_flight:
        yield _next_finished(in_flight, ordered)


# --- the job ---------------------------------------------------------------------------------------
def _pending(all_chunks: Iterator[Chunk], state: JobState, seen: list[int]) -> Iterator[Chunk]:
    """Chunks still to score; a chunk the interrupted run finished must list the same inputs."""
    for chunk in all_chunks:
        seen[0] += 1
        record = state.done.get(chunk.id)
        if record is None:
            yield chunk
        elif record.digest != chunk.digest:
            raise JobStateError(
                f"cannot resume: the inputs changed since the interrupted run (chunk {chunk.id}, from input "
                f"#{chunk.items[0][0]}, lists other files); rerun with --overwrite")


def run_batch(options: BatchOptions, settings: Settings, *, show_progress: bool = False) -> BatchSummary:
    """Score every input of ``options.source`` into ``options.out``; raises on a job failure only."""
    started = time.perf_counter()
    ref = ModelRef.parse(options.model)
    version = ModelRepository(settings.model_repo).get(ref.name, ref.version)  # verified sha256 + schema
    manifest = version.manifest
    if options.top_k > len(manifest.labels):
        raise ValueError(f"--top-k {options.top_k} is more than the model's {len(manifest.labels)} labels")
    identity = JobIdentity(
        source=options.source, model=manifest.name, version=manifest.version,
        format=options.format or OutputFormat.for_path(options.out), top_k=options.top_k,
        chunk_size=options.chunk_size, ordered=options.ordered)
    listing = iter_inputs(options.source)
    first = next(listing, None)  # fail on a bad INPUT before touching the output
    if first is None:
        raise InputError(f"no images found in {options.source}")
    state = JobState.open(options.out, identity, resume=options.resume, overwrite=options.overwrite)
    resumed = sum(r.rows for r in state.done.values())
    workers = options.workers or usable_cores()
    spec = ScorerSpec(str(version.model_path), manifest, options.top_k, options.batch_size,
                      DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels),
                      settings.device if options.engine == "local" else "cpu")
    seen = [0]
    pending = _pending(chunks(itertools.chain([first], listing), options.chunk_size), state, seen)
    processed = 0
    with ExitStack() as stack:
        if options.engine == "ray":
            from service.batch.ray_engine import ray_results

            results = ray_results(pending, spec, workers, options.ordered, options.ray_address)
        else:
            pool = stack.enter_context(worker_pool(options.executor, workers, spec))
            results = local_results(pool, pending, options.batch_size, workers, options.ordered)
        advance = stack.enter_context(progress_bar(count_inputs(options.source), resumed, show_progress))
        for chunk, rows in results:
            state.write_chunk(chunk.id, chunk.digest, rows)
            processed += len(rows)
            advance(len(rows))
    if any(chunk_id >= seen[0] for chunk_id in state.done):
        raise JobStateError("cannot resume: the inputs changed since the interrupted run (fewer inputs now); "
                            "rerun with --overwrite")
    state.finish()
    wall = time.perf_counter() - started
    kinds: Counter[str] = Counter()
    for entry in state.done.values():
        kinds.update(entry.errors)
    total = sum(r.rows for r in state.done.values())
    ok = sum(r.ok for r in state.done.values())
    return BatchSummary(
        out=options.out, model=manifest.name, version=manifest.version, total=total, ok=ok, error=total - ok,
        errors_by_kind=dict(kinds), resumed_rows=resumed, processed=processed, wall_s=wall,
        images_per_s=processed / wall if wall > 0 else 0.0, engine=options.engine, workers=workers)
