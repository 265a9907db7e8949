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
- The form is parsed here once, uploads kept in memory (``scope[FORM]``), so
  the route handlers behind answer from it (``service.http.classify``).

Which routes are guarded, and with what limits, is the route table's
``upload`` column (``service.http.routes``). Refusals are raised as
:class:`~service.http.errors.ServiceError` and rendered in one place.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartParser

from service.http.body import BodyReader
from service.http.classify import FORM, ParsedForm
from service.http.errors import ASGIApp, Message, Receive, Scope, Send, ServiceError

log = logging.getLogger(__name__)

#: Longest upload file name passed on to BentoML, in UTF-8 bytes. BentoML makes
#: ``tmpXXXXXXXX<name>`` in a temporary folder; file systems allow 255 bytes.
MAX_FILENAME_BYTES = 128
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")


@dataclass(frozen=True)
class UploadRoute:
    file_field: str
    max_body: int
    max_files: int
    other_fields: frozenset[str] = frozenset({"top_k", "model"})
    check: Callable[[IO[bytes]], None] | None = None  # raises ImageInputError to refuse an upload's content
    # The text fields, checked now (raises ServiceError): for routes that queue a job, whose own checks
    # would otherwise only fail the job later, after a 200.
    check_fields: Callable[[dict[str, str]], None] | None = None
    in_memory: bool = True  # keep uploads in memory for the routes behind (archives spool to disk instead)


class RequestGuard:
    """ASGI middleware: reads, checks and parses the body of a POST to an upload route, once."""

    def __init__(self, app: ASGIApp, routes: dict[str, UploadRoute], bodies: BodyReader) -> None:
        self.app = app
        self.routes = routes
        self.bodies = bodies  # the worker's one reader: its cap on bodies in progress is global

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await self.bodies.read(scope, receive, route.max_body)
        parsed, rebuilt = await self._check_form(scope, body, route)
        if parsed is not None:
            scope = {**scope, FORM: parsed}  # read and parsed once: routes behind answer from this
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

        await self.app(scope, replay, send)

    async def _check_form(
        self, scope: Scope, body: bytes, route: UploadRoute
    ) -> tuple[ParsedForm | None, tuple[bytes, bytes] | None]:
        """(parsed, rebuilt), or ServiceError 400 for a body that is refused. ``parsed`` is the form with the
        uploads' bytes in memory; ``rebuilt`` is (body, content type) when the body must be re-encoded for
        BentoML (unsafe file names), else None."""
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        expected = f"send multipart/form-data with the image file in the field {route.file_field!r}"
        if not content_type.lower().startswith("multipart/form-data"):
            raise ServiceError(400, "invalid_request", f"{expected} (got content type {content_type or 'none'!r})")

        async def once() -> AsyncIterator[bytes]:
            yield body

        parser = MultiPartParser(Headers(scope=scope), once(), max_files=route.max_files + 1,
                                 max_fields=len(route.other_fields) + 8)
        if route.in_memory:
            parser.spool_max_size = route.max_body  # uploads stay in memory: the body is already, within its limit
        try:
            form = await parser.parse()
        except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
            raise ServiceError(400, "invalid_request", f"malformed multipart body: {exc}") from None
        try:
            _check_fields(form, route, expected)
            values = form.getlist(route.file_field)
            if route.check is not None:
                for upload in values:
                    await asyncio.to_thread(route.check, upload.file)  # ImageInputError: rendered as its 4xx
            texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            if route.check_fields is not None:  # last: it may take a job slot
                route.check_fields(texts)
            parsed = ParsedForm(texts, [_contents(upload) for upload in values]) if route.in_memory else None
            if any(isinstance(v, UploadFile) and not _filename_is_safe(v.filename) for _, v in form.multi_items()):
                return parsed, await asyncio.to_thread(_reencode, form)
            return parsed, None
        finally:
            await form.close()


def _check_fields(form: FormData, route: UploadRoute, expected: str) -> None:
    """ServiceError 400 for unknown or repeated fields, a missing upload, text in its place, too many files."""
    unknown = sorted(set(form.keys()) - route.other_fields - {route.file_field})
    if unknown:
        allowed = sorted({route.file_field, *route.other_fields})
        raise ServiceError(400, "invalid_request", f"unknown form field(s) {unknown}; allowed: {allowed}")
    repeated = sorted(k for k in route.other_fields if len(form.getlist(k)) > 1)
    if repeated:
        raise ServiceError(400, "invalid_request", f"field(s) {repeated} given more than once; send each once")
    values = form.getlist(route.file_field)
    if not values:
        raise ServiceError(400, "invalid_request", f"missing file field {route.file_field!r}; {expected}")
    if any(not isinstance(v, UploadFile) for v in values):
        raise ServiceError(400, "invalid_request",
                           f"{route.file_field!r} must be a file upload; URLs and text are not fetched")
    if len(values) > route.max_files:
        raise ServiceError(400, "too_many_images", f"at most {route.max_files} images per request, got {len(values)}")


def _contents(upload: UploadFile) -> bytes:
    upload.file.seek(0)
    return upload.file.read()


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


