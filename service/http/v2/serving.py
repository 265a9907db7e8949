"""What the V2 front doors (REST and gRPC) share: the model a request names, admission, decoding, inference.

One :class:`V2Service` per worker, built in ``service.http.app`` from the objects /classify uses, so a
V2 request is served exactly like a multipart one:

- ``live.current`` is read once per request and the model it picks is leased until the answer is built
  (a hot reload retires it only afterwards);
- admission is the same :class:`~service.http.admission.Admission` arithmetic over the same
  :class:`~service.http.admission.LoadEstimate` (in flight, measured service time): a refusal is a 503
  with ``Retry-After`` over REST, ``UNAVAILABLE`` with a ``retry-after`` trailer over gRPC;
- each image is decoded by ``image_to_tensor`` with /classify's limits, off the event loop, and timed in
  ``imgclf_preprocess_seconds``; one that fails fails the request with its index (V2 has no per-item
  errors) and no image of that request is scored;
- each of the N items goes to the model's batching queue on its own, so a V2 request of N images adds N
  items to the batches /classify traffic fills (``imgclf_batch_size``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.http import metrics
from service.http.admission import Admission
from service.http.catalog import Catalog, LiveCatalog
from service.http.monitor import Monitor
from service.http.served import ServedModel
from service.http.v2.errors import V2Error, image_error, parse_version, unknown_model
from service.http.v2.facts import ModelFacts
from service.http.v2.outputs import OutputTensor, build_outputs
from service.http.v2.request import InferRequest
from service.preprocessing import DecodeLimits, ImageInputError, image_to_tensor
from service.repository import MODEL_FILE
from service.runtime import softmax
from service.selective import Verdict
from service.settings import Settings

log = logging.getLogger(__name__)


class Overloaded(V2Error):
    """Admission refused the request; ``retry_after`` seconds is when to try again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, message, kind="overloaded")
        self.retry_after = retry_after


@dataclass(frozen=True)
class V2Answer:
    outputs: list[OutputTensor]
    parameters: dict[str, Any]  # the response's ``parameters``


def confidence_parameters(verdicts: list[Verdict]) -> dict[str, Any]:
    """``confident``: every item's top-1 clears the threshold (the request's ``parameters.min_score``, else
    the model's); ``confident_items``: each item's, comma-separated, when there are several; ``threshold``.
    None of them when the model has no threshold and the request gave none (multipart's ``null``)."""
    if not verdicts or verdicts[0].threshold is None:
        return {}
    out: dict[str, Any] = {"confident": all(v.confident for v in verdicts), "threshold": verdicts[0].threshold}
    if len(verdicts) > 1:
        out["confident_items"] = ",".join("true" if v.confident else "false" for v in verdicts)
    return out


