"""Admin endpoints, behind a bearer token: ``POST /admin/reload``.

A plain ASGI app in the route table (``service.http.routes``) rather than a
BentoML API, so the admin surface stays out of the public OpenAPI schema and is
checked before BentoML parses anything.

- No ``IMGCLF_ADMIN_TOKEN``: every ``/admin`` path answers 404, as if absent.
- Missing or wrong token: 401 with ``WWW-Authenticate: Bearer``. The token is
  compared in constant time and never logged.
- ``POST /admin/reload`` reloads the worker that took the request, now, and
  answers 200 with :class:`~service.http.schemas.ReloadResponse`, or 409
  ``reload_refused`` when a new version fails to load or verify (the old one
  keeps serving). With several workers the others converge by watching the
  aliases (``Settings.watch_seconds``), within a poll interval plus load time.
"""

from __future__ import annotations

import hmac
import logging

from pydantic import SecretStr
from starlette.responses import JSONResponse

from service.http.catalog import Catalog, Change, ReloadRefusedError
from service.http.errors import Receive, Scope, Send, ServiceError
from service.http.live import LiveCatalog
from service.http.schemas import ReloadResponse, ServedVersion, VersionChange

log = logging.getLogger(__name__)

PREFIX = "/admin"
RELOAD = "/admin/reload"
CHALLENGE = b'Bearer realm="imgclf-admin"'


def reload_response(catalog: Catalog, changes: list[Change]) -> ReloadResponse:
    return ReloadResponse(
        models=[ServedVersion(name=e.manifest.name, version=e.manifest.version) for e in catalog.models.values()],
        changed=[VersionChange(name=c.name, from_=c.old, to=c.new) for c in changes],
    )


def bearer_token(scope: Scope) -> bytes | None:
    """The raw token of ``Authorization: Bearer <token>``, or None."""
    for key, value in scope.get("headers") or []:
        if key.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class AdminToken:
    """The bearer token of every admin surface (``/admin``, V2's repository load): compared in constant
    time, never logged. No token set: the surface is off (404, as if absent)."""

    def __init__(self, token: SecretStr | None) -> None:
        self._token = token.get_secret_value().encode() if token is not None else None

    def check(self, scope: Scope) -> None:
        """Raise ServiceError 404 (off) or 401 (missing or wrong token, with ``WWW-Authenticate``)."""
        if self._token is None:
            raise ServiceError(404, "not_found", "admin endpoints are off: set IMGCLF_ADMIN_TOKEN to enable them")
        given = bearer_token(scope)
        if given is None:
            raise ServiceError(401, "unauthorized", "send Authorization: Bearer <IMGCLF_ADMIN_TOKEN>",
                               [(b"www-authenticate", CHALLENGE)])
        if not hmac.compare_digest(given, self._token):
            raise ServiceError(401, "unauthorized", "wrong admin token",
                               [(b"www-authenticate", CHALLENGE + b', error="invalid_token"')])


class AdminRoute:
    """Every ``/admin`` path: the token first (so nothing about the surface leaks), then the route."""

    def __init__(self, live: LiveCatalog, token: AdminToken) -> None:
        self.live = live
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        self.token.check(scope)
        if path.rstrip("/") != RELOAD:
            raise ServiceError(404, "not_found", f"no admin endpoint {path}; there is POST {RELOAD}")
        if scope["method"] != "POST":
            raise ServiceError(405, "method_not_allowed", f"use POST {RELOAD}", [(b"allow", b"POST")])
        try:
            result = reload_response(*await self.live.reload())
        except ReloadRefusedError as exc:
            log.warning("admin reload refused: %s", exc)
            raise ServiceError(409, "reload_refused", str(exc)) from exc
        await JSONResponse(result.model_dump(mode="json", by_alias=True))(scope, receive, send)
