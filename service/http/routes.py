"""The route table: every path the service answers itself, and what the middleware must do for it.

One row per route. ``handler`` answers it (None: BentoML does, e.g. its ``/batch`` task routes);
``upload`` says the request guard reads, checks and parses the body first (limits, pace, one multipart
parse); ``admitted`` says admission counts it. The router, the guard and admission are all built from
this table (``service.http.edge``), so a route's whole behaviour is on its row. Paths not here go on
to BentoML (``/metrics``, ``/livez``, ``/docs.json``, the ``/batch`` task routes).

To add a route: write a handler (a Starlette endpoint taking a ``Request``, or an ASGI app for a
whole prefix), raise :class:`~service.http.errors.ServiceError` for the client's mistakes, and add its
row below.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.datastructures import URLPath
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, NoMatchFound, Router, request_response

from service.batch.archive import check_archive
from service.http.admin import AdminRoute, AdminToken
from service.http.batch_task import JobFields, archive_limits
from service.http.classify import ClassifyRoutes
from service.http.errors import V2_PREFIX, ASGIApp, Message, Receive, Scope, Send, ServiceError
from service.http.explain_route import FIELDS as EXPLAIN_FIELDS
from service.http.explain_route import ExplainRoutes
from service.http.guard import UploadRoute
from service.http.schemas import (
    DriftOut,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
    RolloutOut,
    StoreOut,
)
from service.http.ui import UiRoute
from service.http.v2.route import V2App

if TYPE_CHECKING:
    from service.http.catalog import Catalog
    from service.http.edge import Worker
    from service.http.monitor import Monitor

CLASSIFY_FIELDS = frozenset({"top_k", "model", "min_score"})  # the text fields of /classify and /classify_batch
FORM_OVERHEAD = 64 * 1024  # multipart framing and text fields around one upload


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: Any = None  # a Starlette endpoint, an ASGI app, or None: BentoML answers
    methods: tuple[str, ...] | None = None  # the methods an endpoint takes (others: 405); None for an ASGI app
    # (which answers every method itself)
    upload: UploadRoute | None = None  # the guard reads and parses the body of a POST first
    admitted: bool = False  # admission counts a POST (503 + Retry-After when the worker is full)
    prefix: bool = False  # the handler answers every path under ``path`` too

    def answers(self, path: str) -> bool:
        return path == self.path or (self.prefix and path.startswith(self.path + "/"))


class _Row(BaseRoute):
    """One row in Starlette's router, matched on the exact path (or the prefix).

    Starlette's own ``Route`` matches with a regex whose ``$`` also accepts a trailing newline and whose
    ``{rest:path}`` stops at one, so an encoded ``%0A`` slipped past a row (and past the guard's exact
    lookup) to BentoML, which answered plain text; these rows compare strings instead.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        handler = endpoint.handler
        self.app = request_response(handler) if inspect.isroutine(getattr(handler, "func", handler)) else handler

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and self.endpoint.answers(scope["path"]):
            return Match.FULL, {"endpoint": self.endpoint.handler}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self.endpoint.methods
        if methods is not None and scope["method"] not in methods:
            allow = ", ".join(methods)
            raise ServiceError(405, "method_not_allowed", f"method not allowed: {scope['method']} "
                               f"{scope['path'][:200]}; allowed: {allow}", [(b"allow", allow.encode())])
        await self.app(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)


def mount(endpoints: list[Endpoint], default: ASGIApp) -> Router:
    """Starlette's router over the rows that have a handler; any other path goes to ``default`` (BentoML)."""

    async def unrouted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("router") is router:  # BentoML's own router must see no other (url_for, mounts)
            del scope["router"]
        await default(scope, receive, send)

    router = Router([_Row(e) for e in endpoints if e.handler is not None], redirect_slashes=False, default=unrouted)
    return router