class V2Service:
    """The per-worker state both transports serve from (single event loop: no locks)."""

    def __init__(self, live: LiveCatalog, settings: Settings, admission: Admission,
                 on_error: Callable[[str], None] | None = metrics.count_error, monitor: Monitor | None = None) -> None:
        self.live = live
        self.monitor = monitor or Monitor.quiet()  # confident, metrics, drift and sampling, as /classify
        self.settings = settings
        self.admission = admission
        self.on_error = on_error
        self.limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self._facts: dict[tuple[str, tuple[int, ...]], ModelFacts] = {}

    # --- which model ---------------------------------------------------------------------------------
    def pick(self, catalog: Catalog, name: str, version: str | None) -> ServedModel:
        """The model version a route names: ``version`` None is the one /classify serves for ``model=name``
        (its production version); else exactly that version if it is loaded. 404s list what is loaded."""
        matching = [e for e in catalog.engines.values() if e.manifest.name == name]
        if not matching:
            raise unknown_model(name, sorted({e.manifest.name for e in catalog.engines.values()}))
        wanted = parse_version(name, version, [e.manifest.version for e in matching])
        if wanted is None:
            production = catalog.following.get(name)
            return next((e for e in matching if e.manifest.version == production), matching[0])
        return next(e for e in matching if e.manifest.version == wanted)

    def facts(self, catalog: Catalog, served: ServedModel) -> ModelFacts:
        """What ``served`` offers over V2 (cached: a version's manifest never changes)."""
        versions = tuple(sorted(e.manifest.version for e in catalog.engines.values()
                                if e.manifest.name == served.manifest.name))
        key = (served.key, versions)
        facts = self._facts.get(key)
        if facts is None:
            if len(self._facts) > 64:  # reloads come and go; keep only recent models
                self._facts.clear()
            manifest = served.manifest
            facts = ModelFacts.from_manifest(
                manifest, versions=list(versions), max_images=self.settings.max_batch_images,
                batch_size=served.max_batch_size, batch_wait_ms=served.batch_wait_ms)
            extra = {"provider": served.provider, "opset": manifest.export.opset,
                     "precision": manifest.export.precision}
            if MODEL_FILE in manifest.files:
                extra["model_sha256"] = manifest.files[MODEL_FILE].sha256
            facts = self._facts[key] = dataclasses.replace(facts, extra_parameters=extra)
        return facts

    def model_facts(self, name: str, version: str | None) -> ModelFacts:
        """Facts for the metadata routes (no lease: nothing runs on the model)."""
        catalog = self.live.current
        return self.facts(catalog, self.pick(catalog, name, version))

    def is_ready(self, name: str, version: str | None) -> bool:
        try:
            catalog = self.live.current
            self.pick(catalog, name, version)
        except (V2Error, RuntimeError):
            return False
        return True

    def not_ready(self) -> str | None:
        """Why this worker is not ready (None: ready), as /readyz says it."""
        try:
            failed = self.live.current.failed
        except RuntimeError as exc:  # models not loaded yet
            return str(exc)
        if failed:
            return "not ready: could not load " + "; ".join(f"{key}: {why}" for key, why in failed.items())
        return None

    # --- admission -------------------------------------------------------------------------------------
    def check_admission(self) -> None:
        """Raise :class:`Overloaded` when a request arriving now must be refused (nothing is counted in)."""
        refused = self.admission.refusal()
        if refused is not None:
            why, retry_after = refused
            self.admission.refused += 1
            if self.admission.refused == 1 or self.admission.refused % 1000 == 0:
                log.warning("overloaded, refusing V2 requests (%d so far): %s", self.admission.refused, why)
            raise Overloaded(f"server overloaded: {why}; retry after {retry_after} s", retry_after)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count the request in the worker's load for its duration, or raise :class:`Overloaded`."""
        self.check_admission()
        self.admission.load.started()
        try:
            yield
        finally:
            self.admission.load.finished()

    def failed(self, error: V2Error) -> V2Error:
        """Count a refused request in ``imgclf_errors_total`` (by kind) and hand the error back."""
        if self.on_error is not None:
            self.on_error(error.kind)
        return error

    # --- inference ---------------------------------------------------------------------------------------
    async def infer(self, served: ServedModel, request: InferRequest, facts: ModelFacts) -> list[OutputTensor]:
        """The request's outputs: every item through the model's batching queue, concurrently."""
        return (await self.infer_answer(served, request, facts)).outputs

    async def infer_answer(self, served: ServedModel, request: InferRequest, facts: ModelFacts) -> V2Answer:
        """The outputs and the response parameters (whether each item's top-1 clears the threshold)."""
        if request.images is not None:
            tensors = await self._decode(served, request.images)
        else:
            tensors = list(request.pixels)
        rows = await asyncio.gather(*(served.infer_logits(t) for t in tensors))
        logits = np.stack(rows)
        probabilities = softmax(logits, served.manifest.temperature)  # what served.infer does, row by row
        verdicts = self.monitor.verdicts(served, probabilities, request.min_score, images=request.images,
                                         route="/v2/infer")
        outputs = build_outputs(request, facts, probabilities, logits if request.wants_logits else None)
        return V2Answer(outputs, confidence_parameters(verdicts))

    async def _decode(self, served: ServedModel, images: tuple[bytes, ...]) -> list[np.ndarray]:
        spec = served.manifest.preprocessing
        histogram = metrics.PREPROCESS_SECONDS.labels(model=served.key)

        async def one(data: bytes) -> np.ndarray:
            start = time.perf_counter()
            tensor = await asyncio.to_thread(image_to_tensor, data, spec, self.limits)
            histogram.observe(time.perf_counter() - start)
            return tensor

        results = await asyncio.gather(*(one(d) for d in images), return_exceptions=True)
        for index, result in enumerate(results):  # the first bad image, by index; none of them is scored
            if isinstance(result, ImageInputError):
                raise image_error(index, str(result), result.status_code, result.kind)
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]
