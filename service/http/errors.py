"""The one error tree of the HTTP edge, and the one place errors are rendered and counted.

Everything the service refuses is a :class:`ServiceError`: status, kind, message and headers as plain
data, raised wherever the mistake is found (body limits, admission, routes, the Open Inference
Protocol). Raising counts nothing and sends nothing; :class:`ErrorResponses`, the outermost
middleware, renders it and counts it in ``imgclf_errors_total{kind}``, once. The shapes:

- the service's object ``{"error": message, "kind": kind, "status": status}`` for every route,
- ``{"error": message}`` for :class:`~service.http.v2.errors.V2Error` (what Triton's clients read),
- gRPC status codes derived from the same status (``service.http.v2.grpc_codec.status_code``).

Foreign errors are mapped here and nowhere else (:func:`service_error`): an undecodable image
(``ImageInputError``) keeps its status and kind. BentoML's own error answers (validation, task errors,
the router's plain text) are rewritten into the same object on their way out. A ``ServiceError``
raised inside a BentoML API is caught by BentoML, so :func:`record` leaves it where the renderer finds it
(``service.http.bento.bentoml_errors``).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

from service.preprocessing import ImageInputError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

#: ``kind`` of error responses that carry none of their own (BentoML's, the router's).
_KINDS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 408: "timeout", 413: "request_too_large", 415: "unsupported_media_type",
          422: "invalid_request", 429: "too_many_requests", 500: "internal_error", 503: "unavailable",
          504: "timeout"}
CLOSE: Headers = ((b"connection", b"close"),)
V2_PREFIX = "/v2"


class ServiceError(Exception):
    """A request the service refuses, and why: rendered by :class:`ErrorResponses`, never by the raiser."""

    counted: ClassVar[bool] = True  # in imgclf_errors_total

    def __init__(self, status: int, kind: str, message: str, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, tuple(headers)

    def body(self) -> bytes:
        return error_body(self.status, self.kind, self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.kind!r}, {self.message!r})"


class Overloaded(ServiceError):
    """503: this worker is too busy now; ``Retry-After`` says when to try again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, "overloaded", message, [(b"retry-after", str(retry_after).encode())])
        self.retry_after = retry_after


class ClientGone(ServiceError):
    """The client hung up mid-body. Nobody reads the answer, but BentoML's TimeoutMiddleware waits for a
    first send (without one a vanished upload held its request for the whole traffic timeout). Not
    counted: the client made no mistake we could tell it about."""

    counted = False

    def __init__(self, received: int) -> None:
        super().__init__(400, "client_disconnected",
                         f"the client closed the connection after {received} bytes of the body", CLOSE)


def error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": message, "kind": kind, "status": status}).encode()


def service_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError an exception stands for (None: a bug, answered 500 by BentoML and logged)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ImageInputError):
        return ServiceError(exc.status_code, exc.kind, str(exc))
    return None


# ServiceErrors raised inside BentoML APIs while one request is handled (set per request by ErrorResponses).
_recorded: contextvars.ContextVar[list[ServiceError] | None] = contextvars.ContextVar("imgclf_errors", default=None)


def record(error: ServiceError) -> None:
    """Leave ``error`` for the renderer: BentoML answers exceptions from its APIs in its own shape."""
    recorded = _recorded.get()
    if recorded is not None:
        recorded.append(error)


async def send_response(send: Send, status: int, body: bytes, headers: Headers = (),
                        content_type: bytes = b"application/json", head: bool = False) -> None:
    """One complete ASGI response (``head``: the headers of a GET without its body)."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": b"" if head else body})


class ErrorResponses:
    """ASGI middleware, outermost: renders and counts every ServiceError, and gives every other error
    answer (BentoML's, the router's) the service's error object."""

    def __init__(self, app: ASGIApp, count: Callable[[str], None]) -> None:
        self.app = app
        self.count = count  # told the kind of every error answered, for imgclf_errors_total

    def counted(self, error: ServiceError) -> ServiceError:
        if error.counted:
            self.count(error.kind)
        return error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded: list[ServiceError] = []
        _recorded.set(recorded)
        started = False
        path = scope.get("path", "")
        own_shape = path == V2_PREFIX or path.startswith(V2_PREFIX + "/")  # V2 answers {"error"} as Triton does

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, sending if own_shape else _Rewriter(sending, scope, recorded, self.counted))
        except Exception as exc:
            error = service_error(exc)
            if error is None or started:
                raise
            self.counted(error)
            await send_response(send, error.status, error.body(), error.headers, head=scope["method"] == "HEAD")


class _Rewriter:
    """The ``send`` of one request: error answers (status >= 400) that are not the service's own object
    become one; an answer to a ServiceError recorded in a BentoML API is rendered from that error."""

    def __init__(self, send: Send, scope: Scope, recorded: list[ServiceError],
                 counted: Callable[[ServiceError], ServiceError]) -> None:
        self.send, self.scope, self.recorded, self.counted = send, scope, recorded, counted
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start = self.start
        own = next((e for e in self.recorded if e.status == start["status"]), None)
        if own is not None:
            body = self.counted(own).body()
        else:
            plain = _router_message(start["status"], self.scope, start.get("headers", []))
            body = _error_object(start["status"], b"".join(self.chunks), plain)
        drop = (b"content-length", b"content-type")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _kind(status: int) -> str:
    """The ``kind`` of an error answer that brings none (BentoML's, the router's)."""
    return _KINDS.get(status) or _phrase(status).lower().replace(" ", "_").replace("-", "_")


def _router_message(status: int, scope: Scope, headers: list) -> str | None:
    """What to say instead of the router's bare "Not Found" / "Method Not Allowed"."""
    if status not in (404, 405):
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
    kind = _kind(status)
    try:
        data = json.loads(body)
    except ValueError:
        text = plain or body.decode("utf-8", "replace").strip()[:1000]
        return error_body(status, kind, text or _phrase(status))
    if isinstance(data, dict) and isinstance(data.get("error"), str) and "kind" in data and "status" in data:
        return body
    if isinstance(data, dict) and isinstance(data.get("detail"), list):  # pydantic validation
        problems = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                             for d in data["detail"] if isinstance(d, dict))
        return error_body(status, "invalid_request", problems or str(data.get("error")))
    if isinstance(data, dict) and isinstance(data.get("error"), str):  # BentoML's own, e.g. task errors
        return error_body(status, kind, data["error"])
    return error_body(status, kind, body.decode("utf-8", "replace")[:1000])
