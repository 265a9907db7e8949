"""``GET /ui`` and its assets: a plain ASGI app in the route table (``service.http.routes``).

Why no build step: the page is three small files read from this package
once per worker, so a fresh clone, a wheel and a bento serve the same bytes with no internet.

Every answer here (the assets and the errors) carries a Content-Security-Policy that allows scripts,
styles, images and connections from this origin only: no inline script, no ``eval``, no CDN, and the
page cannot be framed. Labels and messages are inserted as text by ``app.js``; the policy is the second
wall, so a label written as HTML could not run even if it were ever parsed as HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from service.http.errors import Receive, Scope, Send, ServiceError, send_response

#: The page draws previews and heatmaps on canvases from decoded blobs (createImageBitmap), so images
#: need no ``blob:`` or ``data:`` source; ``form-action 'none'``: the page never submits a form itself.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PREFIX = "/ui"
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """path -> asset: ``/ui`` and ``/ui/`` are the page, ``/ui/<file>`` the files of ``static/``."""
    folder = resources.files("service.http.ui") / "static"
    assets = {f"{PREFIX}/{name}": Asset((folder / name).read_bytes(), kind) for name, kind in _TYPES.items()}
    page = assets.pop(f"{PREFIX}/index.html")
    return {PREFIX: page, f"{PREFIX}/": page, **assets}


def security_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cache-control", b"no-cache"),  # revalidate: a new release's page is never mixed with an old script
    ]


class UiRoute:
    """GET/HEAD ``/ui`` (the page) and ``/ui/app.js``, ``/ui/style.css``, ``/ui/icon.svg``."""

    def __init__(self) -> None:
        self.assets = load_assets()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        asset = self.assets.get(path)
        if scope["method"] not in ("GET", "HEAD"):
            raise ServiceError(405, "method_not_allowed", f"use GET {path[:200]}",
                               [*security_headers(), (b"allow", b"GET, HEAD")])
        if asset is None:
            raise ServiceError(404, "not_found", f"no file {path[:200]}; the page is {PREFIX}", security_headers())
        await send_response(send, 200, asset.body, security_headers(), asset.content_type.encode(),
                            head=scope["method"] == "HEAD")
