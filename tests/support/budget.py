"""Bounds on work in CPU seconds, never in wall-clock seconds.

"Refused quickly" means "refused without doing the work". CPU time measures the work and does not
grow when other processes share the cores, so these bounds hold on a busy machine (two CPU hogs
beside the suite); a wall-clock bound fails there for reasons that have nothing to do with the code.
Wall-clock time appears in the tests only as generous deadlines that catch hangs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from imgclf.devserver import tree_cpu_seconds


@dataclass
class CpuUsage:
    """CPU seconds (user + system) spent inside a ``cpu_seconds`` block; set when the block ends."""

    seconds: float = 0.0


@contextmanager
def cpu_seconds(pid: int | None = None) -> Iterator[CpuUsage]:
    """CPU time of the block's work: all threads of this process, or of process tree ``pid``.

    All threads, not just the caller's, so that work handed to a pool is counted too.
    """
    def now() -> float:
        return time.process_time() if pid is None else tree_cpu_seconds(pid)

    usage = CpuUsage()
    start = now()
    try:
        yield usage
    finally:
        usage.seconds = now() - start
