"""Triton's statistics extension: what each model version did on this server, counted as Triton counts it.

Every statistic is a Prometheus counter of BentoML's registry, as ``/metrics`` is: in multiprocess mode
(BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers) each worker writes its increments to its own
file as they happen, and :func:`model_stats` sums the files of every worker, so a client asking any worker
sees the whole server's counts (perf_analyzer sends its requests on pooled connections and asks for the
statistics on another, which lands on any worker). Without that directory (one process, the in-process
tests) it reads this process's counters. Counts are cumulative per model version (label ``model``,
``name:version``) for the server's life: a reload that loads a version anew continues its counts, and
BentoML empties the directory when a server starts.

- Batches, whatever front door their items came from (/classify, /classify_batch, /explain, V2), by
  :func:`record_batch`: runs per batch size and the time to stack the inputs, run, split the outputs.
  ``execution_count`` is the number of runs, ``inference_count`` the items they ran (the sum of the sizes).
- V2 inference requests (REST and gRPC, unary and streaming), once each: ``success`` / ``fail`` with
  their time from the model's pick to the encoded answer (:func:`record_request`), and for a success its
  ``queue``, ``compute_input``, ``compute_infer`` and ``compute_output`` times. A V2 request of N items
  sends N items through the batching queue, so a request's times are those of its item whose batch ended
  last: that item's wait in the queue (from its submit to the start of its batch) and its batch's
  stacking, run and splitting times. Queue and the three compute counts are the success count itself, so
  they are equal even in a read between two increments (perf_analyzer refuses unequal compute counts).
  Decoding the images is in ``success`` only (perf_analyzer's "overhead"). A request whose images all came
  from the response cache (``service.http.cache``) ran no item: a success with zero queue and compute times.

In /metrics: ``imgclf_v2_stats_requests_total{model,kind}`` (kind success or fail),
``imgclf_v2_stats_request_ns_total{model,kind}``, ``imgclf_v2_stats_batches_total{model,batch_size}``,
``imgclf_v2_stats_batch_ns_total{model,batch_size,phase}`` and ``imgclf_v2_stats_last_inference_ms{model}``.

:func:`model_stat` writes one ``$model_stat`` of extension_statistics.md: every key perf_analyzer reads,
counts and nanoseconds as non-negative integers, the version as a string, no response cache (zeros).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bentoml

if TYPE_CHECKING:
    from service.http.served import ServedModel

PREFIX = "imgclf_v2_stats_"
_PHASES = ("compute_input", "compute_infer", "compute_output")
_TIMES = ("success", "fail", "queue", *_PHASES)  # the request durations, in this order in $inference_stats

REQUESTS = bentoml.metrics.Counter(
    name=PREFIX + "requests", documentation="V2 inference requests by outcome (kind: success or fail), "
    "Triton's statistics", labelnames=["model", "kind"])
REQUEST_NS = bentoml.metrics.Counter(
    name=PREFIX + "request_ns", documentation="nanoseconds of V2 inference requests: success, fail, and a "
    "success's queue, compute_input, compute_infer, compute_output", labelnames=["model", "kind"])
BATCHES = bentoml.metrics.Counter(
    name=PREFIX + "batches", documentation="ONNX Runtime runs by batch size", labelnames=["model", "batch_size"])
BATCH_NS = bentoml.metrics.Counter(
    name=PREFIX + "batch_ns", documentation="nanoseconds of the runs by batch size and phase (compute_input, "
    "compute_infer, compute_output)", labelnames=["model", "batch_size", "phase"])
LAST_MS = bentoml.metrics.Gauge(
    name=PREFIX + "last_inference_ms", documentation="when the last request or run ended, ms since the epoch",
    labelnames=["model"], multiprocess_mode="max")
_METRICS = (REQUESTS, REQUEST_NS, BATCHES, BATCH_NS, LAST_MS)


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


# --- recording (any thread: prometheus_client locks) ------------------------------------------------------


def record_batch(model: str, run: BatchRun) -> None:
    """One execution of ``model`` (its key, ``name:version``), from the batching queue's thread."""
    size = str(run.size)
    for phase, ns in zip(_PHASES, (run.input_ns, run.infer_ns, run.output_ns), strict=True):
        BATCH_NS.labels(model=model, batch_size=size, phase=phase).inc(max(int(ns), 0))
    BATCHES.labels(model=model, batch_size=size).inc()  # after its times, as a request's count
    LAST_MS.labels(model=model).set(_epoch_ms())


