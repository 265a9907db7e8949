"""ASGI middleware at the HTTP boundary: what BentoML 1.4 leaves open, closed before it parses.

- BentoML sets no body limit: bodies over the limit get 413 as soon as the
  declared or received length passes it, without reading the rest.
- A string in a file field makes BentoML download it as a URL (a server-side
  request on the client's behalf), and a malformed multipart body is a 500:
  both are refused here with 400 and a message.
- BentoML saves each upload to a temporary file named after the client's file
  name: a name longer than the file system allows (about 240 bytes) was a 500.
  Such names are replaced before BentoML sees them (the service never uses
  file names: formats are detected from the bytes).
- BentoML renders a 4xx raised from an API as a one-element JSON list, its
  own validation errors in another shape, task errors as ``{"error": ...}`` and
  unknown paths or methods as plain text; every error response that passes
  through here becomes the ``{"error": ..., "kind": ..., "status": ...}``
  object every error of the service uses.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from service.preprocessing import ImageInputError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Longest upload file name passed on to BentoML, in UTF-8 bytes. BentoML makes
#: ``tmpXXXXXXXX<name>`` in a temporary folder; file systems allow 255 bytes.
MAX_FILENAME_BYTES = 128
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")

#: ``kind`` of error responses that carry none of their own (BentoML's, the router's).
_KINDS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 408: "timeout", 413: "request_too_large", 415: "unsupported_media_type",
          422: "invalid_request", 429: "too_many_requests", 500: "internal_error", 503: "unavailable",
          504: "timeout"}


@dataclass(frozen=True)
class UploadRoute:
    file_field: str
    max_body: int
    max_files: int
    other_fields: frozenset[str] = frozenset({"top_k", "model"})
    check: Callable[[IO[bytes]], None] | None = None  # raises ImageInputError to refuse an upload's content
    # The text fields -> None or (status, kind, message) to refuse them now: for routes that queue a job,
    # whose own checks would otherwise only fail the job later, after a 200.
    check_fields: Callable[[dict[str, str]], tuple[int, str, str] | None] | None = None


def error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": message, "kind": kind, "status": status}).encode()


async def respond(send: Send, status: int, kind: str, message: str, headers: list | None = None) -> None:
    body = error_body(status, kind, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def refuse(
    send: Send, on_error: Callable[[str], None] | None, status: int, kind: str, message: str,
    headers: list | None = None,
) -> None:
    """Answer an error and tell ``on_error`` its kind (for the errors metric)."""
    if on_error is not None:
        on_error(kind)
    await respond(send, status, kind, message, headers)


class RequestGuard:
    def __init__(
        self, app: ASGIApp, routes: dict[str, UploadRoute], on_error: Callable[[str], None] | None = None
    ) -> None:
        self.app = app
        self.routes = routes
        self.on_error = on_error  # told the kind of every refusal, for metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.routes.get(scope.get("path", ""))
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, normalise_errors(send, scope))
            return
        body = await self._read_body(scope, receive, send, route)
        if body is None:
            return
        problem, rebuilt = await self._check_form(scope, body, route)
        if problem is not None:
            await refuse(send, self.on_error, *problem)
            return
        if rebuilt is not None:
            body, content_type = rebuilt
            headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
            scope = {**scope, "headers": headers}

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, normalise_errors(send, scope))

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, route: UploadRoute) -> bytes | None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"request body is larger than {route.max_body} bytes"
        if declared is not None and declared.isdigit() and int(declared) > route.max_body:
            await refuse(send, self.on_error, 413, "request_too_large", too_big, [(b"connection", b"close")])
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > route.max_body:
                await refuse(send, self.on_error, 413, "request_too_large", too_big, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(
        self, scope: Scope, body: bytes, route: UploadRoute
    ) -> tuple[tuple[int, str, str] | None, tuple[bytes, bytes] | None]:
        """(problem, rebuilt): problem is (status, kind, message) when the body is refused; rebuilt is
        (body, content type) when the body must be re-encoded for BentoML (unsafe file names), else None."""
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        expected = f"send multipart/form-data with the image file in the field {route.file_field!r}"
        if not content_type.lower().startswith("multipart/form-data"):
            return (400, "invalid_request", f"{expected} (got content type {content_type or 'none'!r})"), None
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
            return (400, "invalid_request", f"malformed multipart body: {exc}"), None
        try:
            unknown = sorted(set(form.keys()) - route.other_fields - {route.file_field})
            if unknown:
                allowed = sorted({route.file_field, *route.other_fields})
                return (400, "invalid_request", f"unknown form field(s) {unknown}; allowed: {allowed}"), None
            repeated = sorted(k for k in route.other_fields if len(form.getlist(k)) > 1)
            if repeated:
                return (400, "invalid_request", f"field(s) {repeated} given more than once; send each once"), None
            values = form.getlist(route.file_field)
            if not values:
                return (400, "invalid_request", f"missing file field {route.file_field!r}; {expected}"), None
            if any(not isinstance(v, UploadFile) for v in values):
                message = f"{route.file_field!r} must be a file upload; URLs and text are not fetched"
                return (400, "invalid_request", message), None
            if len(values) > route.max_files:
                message = f"at most {route.max_files} images per request, got {len(values)}"
                return (400, "too_many_images", message), None
            if route.check_fields is not None:
                texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
                problem = route.check_fields(texts)
                if problem is not None:
                    return problem, None
            if route.check is not None:
                for upload in values:
                    try:
                        await asyncio.to_thread(route.check, upload.file)
                    except ImageInputError as exc:
                        return (exc.status_code, exc.kind, str(exc)), None
            if any(isinstance(v, UploadFile) and not _filename_is_safe(v.filename) for _, v in form.multi_items()):
                return None, await asyncio.to_thread(_reencode, form)
            return None, None
        finally:
            await form.close()


def _filename_is_safe(filename: str | None) -> bool:
    """Whether BentoML can use ``filename`` in a temporary file name (it keeps the base name)."""
    if not filename:
        return True
    base = os.path.basename(filename)
    return "\x00" not in base and len(base.encode("utf-8", "surrogatepass")) <= MAX_FILENAME_BYTES


def _safe_filename(filename: str | None) -> str:
    suffix = _SAFE_SUFFIX.fullmatch(os.path.splitext(filename or "")[1])
    return "upload" + (suffix.group(0) if suffix else "")


def _reencode(form: FormData) -> tuple[bytes, bytes]:
    """The form as a new multipart body (and its content type), every file named ``upload.<ext>``.

    Only fields the route allows are in ``form`` (checked before), so their names need no escaping,
    and the new file names need none either.
    """
    boundary = secrets.token_hex(16)
    with io.BytesIO() as out:
        for name, value in form.multi_items():
            out.write(f"--{boundary}\r\n".encode())
            if isinstance(value, UploadFile):
                part_type = (value.content_type or "application/octet-stream").replace("\r", "").replace("\n", "")
                out.write(f'Content-Disposition: form-data; name="{name}"; filename="{_safe_filename(value.filename)}"\r\n'
                          f"Content-Type: {part_type}\r\n\r\n".encode())
                value.file.seek(0)
                shutil.copyfileobj(value.file, out)
            else:
                out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
        return out.getvalue(), f"multipart/form-data; boundary={boundary}".encode()


def _router_message(status: int, scope: Scope | None, headers: list) -> str | None:
    """What to say instead of the router's bare "Not Found" / "Method Not Allowed"."""
    if scope is None or status not in (404, 405):
        return None
    where = f"{scope.get('method', '')} {scope.get('path', '')[:200]}"
    if status == 404:
        return f"no endpoint {where}; the API is described at /docs.json"
    allow = next((v.decode("latin-1") for k, v in headers if k.lower() == b"allow"), "")
    return f"method not allowed: {where}" + (f"; allowed: {allow}" if allow else "")


