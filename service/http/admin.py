"""Admin endpoints, behind a bearer token: ``POST /admin/reload``.

An ASGI middleware rather than a BentoML API, so the admin surface stays out of
the public OpenAPI schema and is checked before BentoML parses anything.

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
from collections.abc import Callable

from pydantic import SecretStr
from starlette.responses import JSONResponse

from service.http.catalog import Catalog, Change, LiveCatalog, ReloadRefusedError
from service.http.errors import ASGIApp, Receive, Scope, Send, refuse
from service.http.schemas import ReloadResponse, ServedVersion, VersionChange

log = logging.getLogger(__name__)

PREFIX = "/admin"
RELOAD = "/admin/reload"
CHALLENGE = b'Bearer realm="imgclf-admin"'


def reload_response(catalog: Catalog, changes: list[Change]) -> ReloadResponse:
    return ReloadResponse(
        models=[ServedVersion(name=e.manifest.name, version=e.manifest.version) for e in catalog.engines.values()],
        changed=[VersionChange(name=c.name, from_=c.old, to=c.new) for c in changes],
    )


def bearer_token(scope: Scope) -> bytes | None:
    """The raw token of ``Authorization: Bearer <token>``, or None."""
    for key, value in scope.get("headers") or []:
        if key.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class AdminRoute:
    """Answers ``/admin/*`` itself; everything else passes through."""

    def __init__(self, app: ASGIApp, live: LiveCatalog, token: SecretStr | None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.live = live
        self._token = token.get_secret_value().encode() if token is not None else None
        self.on_error = on_error  # told the kind of every refusal, for metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        if self._token is None:
            await refuse(send, self.on_error, 404, "not_found", "admin endpoints are off: set IMGCLF_ADMIN_TOKEN to enable them")
            return
        given = bearer_token(scope)
        if given is None:
            await refuse(send, self.on_error, 401, "unauthorized", "send Authorization: Bearer <IMGCLF_ADMIN_TOKEN>",
                               [(b"www-authenticate", CHALLENGE)])
            return
        if not hmac.compare_digest(given, self._token):
            await refuse(send, self.on_error, 401, "unauthorized", "wrong admin token",
                               [(b"www-authenticate", CHALLENGE + b', error="invalid_token"')])
            return
        if path.rstrip("/") != RELOAD:
            await refuse(send, self.on_error, 404, "not_found", f"no admin endpoint {path}; there is POST {RELOAD}")
            return
        if scope["method"] != "POST":
            await refuse(send, self.on_error, 405, "method_not_allowed", f"use POST {RELOAD}", [(b"allow", b"POST")])
            return
        try:
            result = reload_response(*await self.live.reload())
        except ReloadRefusedError as exc:
            log.warning("admin reload refused: %s", exc)
            await refuse(send, self.on_error, 409, "reload_refused", str(exc))
            return
        response = JSONResponse(result.model_dump(mode="json", by_alias=True))
        await response(scope, receive, send)
