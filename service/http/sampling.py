"""Request sampling: keep a share of what was answered, to review and train on. Off by default (privacy).

With ``IMGCLF_SAMPLE_DIR`` and ``IMGCLF_SAMPLE_RATE`` > 0, each answered image is kept with that
probability, in :class:`service.samples.SampleStore` (exact bytes, a JSON line, atomic and durable,
``IMGCLF_SAMPLE_MAX_BYTES`` as the cap). The write runs in a thread after the answer is computed and
is not awaited by the request: a slow disk never slows answers. At most ``MAX_PENDING`` writes wait
per worker; past that a sample is dropped and counted (``imgclf_samples_total{outcome="busy"}``),
so a stalled disk cannot pile image bytes up in memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from service.samples import SampleStore
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_PENDING = 16
OutcomeHook = Callable[[str], None]  # the outcome of each sampled image: kept, duplicate, cap, near_cap, busy, error


class Sampler:
    """One per worker; :meth:`offer` is called on the event loop with what an answer said."""

    def __init__(self, store: SampleStore | None, rate: float, max_bytes: int, *, rng: random.Random | None = None,
                 on_outcome: OutcomeHook | None = None, max_pending: int = MAX_PENDING) -> None:
        self.store, self.rate, self.max_bytes = store, rate, max_bytes
        self.rng = rng or random.Random()
        self.on_outcome = on_outcome
        self.max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings, on_outcome: OutcomeHook | None = None) -> Sampler:
        store = SampleStore(settings.sample_dir) if settings.sample_dir is not None else None
        return cls(store, settings.sample_rate, settings.sample_max_bytes, on_outcome=on_outcome)

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.rate > 0

    def offer(self, data: bytes, *, model: str, version: int, route: str, fmt: str | None,
              top_k: list[dict[str, Any]], confident: bool | None, threshold: float | None) -> bool:
        """Maybe keep ``data`` (the exact bytes received); True when a write was started."""
        if not self.enabled or self.rng.random() >= self.rate:
            return False
        if len(self._pending) >= self.max_pending:
            self._outcome("busy")
            return False
        record = {"time": datetime.now(UTC).isoformat(), "model": model, "version": version, "route": route,
                  "format": fmt, "top_k": top_k, "confident": confident, "threshold": threshold}
        task = asyncio.get_running_loop().create_task(self._write(data, record, confident))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _write(self, data: bytes, record: dict[str, Any], confident: bool | None) -> None:
        assert self.store is not None
        try:
            outcome = await asyncio.to_thread(self.store.write, data, record, max_bytes=self.max_bytes,
                                              confident=confident)
        except Exception:
            log.exception("could not keep a sample in %s", self.store.root)
            outcome = "error"
        self._outcome(outcome)

    def _outcome(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def drain(self) -> None:
        """Wait for the writes in progress (shutdown)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
