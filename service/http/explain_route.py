"""``POST /explain``: where in the image the model saw its class, as JSON numbers or a PNG overlay.

The same boundary as ``/classify``: the request guard has read the body (limits, pace) and parsed
the form once (``scope[FORM]``), admission has counted the request, the model is leased from the
worker's current catalog (hot reload safe) and the image goes through the same preprocessing and the
same batching queue as classifications: an explanation rides in a batch with ``/classify`` requests,
asking the graph for its ``features`` output beside the logits. The numpy part (the head's gradient,
the map) and the encoding run off the event loop. Models without a head are explained by occlusion,
whose forward passes go through the queue in batches too.

Form fields: ``image`` (file), ``model`` (optional, as ``/classify``), ``target`` (a label or an
index; default the top-1 class) and ``format`` (``json``, the default, or ``png``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from service.cam import ExplainError
from service.explainer import ExplainResult, prepare
from service.http.classify import ParsedForm, preprocessed
from service.http.errors import ServiceError
from service.http.explainers import Explainers
from service.http.live import LiveCatalog
from service.http.served import ServedModel
from service.preprocessing import DecodeLimits
from service.runtime import softmax
from service.selective import judge

PATH = "/explain"
FIELDS = frozenset({"model", "target", "format"})
FORMATS = ("json", "png")
_MODEL = TypeAdapter(str | None)


@dataclass(frozen=True)
class ExplainOptions:
    model: str | None = None
    target: str | None = None  # a label or an index, as text: a label wins when both would match
    format: str = "json"


def explain_options(fields: dict[str, str]) -> ExplainOptions:
    """The text fields, checked; raises ServiceError 400 naming the field."""
    text = fields.get("model")
    try:  # as /classify reads it: JSON if it parses, else the string
        model = _MODEL.validate_python(None if text is None else _json_or_text(text))
    except ValidationError as exc:
        raise ServiceError(400, "invalid_request", f"model: {exc.errors()[0]['msg']}") from None
    fmt = fields.get("format", "json").strip().lower() or "json"
    if fmt not in FORMATS:
        raise ServiceError(400, "invalid_request", f"format: must be one of {list(FORMATS)}, got {fields['format']!r}")
    return ExplainOptions(model, fields.get("target") or None, fmt)


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


async def explain_one(live: LiveCatalog, limits: DecodeLimits, data: bytes, options: ExplainOptions,
                      explainers: Explainers) -> ExplainResult:
    """One image's explanation with the model the request names (ServiceError for the client's mistakes)."""
    with live.current.select(options.model).lease() as served:  # no await between pick and lease
        try:
            explainer = await explainers.get(served)
        except ExplainError as exc:  # the version's head file is unreadable: the server's fault, not the client's
            raise ServiceError(500, "explain_unavailable", f"{served.key} cannot be explained: {exc}") from exc
        try:
            explainer.check_target(options.target)
        except ExplainError as exc:
            raise ServiceError(400, "invalid_target", str(exc)) from exc
        image, _ = await preprocessed(data, served, limits, prepare)
        if explainer.feature_output is not None:
            logits, features = await served.infer_outputs(image.tensor, (explainer.feature_output,))
            return _judged(await asyncio.to_thread(explainer.from_features, image, logits, features, options.target),
                           served)
        loop = asyncio.get_running_loop()

        async def rows(batch: np.ndarray) -> np.ndarray:
            return softmax(np.stack(await asyncio.gather(*(served.infer(t) for t in batch))),
                           served.manifest.temperature)

        def probabilities(batch: np.ndarray) -> np.ndarray:  # called in the worker thread below
            return asyncio.run_coroutine_threadsafe(rows(batch), loop).result()

        return _judged(await asyncio.to_thread(explainer.by_occlusion, image, probabilities, options.target,
                                               served.max_batch_size), served)


def _judged(result: ExplainResult, served: ServedModel) -> ExplainResult:
    """The explained class's score against the model's threshold, as /classify judges an answer."""
    verdict = judge(result.target.score, served.manifest.selective)
    return dataclasses.replace(result, confident=verdict.confident, threshold=verdict.threshold)


def _png_headers(result: ExplainResult) -> dict[str, str]:
    """What the JSON says beside the map, for PNG answers (the label percent-encoded: headers are latin-1)."""
    values = {
        "x-model": result.model, "x-model-version": str(result.version), "x-explain-method": result.method,
        "x-target-label": quote(result.target.label, safe=" "), "x-target-index": str(result.target.index),
        "x-target-score": f"{result.target.score:.6g}", "x-crop-box": ",".join(f"{v:.6g}" for v in result.crop_box),
        "x-confident": {True: "true", False: "false", None: "null"}[result.confident],
    }
    return values


class ExplainRoutes:
    """The handler of ``POST /explain`` (one worker's objects)."""

    def __init__(self, live: LiveCatalog, limits: DecodeLimits, explainers: Explainers) -> None:
        self.live, self.limits, self.explainers = live, limits, explainers

    async def explain(self, request: Request) -> Response:
        form = ParsedForm.of(request)
        options = explain_options(form.fields)
        result = await explain_one(self.live, self.limits, form.files[0], options, self.explainers)
        if options.format == "png":
            return Response(await asyncio.to_thread(result.png), media_type="image/png",
                            headers=_png_headers(result))
        return Response(await asyncio.to_thread(result.json_bytes), media_type="application/json")
