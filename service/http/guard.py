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

from service.http.body import BodyReader, UploadPace
from service.http.classify import FORM, ParsedForm
from service.http.errors import ASGIApp, Message, Receive, Scope, Send, normalise_errors, refuse
from service.preprocessing import ImageInputError

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
    # The text fields -> None or (status, kind, message) to refuse them now: for routes that queue a job,
    # whose own checks would otherwise only fail the job later, after a 200.
    check_fields: Callable[[dict[str, str]], tuple | None] | None = None  # (status, kind, message[, headers])
    in_memory: bool = True  # keep uploads in memory for the routes behind (archives spool to disk instead)


class RequestGuard:
    def __init__(
        self, app: ASGIApp, routes: dict[str, UploadRoute], on_error: Callable[[str], None] | None = None,
        bodies: BodyReader | None = None,
    ) -> None:
        self.app = app
        self.routes = routes
        self.on_error = on_error  # told the kind of every refusal, for metrics
        self.bodies = bodies or BodyReader(UploadPace(), 128, on_error)  # share one per worker: its cap is global

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.routes.get(scope.get("path", ""))
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, normalise_errors(send, scope))
            return
        body = await self.bodies.read(scope, receive, send, route.max_body)
        if body is None:
            return
        problem, parsed, rebuilt = await self._check_form(scope, body, route)
        if problem is not None:
            await refuse(send, self.on_error, *problem)
            return
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

        await self.app(scope, replay, normalise_errors(send, scope))

    async def _check_form(
        self, scope: Scope, body: bytes, route: UploadRoute
    ) -> tuple[tuple | None, ParsedForm | None, tuple[bytes, bytes] | None]:
        """(problem, parsed, rebuilt): problem is (status, kind, message[, headers]) when the body is refused;
        parsed is the form with the uploads' bytes in memory; rebuilt is (body, content type) when the body
        must be re-encoded for BentoML (unsafe file names), else None."""
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        expected = f"send multipart/form-data with the image file in the field {route.file_field!r}"
        if not content_type.lower().startswith("multipart/form-data"):
            return (400, "invalid_request", f"{expected} (got content type {content_type or 'none'!r})"), None, None

        async def once() -> AsyncIterator[bytes]:
            yield body

        parser = MultiPartParser(Headers(scope=scope), once(), max_files=route.max_files + 1,
                                 max_fields=len(route.other_fields) + 8)
        if route.in_memory:
            parser.spool_max_size = route.max_body  # uploads stay in memory: the body is already, within its limit
        try:
            form = await parser.parse()
        except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
            return (400, "invalid_request", f"malformed multipart body: {exc}"), None, None
        try:
            problem = _check_fields(form, route, expected)
            if problem is not None:
                return problem, None, None
            values = form.getlist(route.file_field)
            if route.check is not None:
                for upload in values:
                    try:
                        await asyncio.to_thread(route.check, upload.file)
                    except ImageInputError as exc:
                        return (exc.status_code, exc.kind, str(exc)), None, None
            texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            if route.check_fields is not None:  # last: it may take a job slot
                problem = route.check_fields(texts)
                if problem is not None:
                    return problem, None, None
            parsed = ParsedForm(texts, [_contents(upload) for upload in values]) if route.in_memory else None
            if any(isinstance(v, UploadFile) and not _filename_is_safe(v.filename) for _, v in form.multi_items()):
                return None, parsed, await asyncio.to_thread(_reencode, form)
            return None, parsed, None
        finally:
            await form.close()


def _check_fields(form: FormData, route: UploadRoute, expected: str) -> tuple[int, str, str] | None:
    unknown = sorted(set(form.keys()) - route.other_fields - {route.file_field})
    if unknown:
        allowed = sorted({route.file_field, *route.other_fields})
        return 400, "invalid_request", f"unknown form field(s) {unknown}; allowed: {allowed}"
    repeated = sorted(k for k in route.other_fields if len(form.getlist(k)) > 1)
    if repeated:
        return 400, "invalid_request", f"field(s) {repeated} given more than once; send each once"
    values = form.getlist(route.file_field)
    if not values:
        return 400, "invalid_request", f"missing file field {route.file_field!r}; {expected}"
    if any(not isinstance(v, UploadFile) for v in values):
        return 400, "invalid_request", f"{route.file_field!r} must be a file upload; URLs and text are not fetched"
    if len(values) > route.max_files:
        return 400, "too_many_images", f"at most {route.max_files} images per request, got {len(values)}"
    return None


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


