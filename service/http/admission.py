"""Admission control: under overload, refuse fast with 503 and ``Retry-After`` instead of queueing.

Why not BentoML's own ``traffic.max_concurrency``: in 1.4 it answers a bare
``{"error": "Too many requests"}`` 429 without ``Retry-After``, counts every
route alike (a flood of images would lock out ``POST /admin/reload``), and
knows nothing about how long the work queued behind it takes. It stays on as a
backstop above this limit (``IMGCLF_MAX_CONCURRENCY``).

Here, per worker and only for the inference routes:

- at most ``max_queue`` requests are admitted at once (in flight, queued
  for a batch included);
- a request whose estimated latency, ``(in_flight + 1) x service time``,
  exceeds ``latency_budget_ms`` is refused too. The service time is measured,
  not configured: the worker's busy time (some request in flight) divided by
  the requests it completed, over the last completions. When idle that is one
  request's latency; under load it is 1 / throughput, batching included
  (Little's law), so the budget follows the real capacity of the machine and
  model;
- a worker with nothing in flight always admits, so a stale or inflated
  estimate can never lock the service out.

A refusal is decided from the load alone, once the request guard has read the
body (so trickling uploads cannot hold admission's slots; the Open Inference
Protocol decides before reading), and is the ``{"error", "kind": "overloaded",
"status": 503}`` object with ``Retry-After`` set to the estimated time to drain
what is in flight (at least 1 s). Health, metrics, admin and every other route
pass straight through.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from service.http.errors import ASGIApp, Overloaded, Receive, Scope, Send

log = logging.getLogger(__name__)

MIN_SAMPLES = 8  # completions before the latency estimate is trusted
MAX_RETRY_AFTER_S = 30


class LoadEstimate:
    """In-flight count and measured service time of one worker (single event loop: no locks).

    ``clock`` is injectable so the arithmetic can be checked without sleeping.
    """

    def __init__(self, window: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.in_flight = 0
        self._clock = clock
        self._mark = 0.0  # when busy time was last accounted
        self._busy: deque[float] = deque(maxlen=window)  # busy seconds per completion
        self._busy_sum = 0.0

    @property
    def service_s(self) -> float | None:
        """Seconds of worker time per completed request, or None before ``MIN_SAMPLES`` completions."""
        if len(self._busy) < MIN_SAMPLES:
            return None
        return self._busy_sum / len(self._busy)

    def predicted_s(self, extra: int = 1) -> float | None:
        """Latency of a request admitted now (it waits for the ``in_flight`` ahead of it)."""
        service = self.service_s
        return None if service is None else (self.in_flight + extra) * service

    def started(self) -> None:
        if self.in_flight == 0:
            self._mark = self._clock()  # idle time before this is not busy time
        self.in_flight += 1

    def finished(self) -> None:
        now = self._clock()
        busy, self._mark = now - self._mark, now
        if len(self._busy) == self._busy.maxlen:
            self._busy_sum -= self._busy[0]
        self._busy.append(busy)
        self._busy_sum += busy
        self.in_flight -= 1


class Admission:
    """Admits requests within the limits or raises :class:`~service.http.errors.Overloaded` (503 + Retry-After).

    One per worker, shared by the multipart routes (through :class:`AdmissionControl`) and the Open
    Inference Protocol (``service.http.v2``), so both count in the same load.
    """

    def __init__(self, max_queue: int, latency_budget_ms: float, estimate: LoadEstimate | None = None) -> None:
        self.max_queue = max_queue
        self.budget_s = latency_budget_ms / 1000
        self.load = estimate or LoadEstimate()
        self.refused = 0

    def refusal(self) -> tuple[str, int] | None:
        """(why, Retry-After seconds) when a request arriving now must be refused, else None."""
        n = self.load.in_flight
        if n == 0:
            return None
        predicted = self.load.predicted_s()
        if n >= self.max_queue:
            why = f"{n} requests already in flight on this worker (limit {self.max_queue})"
        elif self.budget_s > 0 and predicted is not None and predicted > self.budget_s:
            why = (f"estimated latency {predicted * 1000:.0f} ms ({n} in flight) is over the "
                   f"{self.budget_s * 1000:.0f} ms budget")
        else:
            return None
        drain = (predicted or 0.0) - (self.load.service_s or 0.0)  # time for those ahead to finish
        return why, min(MAX_RETRY_AFTER_S, max(1, math.ceil(drain)))

    def check(self) -> None:
        """Raise Overloaded when a request arriving now must be refused (nothing is counted in)."""
        refused = self.refusal()
        if refused is None:
            return
        why, retry_after = refused
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:  # logged, but not once per request in a flood
            log.warning("overloaded, refusing (%d so far): %s", self.refused, why)
        raise Overloaded(f"server overloaded: {why}; retry after {retry_after} s", retry_after)

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count an admitted request in the worker's load for its duration."""
        self.load.started()
        try:
            yield
        finally:
            self.load.finished()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """:meth:`check`, then :meth:`counted`."""
        self.check()
        with self.counted():
            yield


class AdmissionControl:
    """ASGI middleware: admits POSTs to ``routes`` through ``admission``; everything else passes."""

    def __init__(self, app: ASGIApp, admission: Admission, routes: Iterable[str]) -> None:
        self.app = app
        self.admission = admission
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.routes:
            await self.app(scope, receive, send)
            return
        with self.admission.admitted():
            await self.app(scope, receive, send)
