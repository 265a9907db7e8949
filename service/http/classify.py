"""What happens to a classification request once its body is in: one parse, bytes in memory, answered here.

The request guard has already read the body (limits, pace) and parsed the multipart form once,
keeping each upload's bytes in memory (``scope[FORM]``); admission has counted the request. This
route answers ``POST /classify`` and ``POST /classify_batch`` from those bytes, so BentoML neither
parses the body a second time nor writes the upload to a temporary file. The BentoML APIs of the same
names (``service.http.app``) stay the documented contract (OpenAPI) and call the same functions below.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Annotated, cast

import numpy as np
from pydantic import BaseModel, BeforeValidator, TypeAdapter, ValidationError

from service.http import metrics
from service.http.catalog import LiveCatalog
from service.http.errors import ASGIApp, ClientError, Receive, Scope, Send, select_model
from service.http.monitor import Answer, Monitor
from service.http.schemas import BatchItem, BatchResponse, ClassifyResponse, ErrorOut, PredictionOut
from service.http.served import ServedModel
from service.preprocessing import DecodeLimits, ImageInputError, image_to_tensor
from service.selective import parse_min_score

FORM = "imgclf.form"  # the scope key under which the guard leaves the parsed form


@dataclass(frozen=True)
class ParsedForm:
    fields: dict[str, str]  # text fields (each at most once: the guard checked)
    files: list[bytes]  # the upload field's files, in order


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

    Raises ClientError 400 ``invalid_request`` naming the field.
    """
    values: dict[str, object] = {}
    for name, adapter, default in (("top_k", _TOP_K, "5"), ("model", _MODEL, None)):
        try:
            values[name] = adapter.validate_python(_form_value(fields.get(name, default)))
        except ValidationError as exc:
            raise ClientError(400, "invalid_request", f"{name}: {exc.errors()[0]['msg']}") from None
    return cast(int, values["top_k"]), cast("str | None", values["model"])


def form_min_score(fields: dict[str, str]) -> float | None:
    """``min_score`` (optional, 0 to 1): this request's threshold instead of the model's. ClientError 400."""
    try:
        return parse_min_score(_form_value(fields.get("min_score")))
    except ValueError as exc:
        raise ClientError(400, "invalid_request", str(exc)) from None


def checked_min_score(value: float | None) -> float | None:
    """The BentoML APIs' ``min_score`` argument, held to the same rule as the form field."""
    try:
        return parse_min_score(value)
    except ValueError as exc:
        raise ClientError(400, "invalid_request", str(exc)) from None


def trust_fields(answer: Answer) -> dict[str, object]:
    """What an answer says about its top-1 (the response fields beside the predictions)."""
    v = answer.verdict
    return {"label": answer.label, "confident": v.confident, "threshold": v.threshold, "abstained": v.abstained}


async def tensor_for(data: bytes, served: ServedModel, limits: DecodeLimits) -> tuple[np.ndarray, float]:
    """Decode and preprocess in one thread call; client mistakes become 4xx. Returns (tensor, ms)."""
    start = time.perf_counter()
    try:
        tensor = await asyncio.to_thread(image_to_tensor, data, served.manifest.preprocessing, limits)
    except ImageInputError as exc:
        raise ClientError(exc.status_code, exc.kind, str(exc)) from exc
    seconds = time.perf_counter() - start
    metrics.PREPROCESS_SECONDS.labels(model=served.key).observe(seconds)
    return tensor, seconds * 1000


def predictions(probs: np.ndarray, served: ServedModel, k: int) -> list[PredictionOut]:
    return [PredictionOut(label=p.label, index=p.index, score=p.score) for p in served.model.top_k(probs, k)]


def predictions_of(answer: Answer) -> list[PredictionOut]:
    return [PredictionOut(label=p.label, index=p.index, score=p.score) for p in answer.predictions]


async def classify_one(live: LiveCatalog, limits: DecodeLimits, data: bytes, top_k: int,
                       model: str | None, min_score: float | None = None,
                       monitor: Monitor | None = None) -> ClassifyResponse:
    started = time.perf_counter()
    monitor = monitor or Monitor.quiet()
    with select_model(live.current, model, top_k).lease() as served:  # no await between pick and lease
        tensor, prep_ms = await tensor_for(data, served, limits)
        probs = await served.infer(tensor)
        answer = monitor.answer(served, probs, top_k, min_score, data=data, route="/classify")
        return ClassifyResponse(
            model=served.manifest.name, version=served.manifest.version, **trust_fields(answer),
            predictions=predictions_of(answer),
            timing_ms={"preprocess": prep_ms, "total": (time.perf_counter() - started) * 1000},
        )


async def classify_many(live: LiveCatalog, limits: DecodeLimits, max_images: int, images: list[bytes],
                        top_k: int, model: str | None, min_score: float | None = None,
                        monitor: Monitor | None = None) -> BatchResponse:
    """Several images; one bad image fails only its own entry."""
    started = time.perf_counter()
    monitor = monitor or Monitor.quiet()
    with select_model(live.current, model, top_k).lease() as served:
        if len(images) > max_images:
            raise ClientError(413, "too_many_images", f"at most {max_images} images per request")

        async def one(index: int, data: bytes) -> BatchItem:
            try:
                tensor, _ = await tensor_for(data, served, limits)
            except ClientError as exc:
                return BatchItem(index=index, error=ErrorOut(kind=exc.kind, message=exc.message, status=exc.status))
            answer = monitor.answer(served, await served.infer(tensor), top_k, min_score, data=data,
                                    route="/classify_batch")
            return BatchItem(index=index, **trust_fields(answer), predictions=predictions_of(answer))

        results = await asyncio.gather(*(one(i, d) for i, d in enumerate(images)))
        return BatchResponse(model=served.manifest.name, version=served.manifest.version, results=list(results),
                             timing_ms={"total": (time.perf_counter() - started) * 1000})


class ClassifyRoute:
    """ASGI middleware answering /classify and /classify_batch from the guard's parsed form."""

    def __init__(self, app: ASGIApp, live: LiveCatalog, limits: DecodeLimits, max_images: int,
                 monitor: Monitor | None = None) -> None:
        self.app, self.live, self.limits, self.max_images = app, live, limits, max_images
        self.monitor = monitor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        form: ParsedForm | None = scope.get(FORM) if scope["type"] == "http" else None
        path = scope.get("path")
        if form is None or path not in ("/classify", "/classify_batch"):
            await self.app(scope, receive, send)
            return
        try:
            top_k, model = form_options(form.fields)
            min_score = form_min_score(form.fields)
            if path == "/classify":
                answer: BaseModel = await classify_one(self.live, self.limits, form.files[0], top_k, model,
                                                       min_score, self.monitor)
            else:
                answer = await classify_many(self.live, self.limits, self.max_images, form.files, top_k, model,
                                             min_score, self.monitor)
        except ClientError as exc:
            await _send_json(send, exc.status, {"error": exc.message, "kind": exc.kind, "status": exc.status})
            return
        await _send_json(send, 200, answer.model_dump_json().encode())


async def _send_json(send: Send, status: int, body: dict | bytes) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
