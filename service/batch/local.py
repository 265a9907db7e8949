"""``--engine local``: a pool of workers on this machine, each with its own scorer.

Each worker holds its own single-threaded ONNX Runtime session and does both decoding and
inference, so ``workers`` = cores keeps every core busy with no tensor ever crossing a process
boundary. Worker processes die with the job's process, however it dies (``kill -9``, the OOM
killer): an orphaned worker would keep its memory and its share of the CPU for nothing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from contextlib import contextmanager

from service.batch.job import Chunk, ScorerSpec
from service.batch.rows import Item, Row

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0  # where prctl is missing: how often a worker checks that its parent is alive

_worker = threading.local()  # the worker's scorer: per process for processes, per thread for threads


def die_with_parent(parent: int) -> None:
    """Exit when process ``parent`` dies. Called first thing in a worker process.

    Linux: the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``; strictly, at the death
    of the parent's thread that forked us, which is the job's main thread: it submits the first task,
    and the pool forks every worker then). Elsewhere a daemon thread polls ``os.getppid()``. SIGKILL,
    not SIGTERM: a worker holds nothing durable (the parent writes every row), so there is nothing to
    clean up, and nothing in the worker can catch or delay it.
    """
    if not _set_pdeathsig(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the kernel was told to tell us
        os._exit(1)


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbol prctl (e.g. a static or exotic libc)
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _init_thread(spec: ScorerSpec) -> None:
    _worker.scorer = spec.build()


def _init_process(spec: ScorerSpec, parent: int) -> None:
    die_with_parent(parent)
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
        pool: Executor = ThreadPoolExecutor(workers, initializer=_init_thread, initargs=(spec,))
    else:
        method = "fork" if sys.platform == "linux" else "spawn"
        context = multiprocessing.get_context(method)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process,
                                   initargs=(spec, os.getpid()))
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