def record_request(served: ServedModel, ns: int, timing: ItemTiming | None, ok: bool = True) -> None:
    """A V2 request for ``served`` that ended after ``ns``: a success (``timing``: its slowest item, None:
    it ran no item) or, ``ok=False``, a failure after the model was picked (bad input, timeout, error)."""
    model = served.key
    kind = "success" if ok else "fail"
    REQUEST_NS.labels(model=model, kind=kind).inc(max(int(ns), 0))
    if ok:
        batch = timing.batch if timing is not None else BatchRun(0, 0, 0, 0, 0)
        times = (timing.queued_ns if timing is not None else 0, batch.input_ns, batch.infer_ns, batch.output_ns)
        for key, spent in zip(_TIMES[2:], times, strict=True):
            REQUEST_NS.labels(model=model, kind=key).inc(max(int(spent), 0))
    REQUESTS.labels(model=model, kind=kind).inc()  # after its times: no read sees a count without them
    LAST_MS.labels(model=model).set(_epoch_ms())


# --- reading ---------------------------------------------------------------------------------------------------


@dataclass
class Totals:
    """One model version's counters, summed over the server's workers."""

    requests: dict[str, int] = field(default_factory=dict)  # kind (success, fail) -> count
    request_ns: dict[str, int] = field(default_factory=dict)  # kind -> ns
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> runs
    batch_ns: dict[tuple[int, str], int] = field(default_factory=dict)  # (batch size, phase) -> ns
    last_ms: int = 0


def _samples() -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of the statistics: every worker's, summed, in multiprocess
    mode; this process's otherwise."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and os.path.isdir(path):
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path)
        families: Iterable[Any] = registry.collect()
    else:
        families = (family for metric in _METRICS for family in metric.collect())
    for family in families:
        if family.name.startswith(PREFIX):
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value


def collect() -> dict[str, Totals]:
    """Every model version's totals, by model key (``name:version``)."""
    totals: defaultdict[str, Totals] = defaultdict(Totals)
    for name, labels, value in _samples():
        if "model" not in labels:
            continue
        held, number = totals[labels["model"]], max(int(value), 0)
        if name == PREFIX + "last_inference_ms":
            held.last_ms = max(held.last_ms, number)
        elif name == PREFIX + "requests_total":
            held.requests[labels["kind"]] = held.requests.get(labels["kind"], 0) + number
        elif name == PREFIX + "request_ns_total":
            held.request_ns[labels["kind"]] = held.request_ns.get(labels["kind"], 0) + number
        elif name == PREFIX + "batches_total":
            size = int(labels["batch_size"])
            held.batches[size] = held.batches.get(size, 0) + number
        elif name == PREFIX + "batch_ns_total":
            key = (int(labels["batch_size"]), labels["phase"])
            held.batch_ns[key] = held.batch_ns.get(key, 0) + number
    return dict(totals)


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_stat(name: str, version: int, totals: Totals | None) -> dict[str, Any]:
    """One ``$model_stat`` of extension_statistics.md (also the gRPC ``ModelStatistics``, field for field)."""
    t = totals or Totals()
    success = t.requests.get("success", 0)
    counts = {"success": success, "fail": t.requests.get("fail", 0)} | dict.fromkeys(_TIMES[2:], success)
    inference = {key: _duration(counts[key], t.request_ns.get(key, 0)) for key in _TIMES}
    batches = [{"batch_size": size, **{phase: _duration(runs, t.batch_ns.get((size, phase), 0)) for phase in _PHASES}}
               for size, runs in sorted(t.batches.items())]
    return {
        "name": name, "version": str(version), "last_inference": t.last_ms,
        "inference_count": sum(size * runs for size, runs in t.batches.items()),
        "execution_count": sum(t.batches.values()),
        "inference_stats": {**inference, "cache_hit": _duration(0, 0), "cache_miss": _duration(0, 0)},
        "response_stats": {}, "batch_stats": batches, "memory_usage": [],
    }


def model_stats(named: Iterable[tuple[str, ServedModel]]) -> list[dict[str, Any]]:
    """The ``$model_stat`` of each (name a request used, model version), from one read of the counters."""
    totals = collect()
    return [model_stat(name, served.manifest.version, totals.get(served.key)) for name, served in named]
