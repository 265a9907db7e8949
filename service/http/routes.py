"""Plain ASGI routes that BentoML APIs cannot express: ``GET /models`` and a ``/readyz`` with a reason.

BentoML APIs are POST-only and a mounted app only sees ``/models/...`` (Starlette redirects
``/models`` with a 307), so a small middleware answers the exact path itself. BentoML's own
``/readyz`` answers a bare status; a worker that could not load a production version answers 503
with the reason here instead (and serves its other models).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from service.http.catalog import Catalog, LiveCatalog
from service.http.errors import ASGIApp, Receive, Scope, Send
from service.http.monitor import Monitor
from service.http.schemas import DriftOut, ModelInfo, ModelsResponse


def models_response(catalog: Catalog, monitor: Monitor | None = None) -> ModelsResponse:
    """What this worker serves; with ``monitor``, each model's drift window in this worker too."""
    return ModelsResponse(models=[
        ModelInfo(name=e.manifest.name, version=e.manifest.version, labels=len(e.manifest.labels),
                  preprocessing=e.manifest.preprocessing, provider=e.provider, load_seconds=e.load_seconds,
                  default=key == catalog.default,
                  threshold=e.manifest.selective.threshold if e.manifest.selective else None,
                  selective=e.manifest.selective,
                  drift=DriftOut(**vars(monitor.drift(e))) if monitor is not None else None)
        for key, e in catalog.engines.items()
    ], not_loaded=catalog.failed)


class ReadyRoute:
    """GET /readyz: 503 with the reason while a version this worker should serve failed to load."""

    def __init__(self, app: ASGIApp, live: LiveCatalog) -> None:
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failed = self.live.current.failed if scope["type"] == "http" and scope["path"] == "/readyz" else None
        if not failed:
            await self.app(scope, receive, send)
            return
        reason = "; ".join(f"{key}: {why}" for key, why in failed.items())
        body = {"error": f"not ready: could not load {reason}", "kind": "not_ready", "status": 503}
        await JSONResponse(body, 503)(scope, receive, send)


class ModelsRoute:
    """GET /models: what this worker serves now."""

    def __init__(self, app: ASGIApp, live: LiveCatalog, monitor: Monitor | None = None) -> None:
        self.app = app
        self.live = live
        self.monitor = monitor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != "/models":
            await self.app(scope, receive, send)
            return
        if scope["method"] != "GET":
            response = JSONResponse({"error": "use GET /models", "kind": "method_not_allowed", "status": 405}, 405)
        else:
            response = JSONResponse(models_response(self.live.current, self.monitor).model_dump(mode="json"))
        await response(scope, receive, send)
