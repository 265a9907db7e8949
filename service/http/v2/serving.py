"""What the V2 front doors (REST and gRPC) share: the model a request names, admission, decoding, inference.

One :class:`V2Service` per worker, built in ``service.http.app`` from the objects /classify uses, so a
V2 request is served exactly like a multipart one:

- ``live.current`` is read once per request and the model it picks is leased until the answer is built
  (a hot reload retires it only afterwards);
- the model is picked by the catalog's one rule (:meth:`~service.http.catalog.Catalog.pick`): the path
  names the model, and no version means its production version, as ``model=name`` on /classify;
- admission is the worker's one :class:`~service.http.admission.Admission` (in flight, measured service
  time), shared with /classify: a refusal is a 503 with ``Retry-After`` over REST, ``UNAVAILABLE`` with
  a ``retry-after`` trailer over gRPC;
- an encoded image (``image`` input) whose logits the worker's response cache holds for this version
  (:mod:`service.http.cache`, shared with /classify) is neither decoded nor inferred;
- each image is decoded by ``image_to_tensor`` with /classify's limits, off the event loop, and timed in
  ``imgclf_preprocess_seconds``; one that fails fails the request with its index (V2 has no per-item
  errors) and no image of that request is scored;
- each of the N items goes to the model's batching queue on its own, so a V2 request of N images adds N
  items to the batches /classify traffic fills (``imgclf_batch_size``);
- each inference request is counted once in Triton's statistics (:mod:`service.http.stats`), as a
  success with its queue and compute times or as a failure, by :meth:`V2Service.inference`, the one
  way in for REST, gRPC and gRPC streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.http.admission import Admission
from service.http.cache import LogitsCache
from service.http.catalog import Catalog
from service.http.classify import preprocessed
from service.http.errors import ServiceError
from service.http.live import LiveCatalog
from service.http.monitor import Monitor
from service.http.served import ServedModel
from service.http.stats import ItemTiming, model_stats, record_request, slowest
from service.http.v2.errors import V2Error, image_error, parse_version, unknown_model
from service.http.v2.facts import VIEWS, ModelFacts
from service.http.v2.outputs import OutputTensor, build_outputs
from service.http.v2.request import InferRequest
from service.preprocessing import DecodeLimits, ImageInputError
from service.repository import MODEL_FILE
from service.selective import Verdict
from service.settings import Settings

log = logging.getLogger(__name__)
SAMPLED_TOP_K = 5  # what a sample's JSON line keeps of an answer, which V2 asks no top-k of


@dataclass(frozen=True)
class V2Answer:
    outputs: list[OutputTensor]
    parameters: dict[str, Any]  # the response's ``parameters``
    timing: ItemTiming | None = None  # the item whose batch ended last: the request's queue and compute times


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


def split_view(catalog: Catalog, name: str) -> tuple[str, str]:
    """(model, view) of a V2 model name: ``imagenet-lite0.pixels`` -> (``imagenet-lite0``, ``pixels``).
    A served model's own name wins (a model may be called ``x.image``); the view "" is the model itself."""
    base, dot, view = name.rpartition(".")
    if dot and view in VIEWS and catalog.versions(base) and not catalog.versions(name):
        return base, view
    return name, ""


