"""The BentoML service: a thin face over the catalog, the shared preprocessing and the models.

Request path: ``guard`` (body limits and pace, one multipart parse) -> ``admission`` -> ``classify``
(answers from the parsed bytes) -> ``service.preprocessing`` (bytes -> tensor) -> ``served`` (the
per-model batching queue) -> ``service.runtime`` (ONNX Runtime, softmax, top-k).
"""

from __future__ import annotations

import asyncio
import json
import os
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml.validators import ContentType
from pydantic import Field

from service.batch.archive import check_archive, score_archive
from service.batch.scoring import Scorer
from service.http import metrics
from service.http.admin import AdminRoute, reload_response
from service.http.admission import Admission, LoadEstimate
from service.http.batch_task import JobClaims, JobFields, JobSlots, archive_limits
from service.http.body import BodyReader, UploadPace
from service.http.catalog import Catalog, LiveCatalog
from service.http.classify import ClassifyRoute, checked_min_score, classify_many, classify_one
from service.http.errors import ClientError, select_model
from service.http.explain_route import FIELDS as EXPLAIN_FIELDS
from service.http.explain_route import ExplainOptions, ExplainRoute, explain_one
from service.http.guard import RequestGuard, UploadRoute
from service.http.monitor import Monitor
from service.http.routes import ModelsRoute, ReadyRoute, models_response
from service.http.sampling import Sampler
from service.http.schemas import BatchResponse, ClassifyResponse, ExplainResponse, ReloadResponse
from service.http.ui import UiRoute
from service.http.v2.grpc_server import GrpcFront
from service.http.v2.openapi import V2OpenAPI
from service.http.v2.route import V2Routes
from service.http.v2.serving import V2Service
from service.memory import limit_malloc_arenas
from service.preprocessing import DecodeLimits, ImageInputError
from service.settings import Settings

settings = Settings.from_env()  # the one place the service reads its environment
# What each answer is worth, what was answered (metrics, drift) and the sampled images, per worker.
monitor = Monitor(settings, Sampler.from_settings(settings, on_outcome=metrics.count_sample))


def _swapped(added: list, retired: list) -> None:
    metrics.observe_swap(added, retired)
    monitor.forget(retired)


live = LiveCatalog(settings, on_swap=_swapped)  # filled in each worker by Classifier.__init__
limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
JSONLines = Annotated[str, ContentType("application/x-ndjson")]
CLASSIFY_FIELDS = frozenset({"top_k", "model", "min_score"})  # the text fields of /classify and /classify_batch
MinScore = Annotated[float | None, Field(ge=0, le=1, description="this request's confidence threshold")]


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
        self.settings = settings
        self.limits = limits
        self.live = live
        live.serve(Catalog.load(settings, on_batch=metrics.observe_batch))

    @property
    def catalog(self) -> Catalog:
        """What this worker serves now; a reload replaces it whole (read it once per request)."""
        return self.live.current

    # --- hot reload (POST /admin/reload in service.http.admin; watching when IMGCLF_POLL_SECONDS or workers > 1) ---
    @bentoml.on_startup
    async def _watch_repository(self) -> None:
        """Each worker watches the aliases itself: an admin reload reaches only one worker."""
        self.live.start_watching(self.settings.watch_seconds)
        await asyncio.to_thread(claims.fail_orphans)  # jobs of a worker that died report failed, not running

    @bentoml.on_shutdown
    async def _stop_watching(self) -> None:
        await self.live.stop_watching()

    # --- Open Inference Protocol over gRPC (IMGCLF_GRPC_PORT): a grpc.aio server on this worker's loop ---
    @bentoml.on_startup
    async def _start_grpc(self) -> None:
        await grpc_front.start()

    @bentoml.on_shutdown
    async def _stop_grpc(self) -> None:
        await grpc_front.stop()

    async def reload(self) -> ReloadResponse:
        """Serve the repository's current production versions (this worker); ReloadRefusedError if one is bad."""
        return reload_response(*await self.live.reload())

    def models_info(self):
        return models_response(self.catalog, monitor)

    @bentoml.on_shutdown
    async def _finish_samples(self) -> None:
        if monitor.sampler is not None:
            await monitor.sampler.drain()

    # --- endpoints -------------------------------------------------------------------------------
    # --- endpoints: the documented contract. Over HTTP, ClassifyRoute answers these two from the guard's
    # one parse of the body (service.http.classify); both paths run the same functions.
    @bentoml.api
    async def classify(self, image: Path, top_k: int = 5, model: str | None = None,
                       min_score: MinScore = None) -> ClassifyResponse:
        """Classify one image (multipart field `image`); scores are calibrated probabilities. `confident`
        says whether the top-1 score reaches `min_score`, else the model's threshold (null: it has none)."""
        return await classify_one(self.live, self.limits, await asyncio.to_thread(image.read_bytes), top_k, model,
                                  checked_min_score(min_score), monitor)

    @bentoml.api
    async def classify_batch(self, images: list[Path], top_k: int = 5, model: str | None = None,
                             min_score: MinScore = None) -> BatchResponse:
        """Classify several images (repeated field `images`); one bad image fails only its own entry."""
        data = [await asyncio.to_thread(p.read_bytes) for p in images]
        return await classify_many(self.live, self.limits, self.settings.max_batch_images, data, top_k, model,
                                   checked_min_score(min_score), monitor)

    @bentoml.api
    async def explain(self, image: Path, model: str | None = None, target: str | None = None,
                      format: Literal["json", "png"] = "json") -> ExplainResponse:
        """Where the model saw a class (multipart field `image`; `target`: a label or an index, default top-1):
        a heatmap in [0, 1] over the model's input crop and where that crop lies in the upright photo.
        `format=png` answers the heatmap over the crop as image/png instead (the JSON fields in X- headers)."""
        data = await asyncio.to_thread(image.read_bytes)
        result = await explain_one(self.live, self.limits, data, ExplainOptions(model, target or None, format))
        # over HTTP, ExplainRoute answers (png included) before this is reached
        return ExplainResponse.model_validate(result.explanation().model_dump())

    # --- batch jobs over HTTP ----------------------------------------------------------------------
    @bentoml.task(route="/batch")
    async def batch(self, archive: Path, ctx: bentoml.Context, top_k: int = 5, model: str | None = None) -> JSONLines:
        """Score a zip or tar of images as a job: `POST /batch/submit` answers a task_id; `GET /batch/status`
        and `GET /batch/get?task_id=...` give its state and its rows (JSON Lines, one per file, the rows of
        `imgclf batch`). Archives with links, `..`, absolute paths or bomb-like ratios are refused."""
        task_id = getattr(ctx.request.state, "task_id", None)
        with jobs.running(), claims.claim(task_id), select_model(self.catalog, model, top_k).lease() as served:
            scorer = Scorer(served.model, top_k=top_k, batch_size=self.settings.max_batch_size, limits=self.limits)
            name, version = served.manifest.name, served.manifest.version

            def run() -> str:
                with open(archive, "rb") as fh:
                    rows = score_archive(fh, archive_limits(self.settings), scorer)
                    return "".join(json.dumps(row.to_record(name, version)) + "\n" for row in rows)

            try:
                return await asyncio.to_thread(run)
            except ImageInputError as exc:
                raise ClientError(exc.status_code, exc.kind, str(exc)) from exc