def _error_object(status: int, body: bytes, plain: str | None = None) -> bytes:
    """``body`` of an error response as the service's error object (unchanged if it is one already).

    ``plain`` replaces a body that is not JSON (the router's plain-text answers).
    """
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    kind = _KINDS.get(status) or phrase.lower().replace(" ", "_").replace("-", "_")
    try:
        data = json.loads(body)
    except ValueError:
        text = plain or body.decode("utf-8", "replace").strip()[:1000]
        return error_body(status, kind, text or phrase)
    try:
        if isinstance(data, dict) and isinstance(data.get("error"), str) and "kind" in data and "status" in data:
            return body
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):  # ClientError from an API
            inner = json.loads(data[0]["error"])
            return error_body(status, inner["kind"], inner["message"])
        if isinstance(data, dict) and isinstance(data.get("detail"), list):  # pydantic validation
            problems = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in data["detail"]
            )
            return error_body(status, "invalid_request", problems or str(data.get("error")))
        if isinstance(data, dict) and isinstance(data.get("error"), str):  # BentoML's own, e.g. task errors
            return error_body(status, kind, data["error"])
    except (ValueError, KeyError, TypeError):
        pass
    return error_body(status, kind, body.decode("utf-8", "replace")[:1000])


def normalise_errors(send: Send, scope: Scope | None = None) -> Send:
    """Rewrite every error response (status >= 400) into the ``{"error", "kind", "status"}`` object."""
    state: dict[str, Any] = {"start": None, "chunks": []}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            state["start"] = message
            return
        if state["start"] is None or message["type"] != "http.response.body":
            await send(message)
            return
        state["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start = state["start"]
        plain = _router_message(start["status"], scope, start.get("headers", []))
        body = _error_object(start["status"], b"".join(state["chunks"]), plain)
        drop = (b"content-length", b"content-type")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped
