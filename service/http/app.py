"""The BentoML service: one worker's edge (``service.http.edge``) mounted over BentoML.

``bentoml serve service.http.app:Classifier`` imports this module in each worker. The settings are
read here once (BentoML needs the worker count and traffic limits on the class); everything else is
made by :func:`~service.http.edge.build_app` on the worker's first use. Requests are answered by the
route table (``service.http.routes``); the ``@bentoml.api`` methods below describe ``/classify``,
``/classify_batch`` and ``/explain`` in ``/docs.json`` (BentoML documents its own APIs only) and run
the same functions when called in-process. ``/batch`` is a BentoML task: BentoML queues and stores it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import bentoml
from bentoml.validators import ContentType
from pydantic import Field

from service.batch.archive import score_archive
from service.batch.scoring import Scorer
from service.http import bento
from service.http.admin import reload_response
from service.http.batch_task import archive_limits
from service.http.classify import checked_min_score, classify_many, classify_one
from service.http.edge import Edge, Worker, build_app
from service.http.errors import ASGIApp
from service.http.explain_route import ExplainOptions, explain_one
from service.http.logs import use_json_logs
from service.http.routes import models_response
from service.http.schemas import (
    BatchResponse,
    ClassifyResponse,
    ExplainResponse,
    ModelsResponse,
    ReloadResponse,
)
from service.memory import limit_malloc_arenas
from service.settings import Settings

settings = Settings.from_env()  # the one place the service reads its environment
if settings.log_format == "json":
    use_json_logs()  # in the serving process and in each worker, after BentoML set its handlers up
JSONLines = Annotated[str, ContentType("application/x-ndjson")]
MinScore = Annotated[float | None, Field(ge=0, le=1, description="this request's confidence threshold")]


@functools.cache
def edge() -> Edge:
    """This worker's edge, made on first use (each BentoML worker is its own process)."""
    return build_app(settings)


class EdgeMiddleware:
    """What BentoML is given: the edge's stack around BentoML's own app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = edge().asgi(app)

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


@bentoml.service(
    workers=settings.worker_count,
    # BentoML divides max_concurrency among the workers; IMGCLF_MAX_CONCURRENCY is per worker
    traffic={"timeout": settings.timeout_s, "max_concurrency": settings.max_concurrency * settings.worker_count},
)
class Classifier:
    """Image classification with the models of the repository (GET /models lists them)."""

    def __init__(self) -> None:
        if "MALLOC_ARENA_MAX" not in os.environ:  # glibc's own variable: an explicit setting wins
            limit_malloc_arenas()  # RSS stays flat across reloads under traffic (see the function)
        self.worker: Worker = edge().worker
        self.worker.load()

    @bentoml.on_startup
    async def _start(self) -> None:
        await self.worker.start()

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        await self.worker.stop()

    async def reload(self) -> ReloadResponse:
        """Serve the repository's current production versions (this worker); ReloadRefusedError if one is bad."""
        return reload_response(*await self.worker.live.reload())

    def models_info(self) -> ModelsResponse:
        return models_response(self.worker.live.current, self.worker.monitor)

    # --- the documented contract of the multipart routes (answered by the route table over HTTP) ----------
    @bentoml.api
    async def classify(self, image: Path, top_k: int = 5, model: str | None = None,
                       min_score: MinScore = None) -> ClassifyResponse:
        """Classify one image (multipart field `image`); scores are calibrated probabilities. `confident`
        says whether the top-1 score reaches `min_score`, else the model's threshold (null: it has none)."""
        w = self.worker
        with bento.bentoml_errors():
            return await classify_one(w.live, w.limits, await asyncio.to_thread(image.read_bytes), top_k, model,
                                      checked_min_score(min_score), w.monitor, w.cache)

    @bentoml.api
    async def classify_batch(self, images: list[Path], top_k: int = 5, model: str | None = None,
                             min_score: MinScore = None) -> BatchResponse:
        """Classify several images (repeated field `images`); one bad image fails only its own entry."""
        w = self.worker
        data = [await asyncio.to_thread(p.read_bytes) for p in images]
        with bento.bentoml_errors():
            return await classify_many(w.live, w.limits, w.settings.max_batch_images, data, top_k, model,
                                       checked_min_score(min_score), w.monitor, w.cache)

    @bentoml.api
    async def explain(self, image: Path, model: str | None = None, target: str | None = None,
                      format: Literal["json", "png"] = "json") -> ExplainResponse:
        """Where the model saw a class (multipart field `image`; `target`: a label or an index, default top-1):
        a heatmap in [0, 1] over the model's input crop and where that crop lies in the upright photo.
        `format=png` answers the heatmap over the crop as image/png instead (the JSON fields in X- headers)."""
        w = self.worker
        data = await asyncio.to_thread(image.read_bytes)
        with bento.bentoml_errors():
            result = await explain_one(w.live, w.limits, data, ExplainOptions(model, target or None, format),
                                       w.explainers)
        return ExplainResponse.model_validate(result.explanation().model_dump())

    # --- batch jobs over HTTP ------------------------------------------------------------------------
    @bentoml.task(route="/batch")
    async def batch(self, archive: Path, ctx: bentoml.Context, top_k: int = 5, model: str | None = None) -> JSONLines:
        """Score a zip or tar of images as a job: `POST /batch/submit` answers a task_id; `GET /batch/status`
        and `GET /batch/get?task_id=...` give its state and its rows (JSON Lines, one per file, the rows of
        `imgclf batch`). Archives with links, `..`, absolute paths or bomb-like ratios are refused."""
        w = self.worker
        with bento.bentoml_errors(), w.jobs.running(), w.claims.claim(bento.task_id(ctx)), \
                w.live.current.select(model, top_k).lease() as served:
            scorer = Scorer(served.model, top_k=top_k, batch_size=w.settings.max_batch_size, limits=w.limits)
            name, version = served.manifest.name, served.manifest.version

            def run() -> str:
                with open(archive, "rb") as fh:
                    rows = score_archive(fh, archive_limits(w.settings), scorer)
                    return "".join(json.dumps(row.to_record(name, version)) + "\n" for row in rows)

            return await asyncio.to_thread(run)


Classifier.add_asgi_middleware(EdgeMiddleware)
