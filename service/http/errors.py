"""Every error the HTTP side answers, in one shape: ``{"error": message, "kind": kind, "status": status}``.

- :class:`ClientError` is what endpoints raise for a client's mistake; it carries status, kind and
  message as data. BentoML renders exceptions its own way, so :func:`normalise_errors` (the send
  wrapper the request guard puts around every request) answers from the recorded error instead.
- :func:`refuse` answers from middleware before BentoML sees a request.
- BentoML's own errors (validation, tasks, the router's plain text) are rewritten into the same object.
- :func:`select_model` is the one mapping of a request's ``model`` and ``top_k`` to a 4xx.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from bentoml.exceptions import BentoMLException

from service.http import metrics

if TYPE_CHECKING:
    from service.http.catalog import Catalog
    from service.http.served import ServedModel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: ``kind`` of error responses that carry none of their own (BentoML's, the router's).
_KINDS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 408: "timeout", 413: "request_too_large", 415: "unsupported_media_type",
          422: "invalid_request", 429: "too_many_requests", 500: "internal_error", 503: "unavailable",
          504: "timeout"}



class ClientError(BentoMLException):
    """A 4xx whose body says what was wrong; counted in ``imgclf_errors_total`` by kind."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.error_code = HTTPStatus(status)
        self.status, self.kind, self.message = status, kind, message
        metrics.count_error(kind)
        raised = _raised.get()
        if raised is not None:  # inside a request: normalise_errors answers from this, not BentoML's text
            raised.append(self)


# The ClientErrors raised while one request is handled (set by normalise_errors; endpoints run in its context).
_raised: contextvars.ContextVar[list[ClientError] | None] = contextvars.ContextVar("imgclf_raised", default=None)


def select_model(catalog: Catalog, model: str | None, top_k: int | None = None) -> ServedModel:
    """The model a request names (None: the default), with ``top_k`` checked against its labels.

    Raises ClientError: 404 unknown_model, 400 invalid_model, 400 invalid_top_k.
    """
    from service.http.catalog import (
        UnknownModelError,  # the catalog imports nothing HTTP; no cycle either way
    )

    try:
        served = catalog.get(model)
    except UnknownModelError as exc:
        raise ClientError(404, "unknown_model", str(exc)) from exc
    except ValueError as exc:
        raise ClientError(400, "invalid_model", str(exc)) from exc
    labels = len(served.manifest.labels)
    if top_k is not None and not 1 <= top_k <= labels:
        raise ClientError(400, "invalid_top_k", f"top_k must be between 1 and {labels}, got {top_k}")
    return served


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
    """Rewrite every error response (status >= 400) into the ``{"error", "kind", "status"}`` object.

    Call it in the request's context before handing the request on: a :class:`ClientError` raised
    while the request is handled is answered from its own fields.
    """
    state: dict[str, Any] = {"start": None, "chunks": []}
    raised: list[ClientError] = []
    _raised.set(raised)

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
        own = next((e for e in raised if e.status == start["status"]), None)
        if own is not None:
            body = error_body(own.status, own.kind, own.message)
        else:
            plain = _router_message(start["status"], scope, start.get("headers", []))
            body = _error_object(start["status"], b"".join(state["chunks"]), plain)
        drop = (b"content-length", b"content-type")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped
