"""``POST /classify`` and ``POST /classify_batch``: one parse, bytes in memory, answered here.

The request guard has already read the body (limits, pace) and parsed the multipart form once,
keeping each upload's bytes in memory (``scope[FORM]``); admission has counted the request. The
handlers of :class:`ClassifyRoutes` answer from those bytes, so BentoML neither parses the body a
second time nor writes the upload to a temporary file. The BentoML APIs of the same names
(``service.http.app``) describe the routes in ``/docs.json`` and call the same functions below.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar, cast

import numpy as np
from pydantic import BeforeValidator, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from service.answer import Answer
from service.http import metrics
from service.http.cache import LogitsCache
from service.http.errors import ServiceError, service_error
from service.http.live import LiveCatalog
from service.http.monitor import Monitor
from service.http.schemas import BatchItem, BatchResponse, ClassifyResponse, ErrorOut, PredictionOut
from service.http.served import ServedModel
from service.preprocessing import DecodeLimits, PreprocessSpec, image_to_tensor
from service.selective import parse_min_score

T = TypeVar("T")
FORM = "imgclf.form"  # the scope key under which the guard leaves the parsed form


@dataclass(frozen=True)
class ParsedForm:
    fields: dict[str, str]  # text fields (each at most once: the guard checked)
    files: list[bytes]  # the upload field's files, in order

    @classmethod
    def of(cls, request: Request) -> ParsedForm:
        """The form the request guard parsed (every upload route is guarded: see ``service.http.routes``)."""
        return request.scope[FORM]


def _form_value(text: str | None) -> object:
    """A multipart text field as BentoML reads it: JSON if it parses, else the string."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _not_a_bool(value: object) -> object:
    """JSON ``true`` is not a count; pydantic's lax ``int`` would read it as 1 (it refuses 2.5 itself)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")  # noqa: TRY004 - pydantic turns only ValueError into a 400
    return value


# Lax otherwise: 5.0 is an integer to JSON Schema, and "5" is what BentoML's own form parsing accepts.
_TOP_K, _MODEL = TypeAdapter(Annotated[int, BeforeValidator(_not_a_bool)]), TypeAdapter(str | None)


def form_options(fields: dict[str, str]) -> tuple[int, str | None]:
    """``top_k`` (default 5) and ``model`` from text fields, validated as the BentoML APIs declare them.

    Raises ServiceError 400 ``invalid_request`` naming the field.
    """
    values: dict[str, object] = {}
    for name, adapter, default in (("top_k", _TOP_K, "5"), ("model", _MODEL, None)):
        try:
            values[name] = adapter.validate_python(_form_value(fields.get(name, default)))
        except ValidationError as exc:
            raise ServiceError(400, "invalid_request", f"{name}: {exc.errors()[0]['msg']}") from None
    return cast(int, values["top_k"]), cast("str | None", values["model"])


def form_min_score(fields: dict[str, str]) -> float | None:
    """``min_score`` (optional, 0 to 1): this request's threshold instead of the model's. ServiceError 400."""
    try:
        return parse_min_score(_form_value(fields.get("min_score")))
    except ValueError as exc:
        raise ServiceError(400, "invalid_request", str(exc)) from None


def checked_min_score(value: float | None) -> float | None:
    """The BentoML APIs' ``min_score`` argument, held to the same rule as the form field."""
    try:
        return parse_min_score(value)
    except ValueError as exc:
        raise ServiceError(400, "invalid_request", str(exc)) from None


def trust_fields(answer: Answer) -> dict[str, object]:
    """What an answer says about its top-1 (the response fields beside the predictions)."""
    v = answer.verdict
    return {"label": answer.label, "confident": v.confident, "threshold": v.threshold, "abstained": v.abstained}


def predictions_of(answer: Answer, k: int) -> list[PredictionOut]:
    return [PredictionOut(label=p.label, index=p.index, score=p.score) for p in answer.predictions[:k]]


async def preprocessed(data: bytes, served: ServedModel, limits: DecodeLimits,
                       prepare: Callable[[bytes, PreprocessSpec, DecodeLimits], T] = image_to_tensor) -> tuple[T, float]:
    """One image through ``served``'s preprocessing in one thread call, timed in imgclf_preprocess_seconds,
    for every front door (``prepare``: ``image_to_tensor``, or /explain's ``prepare`` that keeps the crop).
    Returns (result, ms); an undecodable image raises ImageInputError (its 4xx: ``service_error``)."""
    start = time.perf_counter()
    result = await asyncio.to_thread(prepare, data, served.manifest.preprocessing, limits)
    seconds = time.perf_counter() - start
    metrics.PREPROCESS_SECONDS.labels(model=served.key).observe(seconds)
    return result, seconds * 1000


async def logits_of(served: ServedModel, data: bytes, limits: DecodeLimits,
                    cache: LogitsCache, monitor: Monitor) -> tuple[np.ndarray, dict[str, float]]:
    """One image's logits and its timing fields: from the response cache (``{"preprocess": 0, "cached": 1}``),
    else decoded and inferred (``{"preprocess": ms}``, timed for the rollout metrics) and kept for next time."""
    key, row = cache.lookup(served.key, data)
    if row is not None:
        return row, {"preprocess": 0.0, "cached": 1.0}
    started = time.perf_counter()
    tensor, prep_ms = await preprocessed(data, served, limits)
    row = await served.infer(tensor)
    monitor.timed(served, time.perf_counter() - started)
    cache.put(key, row)
    return row, {"preprocess": prep_ms}


async def classify_one(live: LiveCatalog, limits: DecodeLimits, data: bytes, top_k: int,
                       model: str | None, min_score: float | None = None,
                       monitor: Monitor | None = None, cache: LogitsCache | None = None) -> ClassifyResponse:
    started = time.perf_counter()
    monitor = monitor or Monitor.quiet()
    cache = LogitsCache.off() if cache is None else cache  # (an empty cache is falsy: it has a length)
    with live.current.select(model, top_k).lease() as served:  # no await between pick and lease
        logits, timing = await logits_of(served, data, limits, cache, monitor)
        answer = monitor.answer(served, logits, top_k, min_score, data=data, route="/classify")
        return ClassifyResponse(
            model=served.manifest.name, version=served.manifest.version, **trust_fields(answer),
            predictions=predictions_of(answer, top_k),
            timing_ms={**timing, "total": (time.perf_counter() - started) * 1000},
        )


async def classify_many(live: LiveCatalog, limits: DecodeLimits, max_images: int, images: list[bytes],
                        top_k: int, model: str | None, min_score: float | None = None,
                        monitor: Monitor | None = None, cache: LogitsCache | None = None) -> BatchResponse:
    """Several images; one bad image fails only its own entry."""
    started = time.perf_counter()
    monitor = monitor or Monitor.quiet()
    cache = LogitsCache.off() if cache is None else cache
    with live.current.select(model, top_k).lease() as served:
        if len(images) > max_images:
            raise ServiceError(413, "too_many_images", f"at most {max_images} images per request")

        async def one(index: int, data: bytes) -> BatchItem:
            try:
                logits, _ = await logits_of(served, data, limits, cache, monitor)
            except Exception as exc:
                error = service_error(exc)
                if error is None:
                    raise
                return BatchItem(index=index, error=ErrorOut(kind=error.kind, message=error.message,
                                                             status=error.status))
            answer = monitor.answer(served, logits, top_k, min_score, data=data, route="/classify_batch")
            return BatchItem(index=index, **trust_fields(answer), predictions=predictions_of(answer, top_k))

        results = await asyncio.gather(*(one(i, d) for i, d in enumerate(images)))
        return BatchResponse(model=served.manifest.name, version=served.manifest.version, results=list(results),
                             timing_ms={"total": (time.perf_counter() - started) * 1000})


class ClassifyRoutes:
    """The handlers of ``POST /classify`` and ``POST /classify_batch`` (one worker's objects)."""

    def __init__(self, live: LiveCatalog, limits: DecodeLimits, max_images: int, monitor: Monitor,
                 cache: LogitsCache | None = None) -> None:
        self.live, self.limits, self.max_images, self.monitor = live, limits, max_images, monitor
        self.cache = LogitsCache.off() if cache is None else cache

    async def classify(self, request: Request) -> Response:
        form = ParsedForm.of(request)
        top_k, model = form_options(form.fields)
        answer = await classify_one(self.live, self.limits, form.files[0], top_k, model,
                                    form_min_score(form.fields), self.monitor, self.cache)
        return Response(answer.model_dump_json(), media_type="application/json")

    async def classify_batch(self, request: Request) -> Response:
        form = ParsedForm.of(request)
        top_k, model = form_options(form.fields)
        answer = await classify_many(self.live, self.limits, self.max_images, form.files, top_k, model,
                                     form_min_score(form.fields), self.monitor, self.cache)
        return Response(answer.model_dump_json(), media_type="application/json")
