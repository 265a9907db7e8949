"""Triton's statistics extension: what each model version did in this worker, counted as Triton counts it.

Two sources, both per model version and per worker process (like every metric of a worker; with
several workers a client sees the one that answered it):

- :class:`Executions`, one per :class:`~service.http.served.ServedModel`, records every batch the
  model ran, whatever front door its items came from (/classify, /classify_batch, /explain, V2):
  ``inference_count`` (items run), ``execution_count`` (ONNX Runtime runs, one per batch),
  ``batch_stats`` (per batch size: runs and the time to stack the inputs, run, split the outputs) and
  the time of the last one. They restart when a reload loads the version anew, as Triton's do.
- :class:`InferenceStats`, one per worker (``Worker.stats``), counts V2 inference requests (REST and
  gRPC, unary and streaming) once each: ``success`` / ``fail`` with their time from the model's pick to
  the encoded answer, and for a success its ``queue``, ``compute_input``, ``compute_infer`` and
  ``compute_output`` times. A V2 request of N items sends N items through the batching queue, so a
  request's times are those of its item whose batch ended last: that item's wait in the queue (from
  its submit to the start of its batch) and its batch's stacking, run and splitting times. Queue and
  the three compute counts are therefore always equal to the success count (perf_analyzer refuses
  unequal compute counts). Decoding the images is in ``success`` only (perf_analyzer's "overhead").

:func:`model_stat` writes one ``$model_stat`` of extension_statistics.md: every key perf_analyzer reads,
counts and nanoseconds as non-negative integers, the version as a string, no response cache (zeros).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.http.served import ServedModel

_REQUEST_KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """Triton's ``StatisticDuration``: how many times, and their total in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(int(ns), 0)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(frozen=True)
class BatchRun:
    """One execution of the model: its size, its start (``time.perf_counter_ns``) and its three phases."""

    size: int
    started_ns: int
    input_ns: int  # stacking the items' tensors into one batch
    infer_ns: int  # the ONNX Runtime run
    output_ns: int  # splitting the outputs into one row per item

    @property
    def ended_ns(self) -> int:
        return self.started_ns + self.input_ns + self.infer_ns + self.output_ns


@dataclass(frozen=True)
class ItemTiming:
    """What one item of the batching queue learns: how long it waited, and the batch it went in."""

    queued_ns: int  # from its submit to the start of its batch
    batch: BatchRun


def slowest(timings: list[ItemTiming]) -> ItemTiming | None:
    """The timing that stands for a request of several items: the item whose batch ended last."""
    return max(timings, key=lambda t: (t.batch.ended_ns, t.queued_ns), default=None)


def _epoch_ms() -> int:
    return time.time_ns() // 1_000_000


class Executions:
    """One model version's batch runs. Written from the batching queue's thread, read on the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.items = 0
        self.last_ms = 0
        self._sizes: dict[int, tuple[Duration, Duration, Duration]] = {}

    def record(self, run: BatchRun) -> None:
        with self._lock:
            self.count += 1
            self.items += run.size
            self.last_ms = _epoch_ms()
            phases = self._sizes.setdefault(run.size, (Duration(), Duration(), Duration()))
            for duration, ns in zip(phases, (run.input_ns, run.infer_ns, run.output_ns), strict=True):
                duration.add(ns)

    def snapshot(self) -> dict[str, Any]:
        """``inference_count``, ``execution_count``, ``batch_stats`` (by batch size) and the last run's time."""
        with self._lock:
            batches = [{"batch_size": size, "compute_input": phases[0].as_dict(),
                        "compute_infer": phases[1].as_dict(), "compute_output": phases[2].as_dict()}
                       for size, phases in sorted(self._sizes.items())]
            return {"inference_count": self.items, "execution_count": self.count, "batch_stats": batches,
                    "last_ms": self.last_ms}


@dataclass
class RequestCounts:
    """One model version's V2 requests (see the module docstring for what each counts)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    last_ms: int = 0

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``$inference_stats``, with the response cache imgclf does not have as zeros."""
        zero = Duration().as_dict()
        return {**{key: getattr(self, key).as_dict() for key in _REQUEST_KEYS}, "cache_hit": zero, "cache_miss": zero}


class InferenceStats:
    """One worker's V2 request statistics, per model version; on the event loop only (no locks)."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[ServedModel, RequestCounts]] = {}

    def counts(self, served: ServedModel) -> RequestCounts:
        """``served``'s counts; a version loaded anew by a reload starts from zero, as its executions do."""
        held = self._models.get(served.key)
        if held is None or held[0] is not served:
            held = self._models[served.key] = (served, RequestCounts())
        return held[1]

    def succeeded(self, served: ServedModel, ns: int, timing: ItemTiming | None) -> None:
        """A V2 request answered in ``ns``; ``timing``: its slowest item (None: it ran no item)."""
        counts = self.counts(served)
        counts.success.add(ns)
        counts.last_ms = _epoch_ms()
        batch = timing.batch if timing is not None else BatchRun(0, 0, 0, 0, 0)
        counts.queue.add(timing.queued_ns if timing is not None else 0)
        counts.compute_input.add(batch.input_ns)
        counts.compute_infer.add(batch.infer_ns)
        counts.compute_output.add(batch.output_ns)

    def failed(self, served: ServedModel, ns: int) -> None:
        """A V2 request for ``served`` that failed after the model was picked (bad input, timeout, error)."""
        counts = self.counts(served)
        counts.fail.add(ns)
        counts.last_ms = _epoch_ms()

    def forget(self, retired: list[ServedModel]) -> None:
        """Drop the counts of models a reload retired."""
        for served in retired:
            held = self._models.get(served.key)
            if held is not None and held[0] is served:
                del self._models[served.key]

    def model_stat(self, served: ServedModel, name: str | None = None) -> dict[str, Any]:
        """``served``'s ``$model_stat``, under ``name`` when a request named it otherwise (a view of it)."""
        held = self._models.get(served.key)
        counts = held[1] if held is not None and held[0] is served else RequestCounts()
        return model_stat(name or served.manifest.name, served.manifest.version, counts,
                          served.executions.snapshot())


def model_stat(name: str, version: int, counts: RequestCounts, executions: dict[str, Any]) -> dict[str, Any]:
    """One ``$model_stat`` of extension_statistics.md (also the gRPC ``ModelStatistics``, field for field)."""
    return {
        "name": name, "version": str(version),
        "last_inference": max(counts.last_ms, executions["last_ms"]),
        "inference_count": executions["inference_count"], "execution_count": executions["execution_count"],
        "inference_stats": counts.as_dict(), "response_stats": {},
        "batch_stats": executions["batch_stats"], "memory_usage": [],
    }
