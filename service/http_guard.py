"""ASGI middleware at the HTTP boundary: what BentoML 1.4 leaves open, closed before it parses.

- BentoML sets no body limit: bodies over the limit get 413 as soon as the
  declared or received length passes it, without reading the rest.
- A string in a file field makes BentoML download it as a URL (a server-side
  request on the client's behalf), and a malformed multipart body is a 500:
  both are refused here with 400 and a message.
- BentoML renders a 4xx raised from an API as a one-element JSON list, and its
  own validation errors in another shape; both become the
  ``{"error": ..., "kind": ..., "status": ...}`` object every error here uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import IO, Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.preprocessing import ImageInputError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class UploadRoute:
    file_field: str
    max_body: int
    max_files: int
    other_fields: frozenset[str] = frozenset({"top_k", "model"})
    check: Callable[[IO[bytes]], None] | None = None  # raises ImageInputError to refuse an upload's content


def error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": message, "kind": kind, "status": status}).encode()


async def respond(send: Send, status: int, kind: str, message: str, headers: list | None = None) -> None:
    body = error_body(status, kind, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(
        self, app: ASGIApp, routes: dict[str, UploadRoute], on_error: Callable[[str], None] | None = None
    ) -> None:
        self.app = app
        self.routes = routes
        self.on_error = on_error  # told the kind of every refusal, for metrics

    async def _refuse(self, send: Send, status: int, kind: str, message: str, headers: list | None = None) -> None:
        if self.on_error is not None:
            self.on_error(kind)
        await respond(send, status, kind, message, headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send, route)
        if body is None:
            return
        problem = await self._check_form(scope, body, route)
        if problem is not None:
            await self._refuse(send, *problem)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, _unwrap_errors(send))

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, route: UploadRoute) -> bytes | None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"request body is larger than {route.max_body} bytes"
        if declared is not None and declared.isdigit() and int(declared) > route.max_body:
            await self._refuse(send, 413, "request_too_large", too_big, [(b"connection", b"close")])
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > route.max_body:
                await self._refuse(send, 413, "request_too_large", too_big, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, scope: Scope, body: bytes, route: UploadRoute) -> tuple[int, str, str] | None:
        """None when the body is a well-formed upload; else (status, kind, message)."""
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        expected = f"send multipart/form-data with the image file in the field {route.file_field!r}"
        if not content_type.lower().startswith("multipart/form-data"):
            return 400, "invalid_request", f"{expected} (got content type {content_type or 'none'!r})"
        sent = False

        async def once() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, once)
        try:
            form = await request.form(max_files=route.max_files + 1, max_fields=len(route.other_fields) + 8)
        except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
            return 400, "invalid_request", f"malformed multipart body: {exc}"
        try:
            unknown = sorted(set(form.keys()) - route.other_fields - {route.file_field})
            if unknown:
                allowed = sorted({route.file_field, *route.other_fields})
                return 400, "invalid_request", f"unknown form field(s) {unknown}; allowed: {allowed}"
            values = form.getlist(route.file_field)
            if not values:
                return 400, "invalid_request", f"missing file field {route.file_field!r}; {expected}"
            if any(not isinstance(v, UploadFile) for v in values):
                return 400, "invalid_request", f"{route.file_field!r} must be a file upload; URLs and text are not fetched"
            if len(values) > route.max_files:
                return 400, "too_many_images", f"at most {route.max_files} images per request, got {len(values)}"
            if route.check is not None:
                for upload in values:
                    try:
                        await asyncio.to_thread(route.check, upload.file)
                    except ImageInputError as exc:
                        return exc.status_code, exc.kind, str(exc)
            return None
        finally:
            await form.close()


def _unwrap_errors(send: Send) -> Send:
    """Rewrite BentoML's ``[{"error": ...}]`` 4xx bodies into the error object."""
    state: dict[str, Any] = {"start": None, "chunks": []}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            state["start"] = message
            return
        if state["start"] is None:
            await send(message)
            return
        state["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start, body = state["start"], b"".join(state["chunks"])
        try:
            data = json.loads(body)
            if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
                inner = json.loads(data[0]["error"])
                body = error_body(start["status"], inner["kind"], inner["message"])
            elif isinstance(data, dict) and isinstance(data.get("detail"), list):  # pydantic validation
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in data["detail"]
                )
                body = error_body(start["status"], "invalid_request", problems or str(data.get("error")))
        except (ValueError, KeyError, TypeError):
            pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped
