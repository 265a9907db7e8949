"""One worker's HTTP edge: every piece of its state, made in one place, and the ASGI stack over BentoML.

:func:`build_app` makes a :class:`Worker` (the catalog, the monitor, the body reader, admission, the
job slots, the V2 service and its gRPC front, the explainer cache, the response cache) from the settings, nothing else.
:meth:`Edge.asgi` wraps BentoML's app in the middleware that is truly cross-cutting, outermost first:

1. :class:`~service.http.errors.ErrorResponses`: every error rendered and counted, once;
2. :class:`~service.http.v2.openapi.V2OpenAPI`: the V2 paths added to BentoML's ``/docs.json``;
3. :class:`~service.http.guard.RequestGuard`: body limits and pace, one multipart parse;
4. :class:`~service.http.admission.AdmissionControl`: 503 + Retry-After when the worker is full;
5. the router of the route table (``service.http.routes``); what it does not answer goes to BentoML.

The guard reads each body before admission counts the request, so slow uploads cannot hold
admission's slots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from service.http import bento, metrics
from service.http.admission import Admission, AdmissionControl, LoadEstimate
from service.http.batch_task import JobClaims, JobSlots
from service.http.body import BodyReader, UploadPace
from service.http.cache import LogitsCache
from service.http.catalog import Catalog
from service.http.errors import ASGIApp, ErrorResponses, Receive, Scope, Send
from service.http.explainers import Explainers
from service.http.guard import RequestGuard
from service.http.live import LiveCatalog
from service.http.monitor import Monitor
from service.http.rollout import Rollouts
from service.http.routes import mount, table
from service.http.sampling import Sampler
from service.http.served import ServedModel
from service.http.v2.grpc_server import GrpcFront
from service.http.v2.openapi import V2OpenAPI
from service.http.v2.serving import V2Service
from service.preprocessing import DecodeLimits
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """Everything one worker process keeps between requests; shared by every front door."""

    settings: Settings
    monitor: Monitor  # what each answer is worth, what was answered (metrics, drift), the samples
    live: LiveCatalog  # the models served now; a reload swaps them whole
    limits: DecodeLimits
    bodies: BodyReader  # one per worker: its cap on bodies in progress is global
    admission: Admission  # one load estimate for /classify, /explain and V2
    jobs: JobSlots
    claims: JobClaims
    explainers: Explainers
    cache: LogitsCache  # logits of images already answered, by model version and image sha256
    rollouts: Rollouts = field(init=False)  # answers counted per version and role; the shadow scored
    v2: V2Service = field(init=False)
    grpc: GrpcFront = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.rollouts = self.monitor.rollouts = Rollouts(self.live, s, self.limits)
        self.v2 = V2Service(self.live, s, self.admission, monitor=self.monitor, cache=self.cache)
        self.grpc = GrpcFront(self.v2, s.grpc_host, s.grpc_port, s.max_request_bytes, s.max_concurrency,
                              s.timeout_s, on_error=metrics.count_error)

    def swapped(self, added: list[ServedModel], retired: list[ServedModel]) -> None:
        """A load or reload changed the models served: metrics, drift windows, explainers and the response
        cache follow."""
        metrics.observe_swap(added, retired)
        self.monitor.forget(retired)
        self.explainers.forget(retired)
        self.cache.forget(retired)

    def polled(self, catalog: Catalog) -> None:
        """After each look at the repository: whether its store answered, and the versions served."""
        metrics.observe_catalog(catalog)

    # --- the worker's life (BentoML's startup and shutdown hooks call these) --------------------------
    def load(self) -> None:
        """Load the production versions (or the ones the settings name): the worker's first catalog."""
        self.live.serve(Catalog.load(self.settings, on_batch=metrics.observe_batch))

    async def start(self) -> None:
        """Watch the aliases (each worker itself: an admin reload reaches only one), report the jobs of a
        worker that died as failed, and serve V2 over gRPC when a port is set."""
        self.live.start_watching(self.settings.watch_seconds)
        await asyncio.to_thread(self.claims.fail_orphans)
        await self.grpc.start()

    async def stop(self) -> None:
        await self.live.stop_watching()
        await self.rollouts.drain()
        await self.grpc.stop()
        if self.monitor.sampler is not None:
            await self.monitor.sampler.drain()


def build_worker(settings: Settings) -> Worker:
    """Every piece of one worker's state, from the settings alone."""
    worker = Worker(
        settings=settings,
        monitor=Monitor(settings, Sampler.from_settings(settings, on_outcome=metrics.count_sample)),
        live=LiveCatalog(settings),
        limits=DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels),
        bodies=BodyReader(UploadPace(settings.upload_grace_s, settings.min_upload_rate), settings.max_receiving,
                          on_receiving=metrics.count_receiving),
        admission=Admission(settings.max_queue, settings.latency_budget_ms, LoadEstimate()),
        jobs=JobSlots(settings.max_batch_jobs),
        claims=JobClaims(bento.jobs_folder(), bento.task_store()),
        explainers=Explainers(),
        cache=LogitsCache.from_settings(settings, on_outcome=metrics.count_cache),
    )
    worker.live.on_swap = worker.swapped
    worker.live.on_poll = worker.polled
    return worker


class Edge:
    """A worker and its route table; :meth:`asgi` is the app BentoML runs inside."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def asgi(self, bentoml_app: ASGIApp, count: Callable[[str], None] = metrics.count_error) -> ASGIApp:
        """The middleware stack of the module docstring over ``bentoml_app``; ``count`` is told the kind of
        every error answered (``imgclf_errors_total``)."""
        endpoints = table(self.worker, bentoml_app)
        app: ASGIApp = AdmissionControl(mount(endpoints, bentoml_app), self.worker.admission, [e.path for e in endpoints if e.admitted])
        app = RequestGuard(app, {e.path: e.upload for e in endpoints if e.upload}, self.worker.bodies)
        app = V2OpenAPI(app, self.worker.v2)
        return _HttpOnly(ErrorResponses(app, count), bentoml_app)


class _HttpOnly:
    """HTTP requests go through the edge; lifespan (BentoML's startup hooks) and websockets go straight on."""

    def __init__(self, edge: ASGIApp, bentoml_app: ASGIApp) -> None:
        self.edge, self.bentoml_app = edge, bentoml_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self.edge if scope["type"] == "http" else self.bentoml_app)(scope, receive, send)


def build_app(settings: Settings) -> Edge:
    """One worker's edge: its state and its route table (``service.http.app`` builds one per worker)."""
    return Edge(build_worker(settings))
