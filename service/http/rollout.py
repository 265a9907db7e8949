"""Rollouts in one worker: each answer counted under its version and role, and the shadow scored.

The catalog decides which version answers (a canary's share: :meth:`~service.http.catalog.Catalog.pick`);
this module only watches. Every answer is counted per model, version and role (``production``,
``canary``, ``shadow``) in ``imgclf_rollout_*``, so a rollout can be judged from ``/metrics`` alone, by
the pipeline's rollout stage or in Prometheus.

Shadow: after production answered an image, a ``weight`` share of them is put on a bounded queue;
one task per worker scores them with the candidate (its own preprocessing, the same
:func:`service.answer.answer`) and compares its top-1 with production's. A full queue drops the
image (``imgclf_shadow_dropped_total``) rather than wait: production never waits for the shadow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from service.answer import Answer, answer
from service.http import metrics
from service.http.live import LiveCatalog
from service.http.served import ModelRetiredError, ServedModel
from service.preprocessing import DecodeLimits, ImageInputError, image_to_tensor
from service.settings import Settings

log = logging.getLogger(__name__)

_Job = tuple[ServedModel, bytes, Answer]  # (the candidate, the image, production's answer)


def _labels(served: ServedModel, role: str) -> dict[str, str]:
    return {"model": served.manifest.name, "version": str(served.manifest.version), "role": role}


def count_answer(served: ServedModel, role: str, result: Answer) -> None:
    labels = _labels(served, role)
    metrics.ROLLOUT_ANSWERS.labels(**labels).inc()
    metrics.ROLLOUT_TOP1.labels(**labels).observe(result.predictions[0].score)
    if result.verdict.confident is False:
        metrics.ROLLOUT_ABSTAINED.labels(**labels).inc()


class Rollouts:
    """One worker's view of its models' rollouts (see the module docstring)."""

    def __init__(self, live: LiveCatalog, settings: Settings, limits: DecodeLimits) -> None:
        self.live, self.settings, self.limits = live, settings, limits
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(settings.shadow_queue)
        self._task: asyncio.Task[None] | None = None

    def role(self, served: ServedModel) -> str:
        return self.live.current.role(served)

    def timed(self, served: ServedModel, seconds: float) -> None:
        """Preprocessing + inference of one image (not a cache hit) by ``served``."""
        metrics.ROLLOUT_SECONDS.labels(**_labels(served, self.role(served))).observe(seconds)

    def observe(self, served: ServedModel, result: Answer, data: bytes | None) -> None:
        """Count an answer; a production answer may also go to the shadow."""
        role = self.role(served)
        count_answer(served, role, result)
        if role == "production" and data is not None:
            self._offer(served, data, result)

    def _offer(self, served: ServedModel, data: bytes, result: Answer) -> None:
        found = self.live.current.candidate(served.manifest.name)
        if found is None or found[0].mode != "shadow" or random.random() >= found[0].weight:
            return
        candidate = found[1]
        try:
            self._queue.put_nowait((candidate, data, result))
        except asyncio.QueueFull:
            metrics.SHADOW_DROPPED.labels(model=candidate.manifest.name, version=str(candidate.manifest.version)).inc()
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._score_all())

    async def _score_all(self) -> None:
        while True:
            candidate, data, production = await self._queue.get()
            try:
                await self._score(candidate, data, production)
            except Exception:  # the shadow must never stop (nor reach a request)
                log.exception("shadow scoring of %s failed", candidate.key)

    async def _score(self, candidate: ServedModel, data: bytes, production: Answer) -> None:
        labels = _labels(candidate, "shadow")
        version = {"model": labels["model"], "version": labels["version"]}
        started = time.perf_counter()
        try:
            with candidate.lease():  # a rollout that ended retires it: then the image is skipped
                tensor = await asyncio.to_thread(image_to_tensor, data, candidate.manifest.preprocessing, self.limits)
                logits = await candidate.infer(tensor)
        except (ImageInputError, ModelRetiredError):
            return  # its preprocessing refused what production's took (too large for it), or the rollout ended
        except Exception:  # noqa: BLE001 - counted: a candidate that fails is what a rollout must see
            metrics.ROLLOUT_ERRORS.labels(**labels).inc()
            return
        metrics.ROLLOUT_SECONDS.labels(**labels).observe(time.perf_counter() - started)
        result = answer(logits, candidate.manifest, 1, None, self.settings.abstain)
        count_answer(candidate, "shadow", result)
        metrics.SHADOW_COMPARED.labels(**version).inc()
        if result.predictions[0].label == production.predictions[0].label:
            metrics.SHADOW_AGREED.labels(**version).inc()

    async def drain(self) -> None:
        """Stop scoring (the worker is stopping): what is queued is dropped, production already answered."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