# One of each per worker, shared by every front door (multipart, Open Inference Protocol): the caps are global.
bodies = BodyReader(UploadPace(settings.upload_grace_s, settings.min_upload_rate), settings.max_receiving,
                    metrics.count_error, on_receiving=metrics.count_receiving)
load = LoadEstimate()
jobs = JobSlots(settings.max_batch_jobs)
claims = JobClaims(Path(BentoMLContainer.bentoml_home.get()) / "imgclf-jobs",
                   Path(BentoMLContainer.result_store_file.get()))
# The Open Inference Protocol (service/http/v2): its REST routes come first (they answer V2's own error
# shape) and share the body reader, the load estimate and the limits of /classify; gRPC shares the same.
v2 = V2Service(live, settings, Admission(None, routes=(), max_queue=settings.max_queue,
                                         latency_budget_ms=settings.latency_budget_ms, estimate=load),
               monitor=monitor)
grpc_front = GrpcFront(v2, settings.grpc_host, settings.grpc_port, settings.max_request_bytes,
                       settings.max_concurrency, settings.timeout_s)
Classifier.add_asgi_middleware(V2OpenAPI, service=v2)
Classifier.add_asgi_middleware(V2Routes, service=v2, bodies=bodies, max_body=settings.max_request_bytes)
# Order matters: the guard reads each body (limits, pace, the cap on bodies in progress) before
# admission counts the request, so slow uploads cannot hold admission's slots.
Classifier.add_asgi_middleware(
    RequestGuard,
    on_error=metrics.count_error,
    bodies=bodies,
    routes={
        "/classify": UploadRoute("image", settings.max_upload_bytes + 64 * 1024, 1, other_fields=CLASSIFY_FIELDS),
        "/classify_batch": UploadRoute("images", settings.max_request_bytes, settings.max_batch_images,
                                       other_fields=CLASSIFY_FIELDS),
        "/explain": UploadRoute("image", settings.max_upload_bytes + 64 * 1024, 1, other_fields=EXPLAIN_FIELDS),
        **{route: UploadRoute("archive", settings.max_archive_bytes, 1, check_fields=JobFields(live, jobs),
                              check=partial(check_archive, limits=archive_limits(settings)), in_memory=False)
           for route in ("/batch", "/batch/submit")},
    },
)
Classifier.add_asgi_middleware(Admission, routes=("/classify", "/classify_batch", "/explain"),
                                max_queue=settings.max_queue, latency_budget_ms=settings.latency_budget_ms,
                                on_error=metrics.count_error, estimate=load)
Classifier.add_asgi_middleware(ClassifyRoute, live=live, limits=limits, max_images=settings.max_batch_images,
                                monitor=monitor)
Classifier.add_asgi_middleware(ExplainRoute, live=live, limits=limits)  # POST /explain (service.http.explain_route)
Classifier.add_asgi_middleware(ModelsRoute, live=live, monitor=monitor)
Classifier.add_asgi_middleware(UiRoute)  # GET /ui: the page (service/http/ui/)
Classifier.add_asgi_middleware(ReadyRoute, live=live)
Classifier.add_asgi_middleware(AdminRoute, live=live, token=settings.admin_token, on_error=metrics.count_error)
