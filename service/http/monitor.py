"""Every answer, whatever the front door: is it confident, what was answered, is it drifting, keep it?

One :class:`Monitor` per worker, built in ``service.http.app`` and handed to each front door
(/classify, /classify_batch, the Open Inference Protocol, /explain). For each image answered it

- makes the answer with :func:`service.answer.answer` (abstaining when ``IMGCLF_ABSTAIN`` says so);
- counts it in Prometheus: ``imgclf_predictions_total{model, label}`` (at most
  ``IMGCLF_METRICS_MAX_LABELS`` label series per model in this worker, first come first served, then
  ``label="other"``: an ImageNet model must not make a thousand series), ``imgclf_top1_score`` and
  ``imgclf_not_confident_total``;
- adds it to this worker's rolling drift window of the model version (``service.drift``) and exports
  both indices as ``imgclf_drift_index{model, kind}``;
- offers the bytes to the sampler (``service.http.sampling``), which keeps a share of them;
- hands it to the worker's rollouts (``service.http.rollout``): counted per version and role, and
  maybe scored again by a shadow candidate.

Windows and label series are per worker process, like every state of a worker: GET /models reports
the worker that answered it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from service.answer import Answer, answer
from service.drift import DriftStatus, Window
from service.http import metrics
from service.http.sampling import Sampler
from service.http.served import ServedModel
from service.preprocessing import detect_format
from service.runtime import Prediction
from service.selective import Verdict
from service.settings import Settings

if TYPE_CHECKING:
    from service.http.rollout import Rollouts

OTHER = "other"


class Monitor:
    def __init__(self, settings: Settings, sampler: Sampler | None = None, *, record: bool = True) -> None:
        self.settings, self.sampler, self.record = settings, sampler, record
        self.rollouts: Rollouts | None = None  # set by the worker, which builds them over its catalog
        self._windows: dict[str, Window] = {}
        self._series: dict[str, set[str]] = {}

    @classmethod
    def quiet(cls) -> Monitor:
        """Verdicts by the manifest's threshold only: no metrics, windows, sampling or abstention (a caller
        that was given no monitor, such as a test calling the front door functions directly)."""
        return cls(Settings(), None, record=False)

    # --- answers ---------------------------------------------------------------------------------------
    def answer(self, served: ServedModel, logits: np.ndarray, k: int, min_score: float | None = None, *,
               data: bytes | None = None, route: str = "") -> Answer:
        """:func:`service.answer.answer` for one image of ``served`` (abstaining as IMGCLF_ABSTAIN says),
        observed, and offered to the sampler with the bytes it came from."""
        result = answer(logits, served.manifest, k, min_score, self.settings.abstain)
        self.observe(served, result, data=data, route=route)
        return result

    def observe(self, served: ServedModel, result: Answer, *, data: bytes | None = None, route: str = "") -> None:
        """Metrics and drift for one answer; with ``data``, maybe a sample of it."""
        best, verdict = result.predictions[0], result.verdict
        self._count(served, best, verdict)
        if self.record and self.rollouts is not None:
            self.rollouts.observe(served, result, data)
        if data is not None and self.sampler is not None and self.record:
            self.sampler.offer(data, model=served.manifest.name, version=served.manifest.version, route=route,
                               fmt=detect_format(data), confident=verdict.confident, threshold=verdict.threshold,
                               top_k=[{"label": p.label, "index": p.index, "score": p.score}
                                      for p in result.predictions])

    def timed(self, served: ServedModel, seconds: float) -> None:
        """Preprocessing + inference of one image, for the rollout metrics."""
        if self.record and self.rollouts is not None:
            self.rollouts.timed(served, seconds)

    def _count(self, served: ServedModel, best: Prediction, verdict: Verdict) -> None:
        if not self.record:
            return
        key = served.key
        metrics.PREDICTIONS.labels(model=key, label=self._label_series(key, best.label)).inc()
        metrics.TOP1_SCORE.labels(model=key).observe(best.score)
        if verdict.confident is False:
            metrics.NOT_CONFIDENT.labels(model=key).inc()
        window = self.window(served)
        if window.reference is not None:
            window.add(best.index, best.score)
            self._export(key, self.status_of(window))

    def _label_series(self, key: str, label: str) -> str:
        seen = self._series.setdefault(key, set())
        if label in seen:
            return label
        if len(seen) < self.settings.metrics_max_labels:
            seen.add(label)
            return label
        return OTHER

    # --- drift ------------------------------------------------------------------------------------------
    def window(self, served: ServedModel) -> Window:
        window = self._windows.get(served.key)
        if window is None:
            window = self._windows[served.key] = Window(served.manifest.reference, served.manifest.labels,
                                                        self.settings.drift_window)
        return window

    def status_of(self, window: Window) -> DriftStatus:
        return window.status(self.settings.drift_class_psi, self.settings.drift_score_psi)

    def drift(self, served: ServedModel) -> DriftStatus:
        """This worker's drift status of ``served`` (GET /models)."""
        return self.status_of(self.window(served))

    def _export(self, key: str, status: DriftStatus) -> None:
        if status.class_psi is not None and status.score_psi is not None:
            metrics.DRIFT_INDEX.labels(model=key, kind="class").set(status.class_psi)
            metrics.DRIFT_INDEX.labels(model=key, kind="score").set(status.score_psi)

    def forget(self, retired: list[ServedModel]) -> None:
        """Drop the windows and label series of versions a reload retired."""
        for served in retired:
            self._windows.pop(served.key, None)
            self._series.pop(served.key, None)
