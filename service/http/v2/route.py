"""The V2 REST routes (Open Inference Protocol over HTTP): one ASGI app for every path under ``/v2``.

V2 puts the model and version in the path (``/v2/models/{m}/versions/{v}/infer``) and a model name may
hold an encoded ``/``, so :func:`match` reads the still-encoded path itself; the route table
(``service.http.routes``) sends it ``/v2`` and everything under it. Its refusals are
:class:`~service.http.v2.errors.V2Error`, rendered as V2's ``{"error"}`` by the one error renderer. It
reads bodies through the worker's one :class:`~service.http.body.BodyReader`, so the cap on bodies in
progress, the size limit (``IMGCLF_MAX_REQUEST_BYTES``) and the slow-upload defences are shared with
/classify. Admission, the batching queue and hot reload: :mod:`.serving`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote

from service.http.admin import AdminToken
from service.http.body import BodyReader
from service.http.errors import Receive, Scope, Send, ServiceError, send_response
from service.http.v2 import rest
from service.http.v2.encoding import content_encoding, inflate
from service.http.v2.errors import V2Error
from service.http.v2.facts import ModelFacts, model_config, model_metadata, server_metadata
from service.http.v2.repository import load, repository_index, unload
from service.http.v2.request import InferRequest
from service.http.v2.serving import V2Service

log = logging.getLogger(__name__)

_MODEL = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                    r"(?:/(?P<action>ready|config|infer|stats))?/?")
# /v2/models/stats is every model's statistics, as in Triton (a model called "stats" keeps its other routes).
_SERVER = {"/v2": "server", "/v2/health/live": "live", "/v2/health/ready": "ready", "/v2/models/stats": "stats",
           "/v2/repository/index": "repository_index"}
_REPOSITORY = re.compile(r"/v2/repository/models/(?P<model>[^/]+)/(?P<action>load|unload)/?")
POSTED = frozenset({"infer", "repository_index", "load", "unload"})
PARSE_OFF_LOOP_BYTES = 256 * 1024  # bigger bodies are parsed in a thread (base64 JSON of many photos)


@dataclass(frozen=True)
class Route:
    action: str  # server | live | ready | model | model_ready | config | infer | stats (model "": all)
    # | repository_index | load | unload
    model: str = ""
    version: str | None = None

    @property
    def method(self) -> str:
        return "POST" if self.action in POSTED else "GET"


def match(raw_path: str) -> Route | None:
    """The V2 route of a still percent-encoded path (an encoded ``/`` stays inside its segment)."""
    path = raw_path.rstrip("/") or "/"
    if path in _SERVER:
        return Route(_SERVER[path])
    repository = _REPOSITORY.fullmatch(path)
    if repository is not None:
        return Route(repository["action"], unquote(repository["model"]))
    m = _MODEL.fullmatch(path)
    if m is None:
        return None
    action = {None: "model", "ready": "model_ready"}.get(m["action"], m["action"])
    version = m["version"]
    return Route(action, unquote(m["model"]), None if version is None else unquote(version))


class V2App:
    """Every ``/v2`` path: health, metadata, config, statistics, inference and the model repository."""

    def __init__(self, service: V2Service, bodies: BodyReader, max_body: int, admin: AdminToken | None = None) -> None:
        self.service = service
        self.bodies = bodies
        self.max_body = max_body
        self.admin = admin or AdminToken(None)  # load and unload: behind IMGCLF_ADMIN_TOKEN, as /admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        route = match(raw.decode("latin-1").partition("?")[0] if raw else scope["path"])
        method = scope["method"]
        if route is None:
            raise V2Error(404, f"no V2 endpoint {method} {scope['path'][:200]}; the API is described at /docs.json",
                          kind="not_found")
        if method != route.method and not (method == "HEAD" and route.method == "GET"):
            raise V2Error(405, f"method not allowed: {method} {scope['path'][:200]}; use {route.method}",
                          kind="method_not_allowed", headers=[(b"allow", route.method.encode())])
        if route.action == "infer":
            answer = await self._infer(scope, receive, route)
        elif route.action in POSTED:
            answer = await self._repository(scope, receive, route)
        elif route.action == "stats":  # reads every worker's Prometheus files: off the event loop
            document = await asyncio.to_thread(self.service.statistics, route.model, route.version)
            answer = rest.json_response(document)
        else:
            answer = self._document(route)
        await _send(send, answer, method)

    def _document(self, route: Route) -> rest.RestResponse:
        """Health, server and model metadata, model config: answered from the current catalog."""
        if route.action == "live":
            return rest.json_response({"live": True})
        if route.action == "ready":
            problem = self.service.not_ready()
            if problem is not None:
                return rest.json_response({"error": problem}, 503)
            return rest.json_response({"ready": True})
        if route.action == "server":
            return rest.json_response(server_metadata())
        facts = self.service.model_facts(route.model, route.version)
        if route.action == "model_ready":
            return rest.json_response({"name": facts.model, "ready": True})
        if route.action == "config":
            return rest.json_response(model_config(facts))
        return rest.json_response(model_metadata(facts))

    async def _infer(self, scope: Scope, receive: Receive, route: Route) -> rest.RestResponse:
        headers = dict(scope.get("headers") or [])
        encoding = content_encoding(headers.get(b"content-encoding"))
        if isinstance(encoding, V2Error):
            raise encoding
        self.service.check_admission()  # an overloaded worker refuses before reading the body, as for /classify
        body = await self.bodies.read(scope, receive, self.max_body)  # its refusals: the service's error object
        length = headers.get(rest.HEADER_LENGTH.lower().encode())
        try:
            return await self._answer(body, encoding, None if length is None else length.decode("latin-1"), route)
        except ServiceError as exc:
            raise V2Error.of(exc) from None
        except Exception as exc:  # a bug or a model failure: logged, and still a V2 answer
            log.exception("V2 inference failed")
            raise V2Error(500, "internal error while scoring; see the server log", kind="internal_error") from exc

    async def _repository(self, scope: Scope, receive: Receive, route: Route) -> rest.RestResponse:
        """The model repository extension (:mod:`.repository`); load and unload check the admin token first."""
        if route.action != "repository_index":
            try:
                self.admin.check(scope)
            except ServiceError as exc:
                raise V2Error.of(exc) from None
        body = await self.bodies.read(scope, receive, self.max_body)
        try:
            document = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise V2Error(400, f"the body must be a JSON object: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("parameters", {}), dict):
            raise V2Error(400, "the body must be a JSON object, its 'parameters' an object too")
        live = self.service.live
        repo = live.current.repo or self.service.settings.repository()
        if route.action == "repository_index":
            index = await asyncio.to_thread(repository_index, live.current, repo, document.get("ready") is True)
            return rest.json_response(index)
        if route.action == "unload":
            unload(route.model)
        await load(live, repo, route.model, document.get("parameters", {}))
        return rest.json_response({})

    async def _answer(self, body: bytes, encoding: str, header_length: str | None,
                      route: Route) -> rest.RestResponse:
        with self.service.inference(route.model, route.version) as call:  # admitted, picked, leased, counted
            if len(body) > PARSE_OFF_LOOP_BYTES or encoding != "identity":
                request = await asyncio.to_thread(self._parse, body, encoding, header_length, call.facts)
            else:
                request = self._parse(body, encoding, header_length, call.facts)
            answer = await call.answer(request)
            return rest.encode_response(request, answer.outputs, answer.parameters)

    def _parse(self, body: bytes, encoding: str, header_length: str | None, facts: ModelFacts) -> InferRequest:
        """Inflate (within the request-size limit), then parse: both are CPU work, off the loop when large."""
        return rest.parse_request(inflate(body, encoding, self.max_body), header_length, facts)


async def _send(send: Send, answer: rest.RestResponse, method: str) -> None:
    headers = {k.lower(): v for k, v in answer.headers.items()}
    content_type = headers.pop("content-type", rest.JSON_TYPE)
    await send_response(send, answer.status, answer.body, [(k.encode("latin-1"), v.encode("latin-1"))
                                                           for k, v in headers.items()],
                        content_type.encode("latin-1"), head=method == "HEAD")