class V2Service:
    """The per-worker state both transports serve from (single event loop: no locks)."""

    def __init__(self, live: LiveCatalog, settings: Settings, admission: Admission,
                 monitor: Monitor | None = None, cache: LogitsCache | None = None) -> None:
        self.live = live
        self.cache = LogitsCache.off() if cache is None else cache  # the worker's, shared with /classify
        self.monitor = monitor or Monitor.quiet()  # confident, metrics, drift and sampling, as /classify
        self.settings = settings
        self.admission = admission
        self.limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self._facts: dict[tuple[str, tuple[int, ...], str | None, str], ModelFacts] = {}

    # --- which model ---------------------------------------------------------------------------------
    def pick(self, catalog: Catalog, name: str, version: str | None, *, split: bool = False) -> ServedModel:
        """The model version a route names, by :meth:`Catalog.pick` (no version: the production one, as
        /classify's ``model=name``; ``split``: an inference, which a canary takes its share of);
        ``<model>.<view>`` names a one-input view of it. V2's own 404s list what is loaded."""
        base, _ = split_view(catalog, name)
        loaded = catalog.versions(base)
        if not loaded:
            raise unknown_model(name, catalog.names)
        return catalog.pick(base, parse_version(name, version, loaded), split=split)

    def facts(self, catalog: Catalog, served: ServedModel, name: str | None = None) -> ModelFacts:
        """What ``served`` offers over V2 under the name a request used (``<model>.<view>``: that view;
        cached: a version's manifest never changes)."""
        view = split_view(catalog, name)[1] if name else ""
        versions = tuple(catalog.versions(served.manifest.name))
        key = (served.key, versions, catalog.default, view)
        facts = self._facts.get(key)
        if facts is None:
            if len(self._facts) > 64:  # reloads come and go; keep only recent models
                self._facts.clear()
            manifest = served.manifest
            facts = ModelFacts.from_manifest(
                manifest, versions=list(versions), max_images=self.settings.max_batch_images,
                batch_size=served.max_batch_size, batch_wait_ms=served.batch_wait_ms)
            extra = {"provider": served.provider, "opset": manifest.export.opset,
                     "precision": manifest.export.precision, "default": catalog.default == manifest.name}
            if MODEL_FILE in manifest.files:
                extra["model_sha256"] = manifest.files[MODEL_FILE].sha256
            facts = self._facts[key] = dataclasses.replace(facts, extra_parameters=extra, view=view)
        return facts

    def model_facts(self, name: str, version: str | None) -> ModelFacts:
        """Facts for the metadata routes (no lease: nothing runs on the model)."""
        catalog = self.live.current
        return self.facts(catalog, self.pick(catalog, name, version), name)

    def is_ready(self, name: str, version: str | None) -> bool:
        try:
            self.pick(self.live.current, name, version)
        except (ServiceError, RuntimeError):
            return False
        return True

    def not_ready(self) -> str | None:
        """Why this worker is not ready (None: ready), as /readyz says it."""
        try:
            return self.live.current.not_ready
        except RuntimeError as exc:  # models not loaded yet
            return str(exc)

    # --- admission -------------------------------------------------------------------------------------
    def check_admission(self) -> None:
        """Raise the worker's Overloaded refusal, as a V2Error, when a request arriving now must wait."""
        try:
            self.admission.check()
        except ServiceError as exc:
            raise V2Error.of(exc) from None

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count the request in the worker's load for its duration, or raise the refusal."""
        self.check_admission()
        with self.admission.counted():
            yield

    # --- inference ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference(self, name: str, version: str | None) -> Iterator[Inference]:
        """One V2 inference request, for every transport: admitted (counted in the worker's load), its model
        picked and leased (no await between the two), and counted in the statistics when it ends: a
        success with its times, or a failure (a refusal before the pick is no model's and is not counted)."""
        with self.admitted():
            catalog = self.live.current  # once per request: a reload swaps it whole
            served = self.pick(catalog, name, version, split=True)
            with served.lease():
                call = Inference(self, served, self.facts(catalog, served, name))
                started = time.perf_counter_ns()
                try:
                    yield call
                except BaseException:
                    record_request(served, time.perf_counter_ns() - started, None, ok=False)
                    raise
                record_request(served, time.perf_counter_ns() - started, call.timing)

    def statistics(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's ``$stats_model_response``: every version served (no name), every loaded version of one
        model (no version) or one version, named as the request named it, summed over the server's workers;
        the metadata routes' 404s."""
        catalog = self.live.current
        if not name:
            named = [(n, catalog.pick(n, v)) for n in catalog.names for v in catalog.versions(n)]
        elif version:
            named = [(name, self.pick(catalog, name, version))]
        else:
            base = self.pick(catalog, name, None).manifest.name
            named = [(name, catalog.pick(base, v)) for v in catalog.versions(base)]
        return {"model_stats": model_stats(named)}

    async def infer_answer(self, served: ServedModel, request: InferRequest, facts: ModelFacts) -> V2Answer:
        """The outputs and the response parameters (whether each item's top-1 clears the threshold)."""
        if request.images is not None:
            logits, timings = await self._image_logits(served, request.images)
        else:
            results = await asyncio.gather(*(served.infer_timed(t) for t in request.pixels))
            logits, timings = np.stack([row for row, _ in results]), [t for _, t in results]
        images = request.images or (None,) * len(logits)
        answers = [self.monitor.answer(served, row, SAMPLED_TOP_K, request.min_score, data=image, route="/v2/infer")
                   for row, image in zip(logits, images, strict=True)]
        probabilities = np.stack([a.probabilities for a in answers])
        outputs = build_outputs(request, facts, probabilities, logits if request.wants_logits else None)
        return V2Answer(outputs, confidence_parameters([a.verdict for a in answers]), slowest(timings))

    async def _image_logits(self, served: ServedModel,
                            images: tuple[bytes, ...]) -> tuple[np.ndarray, list[ItemTiming]]:
        """Encoded images' logits: the response cache's rows (the same cache as /classify), the others decoded
        and inferred through the batching queue, concurrently, and kept. The timings are the inferred items'
        (a request answered wholly from the cache has none: a success with zero queue and compute times)."""
        looked = [self.cache.lookup(served.key, data) for data in images]
        tensors = await self._decode(served, [None if row is not None else data
                                              for data, (_, row) in zip(images, looked, strict=True)])
        missed = [i for i, tensor in enumerate(tensors) if tensor is not None]
        results = await asyncio.gather(*(served.infer_timed(tensors[i]) for i in missed))
        rows = [row for _, row in looked]
        for i, (row, _) in zip(missed, results, strict=True):
            rows[i] = row
            self.cache.put(looked[i][0], row)
        return np.stack(rows), [timing for _, timing in results]

    async def _decode(self, served: ServedModel, images: list[bytes | None]) -> list[np.ndarray | None]:
        """Each image's tensor (None where the image is None: answered from the cache); the first bad image, by
        its index in the request, fails the request and none of them is scored."""
        async def one(data: bytes | None) -> np.ndarray | None:
            return None if data is None else (await preprocessed(data, served, self.limits))[0]

        results = await asyncio.gather(*(one(d) for d in images), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, ImageInputError):
                raise image_error(index, str(result), result.status_code, result.kind)
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]


@dataclass
class Inference:
    """One V2 inference request in progress (:meth:`V2Service.inference`): the model version it holds, what
    that offers under the name the request used, and the times of its answer once made."""

    service: V2Service
    served: ServedModel
    facts: ModelFacts
    timing: ItemTiming | None = None

    async def answer(self, request: InferRequest) -> V2Answer:
        answer = await self.service.infer_answer(self.served, request, self.facts)
        self.timing = answer.timing
        return answer