def table(worker: Worker, bentoml_app: ASGIApp) -> list[Endpoint]:
    """Every route of one worker, its handler given that worker's objects."""
    s = worker.settings
    image = partial(UploadRoute, "image", s.max_upload_bytes + FORM_OVERHEAD, 1)
    archive = UploadRoute("archive", s.max_archive_bytes, 1, check_fields=JobFields(worker.live, worker.jobs),
                          check=partial(check_archive, limits=archive_limits(s)), in_memory=False)
    classify = ClassifyRoutes(worker.live, worker.limits, s.max_batch_images, worker.monitor, worker.cache)
    models = ModelsRoute(worker)
    admin = AdminToken(s.admin_token)  # /admin and V2's repository load and unload
    return [
        Endpoint("/classify", classify.classify, ("POST",), image(other_fields=CLASSIFY_FIELDS), admitted=True),
        Endpoint("/classify_batch", classify.classify_batch, ("POST",),
                 UploadRoute("images", s.max_request_bytes, s.max_batch_images, other_fields=CLASSIFY_FIELDS),
                 admitted=True),
        Endpoint("/explain", ExplainRoutes(worker.live, worker.limits, worker.explainers).explain, ("POST",),
                 image(other_fields=EXPLAIN_FIELDS), admitted=True),
        Endpoint("/batch", None, upload=archive),  # BentoML's task routes (service.http.app.Classifier.batch)
        Endpoint("/batch/submit", None, upload=archive),
        Endpoint("/models", models),
        Endpoint("/models/", models),
        Endpoint("/readyz", ReadyRoute(worker, bentoml_app)),
        Endpoint("/ui", UiRoute(), prefix=True),
        Endpoint("/admin", AdminRoute(worker.live, admin), prefix=True),
        Endpoint(V2_PREFIX, V2App(worker.v2, worker.bodies, s.max_request_bytes, admin), prefix=True),
    ]


def store_of(catalog: Catalog) -> StoreOut | None:
    repo = catalog.repo
    if repo is None:
        return None
    return StoreOut(location=repo.location, reachable=repo.unreachable is None, error=repo.unreachable)


def rollouts_of(catalog: Catalog) -> dict[str, RolloutOut]:
    return {name: RolloutOut(**trial.model_dump()) for name, trial in catalog.rollouts.items()}


def models_response(catalog: Catalog, monitor: Monitor | None = None) -> ModelsResponse:
    """What this worker serves; with ``monitor``, each model's drift window in this worker too."""
    default = catalog.pick(None).key if catalog.default is not None else None
    return ModelsResponse(models=[
        ModelInfo(name=m.manifest.name, version=m.manifest.version, labels=len(m.manifest.labels),
                  preprocessing=m.manifest.preprocessing, provider=m.provider, precision=m.manifest.export.precision,
                  load_seconds=m.load_seconds,
                  default=m.key == default,
                  threshold=m.manifest.selective.threshold if m.manifest.selective else None,
                  selective=m.manifest.selective,
                  drift=DriftOut(**vars(monitor.drift(m))) if monitor is not None else None)
        for m in catalog.models.values()
    ], not_loaded=catalog.failed, rollouts=rollouts_of(catalog), store=store_of(catalog))


class ModelsRoute:
    """GET /models: what this worker serves now (any other method: a 405 that says to use GET)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            raise ServiceError(405, "method_not_allowed", "use GET /models")
        document = models_response(self.worker.live.current, self.worker.monitor).model_dump(mode="json")
        await JSONResponse(document)(scope, receive, send)


class ReadyRoute:
    """GET /readyz: 503 with the reason while a version this worker should serve failed to load, or while
    BentoML says the service is not ready; else the versions served (a load balancer or a rollout script
    sees which version each replica serves). An unreachable store does not make a worker unready: it
    serves its verified cache, and says so here."""

    def __init__(self, worker: Worker, bentoml_app: ASGIApp) -> None:
        self.worker, self.bentoml_app = worker, bentoml_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        catalog = self.worker.live.current
        if catalog.not_ready is not None:
            raise ServiceError(503, "not_ready", catalog.not_ready)
        status = 0

        async def heard(message: Message) -> None:  # BentoML's own check, its answer not sent
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.bentoml_app(scope, receive, heard)
        if status != 200:
            raise ServiceError(503, "not_ready", f"BentoML reports the service not ready (status {status})")
        ready = ReadyResponse(serving=catalog.production, rollouts=rollouts_of(catalog), store=store_of(catalog))
        await JSONResponse(ready.model_dump(mode="json"))(scope, receive, send)
