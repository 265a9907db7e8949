"""The BentoML service: a thin face over the catalog, the shared preprocessing and the engines."""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import AbstractContextManager
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType
from starlette.responses import JSONResponse

from service.admin import AdminRoute, reload_response
from service.admission import Admission
from service.archive import check_archive, score_archive
from service.batch.output import record
from service.batch.scoring import Scorer
from service.batch.task_fields import archive_limits, check_job_fields
from service.catalog import Catalog, LiveCatalog, UnknownModelError
from service.engine import ModelEngine, limit_malloc_arenas, top_k
from service.http_guard import ASGIApp, Receive, RequestGuard, Scope, Send, UploadRoute
from service.preprocessing import DecodeLimits, ImageInputError, image_to_tensor
from service.schemas import (
    BatchItem,
    BatchResponse,
    ClassifyResponse,
    ErrorOut,
    ModelInfo,
    ModelsResponse,
    PredictionOut,
    ReloadResponse,
)
from service.settings import Settings

settings = Settings.from_env()  # the one place the service reads its environment
JSONLines = Annotated[str, ContentType("application/x-ndjson")]

PREPROCESS_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_preprocess_seconds", documentation="bytes -> tensor per image", labelnames=["model"])
INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_inference_seconds", documentation="ONNX Runtime time per batch", labelnames=["model"])
BATCH_SIZE = bentoml.metrics.Histogram(
    name="imgclf_batch_size", documentation="images per ONNX Runtime call", labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ERRORS = bentoml.metrics.Counter(name="imgclf_errors_total", documentation="client errors by kind", labelnames=["kind"])
MODEL_INFO = bentoml.metrics.Gauge(
    name="imgclf_model_info", documentation="loaded models and the provider they run on", labelnames=["model", "provider"])


def count_error(kind: str) -> None:
    ERRORS.labels(kind=kind).inc()


class ClientError(BentoMLException):
    """A 4xx whose body says what was wrong (unwrapped into an object by the request guard)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        self.error_code = HTTPStatus(status)
        count_error(kind)
        super().__init__(json.dumps({"kind": kind, "message": message}))  # what BentoML renders (str(exc))
        self.kind, self.message = kind, message  # after: BentoMLException sets .message to its argument


def _observe_batch(engine: ModelEngine, size: int, seconds: float) -> None:
    BATCH_SIZE.labels(model=engine.key).observe(size)
    INFERENCE_SECONDS.labels(model=engine.key).observe(seconds)


def _on_swap(added: list[ModelEngine], retired: list[ModelEngine]) -> None:
    """Metrics for the engines a load or reload brought in and the ones it retired."""
    for engine in added:
        engine.on_batch = _observe_batch
        MODEL_INFO.labels(model=engine.key, provider=engine.provider).set(1)
    for engine in retired:
        MODEL_INFO.labels(model=engine.key, provider=engine.provider).set(0)


class ModelsRoute:
    """GET /models. BentoML APIs are POST-only and a mounted app only sees /models/..., so this
    small middleware answers the exact path itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != "/models":
            await self.app(scope, receive, send)
            return
        if scope["method"] != "GET":
            response = JSONResponse({"error": "use GET /models", "kind": "method_not_allowed", "status": 405}, 405)
        else:
            response = JSONResponse(bentoml.get_current_service().models_info().model_dump(mode="json"))
        await response(scope, receive, send)


@bentoml.service(
    workers=settings.workers,
    # BentoML divides max_concurrency among the workers; IMGCLF_MAX_CONCURRENCY is per worker
    traffic={"timeout": settings.timeout_s, "max_concurrency": settings.max_concurrency * settings.workers},
)
class Classifier:
    """Image classification with the models of the repository (GET /models lists them)."""

    def __init__(self) -> None:
        if "MALLOC_ARENA_MAX" not in os.environ:  # an explicit glibc setting wins
            limit_malloc_arenas()  # RSS stays flat across reloads under traffic (see the function)
        self.settings = settings
        self.limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self.live = LiveCatalog(settings, Catalog.load(settings), on_swap=_on_swap)
        _on_swap(list(self.live.current.engines.values()), [])

    @property
    def catalog(self) -> Catalog:
        """What this worker serves now; a reload replaces it whole (read it once per request)."""
        return self.live.current

    # --- hot reload (POST /admin/reload in service.admin; watching when IMGCLF_POLL_SECONDS or workers > 1) ---
    @bentoml.on_startup
    async def _watch_repository(self) -> None:
        """Each worker watches the aliases itself: an admin reload reaches only one worker."""
        self.live.start_watching(self.settings.watch_seconds)

    @bentoml.on_shutdown
    async def _stop_watching(self) -> None:
        await self.live.stop_watching()

    async def reload(self) -> ReloadResponse:
        """Serve the repository's current production versions (this worker); ReloadRefusedError if one is bad."""
        return reload_response(*await self.live.reload())

    # --- endpoints -------------------------------------------------------------------------------
    @bentoml.api
    async def classify(self, image: Path, top_k: int = 5, model: str | None = None) -> ClassifyResponse:
        """Classify one image (multipart field `image`); scores are calibrated probabilities."""
        started = time.perf_counter()
        with self._lease(model) as engine:
            self._check_top_k(top_k, engine)
            tensor, prep_ms = await self._tensor(image, engine)
            probs = await engine.infer(tensor)
            return ClassifyResponse(
                model=engine.manifest.name, version=engine.manifest.version,
                predictions=self._predictions(probs, engine, top_k),
                timing_ms={"preprocess": prep_ms, "total": (time.perf_counter() - started) * 1000},
            )

    @bentoml.api
    async def classify_batch(self, images: list[Path], top_k: int = 5, model: str | None = None) -> BatchResponse:
        """Classify several images (repeated field `images`); one bad image fails only its own entry."""
        started = time.perf_counter()
        with self._lease(model) as engine:
            self._check_top_k(top_k, engine)
            if len(images) > self.settings.max_batch_images:
                raise ClientError(413, "too_many_images", f"at most {self.settings.max_batch_images} images per request")

            async def one(index: int, path: Path) -> BatchItem:
                try:
                    tensor, _ = await self._tensor(path, engine)
                except ClientError as exc:
                    error = ErrorOut(kind=exc.kind, message=exc.message, status=exc.error_code.value)
                    return BatchItem(index=index, error=error)
                probs = await engine.infer(tensor)
                return BatchItem(index=index, predictions=self._predictions(probs, engine, top_k))

            results = await asyncio.gather(*(one(i, p) for i, p in enumerate(images)))
            return BatchResponse(
                model=engine.manifest.name, version=engine.manifest.version, results=list(results),
                timing_ms={"total": (time.perf_counter() - started) * 1000},
            )

    def models_info(self) -> ModelsResponse:
        catalog = self.catalog  # one snapshot, even if a reload swaps meanwhile
        return ModelsResponse(models=[
            ModelInfo(name=e.manifest.name, version=e.manifest.version, labels=len(e.manifest.labels),
                      preprocessing=e.manifest.preprocessing, provider=e.provider, load_seconds=e.load_seconds,
                      default=key == catalog.default)
            for key, e in catalog.engines.items()
        ])

    # --- helpers ---------------------------------------------------------------------------------
    def _engine(self, model: str | None) -> ModelEngine:
        """The engine serving ``model`` now, unleased: a reload may retire it under you; prefer ``_lease``."""
        try:
            return self.catalog.get(model)
        except UnknownModelError as exc:
            raise ClientError(404, "unknown_model", str(exc)) from exc
        except ValueError as exc:
            raise ClientError(400, "invalid_model", str(exc)) from exc

    def _lease(self, model: str | None) -> AbstractContextManager[ModelEngine]:
        """``with self._lease(model) as engine:`` for one request: picked once, kept through a reload."""
        return self._engine(model).lease()  # no await between pick and lease: a reload cannot slip in

    @staticmethod
    def _check_top_k(k: int, engine: ModelEngine) -> None:
        if not 1 <= k <= len(engine.manifest.labels):
            raise ClientError(400, "invalid_top_k", f"top_k must be between 1 and {len(engine.manifest.labels)}, got {k}")

    async def _tensor(self, path: Path, engine: ModelEngine) -> tuple[np.ndarray, float]:
        """Decode and preprocess off the event loop; client mistakes become 4xx."""
        start = time.perf_counter()
        try:
            data = await asyncio.to_thread(path.read_bytes)
            tensor = await asyncio.to_thread(image_to_tensor, data, engine.manifest.preprocessing, self.limits)
        except ImageInputError as exc:
            raise ClientError(exc.status_code, exc.kind, str(exc)) from exc
        seconds = time.perf_counter() - start
        PREPROCESS_SECONDS.labels(model=engine.key).observe(seconds)
        return tensor, seconds * 1000

    @staticmethod
    def _predictions(probs: np.ndarray, engine: ModelEngine, k: int) -> list[PredictionOut]:
        return [PredictionOut(label=p.label, index=p.index, score=p.score) for p in top_k(probs, engine.manifest.labels, k)]

    # --- batch jobs over HTTP ----------------------------------------------------------------------
    @bentoml.task(route="/batch")
    async def batch(self, archive: Path, top_k: int = 5, model: str | None = None) -> JSONLines:
        """Score a zip or tar of images as a job: `POST /batch/submit` answers a task_id; `GET /batch/status`
        and `GET /batch/get?task_id=...` give its state and its rows (JSON Lines, one per file, the rows of
        `imgclf batch`). Archives with links, `..`, absolute paths or bomb-like ratios are refused."""
        with self._lease(model) as engine:
            self._check_top_k(top_k, engine)
            scorer = Scorer(engine, top_k=top_k, batch_size=self.settings.max_batch_size, limits=self.limits)
            name, version = engine.manifest.name, engine.manifest.version

            def run() -> str:
                with open(archive, "rb") as fh:
                    rows = score_archive(fh, archive_limits(self.settings), scorer)
                    return "".join(json.dumps(record(row, name, version)) + "\n" for row in rows)

            try:
                return await asyncio.to_thread(run)
            except ImageInputError as exc:
                raise ClientError(exc.status_code, exc.kind, str(exc)) from exc


Classifier.add_asgi_middleware(Admission, routes=("/classify", "/classify_batch"), max_queue=settings.max_queue,
                                latency_budget_ms=settings.latency_budget_ms, on_error=count_error)  # first: before any body is read
Classifier.add_asgi_middleware(ModelsRoute)
Classifier.add_asgi_middleware(AdminRoute, token=settings.admin_token, on_error=count_error)
Classifier.add_asgi_middleware(
    RequestGuard,
    on_error=count_error,
    routes={
        "/classify": UploadRoute("image", settings.max_upload_bytes + 64 * 1024, 1),
        "/classify_batch": UploadRoute("images", settings.max_request_bytes, settings.max_batch_images),
        **{route: UploadRoute("archive", settings.max_archive_bytes, 1, check_fields=check_job_fields,
                              check=partial(check_archive, limits=archive_limits(settings)))
           for route in ("/batch", "/batch/submit")},
    },
)
