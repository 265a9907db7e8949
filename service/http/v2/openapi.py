"""The V2 routes in the service's OpenAPI document (``GET /docs.json``) and in ``/schema.json``.

BentoML builds its document from its own APIs and mounted FastAPI apps only; the V2 routes are plain
ASGI (:mod:`.route`), so a small middleware extends BentoML's answer on its way out: the paths below,
with schemas generated from the pydantic models in :mod:`.schemas` (the ones that validate requests).
The document is built per request from the worker's current catalog: the ``model_name`` and
``model_version`` parameters list what is loaded now, so a client generated from it (and schemathesis)
names real models. ``/schema.json`` (BentoML's own client schema) gets the V2 paths in its ``paths``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.http.errors import ASGIApp, Message, Receive, Scope, Send
from service.http.v2 import schemas
from service.http.v2.rest import HEADER_LENGTH
from service.http.v2.serving import V2Service

TAG = "Open Inference Protocol (V2)"
PREFIX = "V2"  # component names: V2InferenceRequest ... (BentoML's own components keep theirs)
REF = "#/components/schemas/" + PREFIX + "{model}"
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong (tritonclient and KServe's clients read this key)"},
        "kind": {"type": "string", "description": "only on the refusals the service's shared body reader answers "
                                                  "(408 too slow, 413 too large, 503 busy)"},
        "status": {"type": "integer", "description": "as kind"},
    },
}
_MODELS: list[type[BaseModel]] = [
    schemas.InferenceRequest, schemas.InferenceResponse, schemas.ModelMetadataResponse,
    schemas.ServerMetadataResponse, schemas.ServerLiveResponse, schemas.ServerReadyResponse,
    schemas.ModelReadyResponse, schemas.ModelConfigResponse,
]
_STATUS_TEXT = {400: "Bad request (says what was expected)", 404: "No such model or version (lists what is loaded)",
                408: "Upload too slow", 413: "Body or batch too large",
                415: "Unsupported image format or Content-Encoding", 500: "Internal error",
                503: "Overloaded (Retry-After) or not ready", 504: "Not answered in time"}


def _components() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation" if m is schemas.InferenceRequest else "serialization")
                                    for m in _MODELS], ref_template=REF)
    defs = {PREFIX + name: schema for name, schema in top.get("$defs", {}).items()}
    defs[PREFIX + "Error"] = ERROR
    return defs


_COMPONENTS = _components()


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json(_ref("Error"), _STATUS_TEXT[s]) for s in statuses}


def _operation(summary: str, ok: dict[str, Any], statuses: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    return {"tags": [TAG], "summary": summary, "responses": {"200": ok, **_errors(*statuses)}, **extra}


def _infer_operation(params: list[dict[str, Any]], versioned: bool) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary",
              "description": f"the JSON header ({HEADER_LENGTH} bytes long), then each binary input's bytes "
                             "(parameters.binary_data_size); a BYTES element is a little-endian uint32 length "
                             "followed by its bytes"}
    header = {"name": HEADER_LENGTH, "in": "header", "required": False,
              "description": "length of the JSON header when binary tensor data follow it",
              "schema": {"type": "integer", "minimum": 0}}
    ok = {"description": "the outputs (binary ones after the JSON header when asked for)",
          "content": {"application/json": {"schema": _ref("InferenceResponse")},
                      "application/octet-stream": {"schema": binary}}}
    where = "that exact version, if loaded" if versioned else "the production version"
    return _operation(
        f"Infer with {where}: encoded images ('image', BYTES) or preprocessed 'pixels' (FP32)", ok,
        (400, 404, 408, 413, 415, 500, 503, 504), parameters=[*params, header],
        requestBody={"required": True, "content": {"application/json": {"schema": _ref("InferenceRequest")},
                                                   "application/octet-stream": {"schema": binary}}})


def v2_paths(models: list[str], versions: list[str]) -> dict[str, Any]:
    """The OpenAPI path items of the V2 routes, for the models and versions loaded now."""
    model = {"name": "model_name", "in": "path", "required": True, "description": "a served model (GET /models)",
             "schema": {"type": "string", **({"enum": models} if models else {})}}
    version = {"name": "model_version", "in": "path", "required": True, "description": "a loaded version",
               "schema": {"type": "string", **({"enum": versions} if versions else {"pattern": "^[0-9]+$"})}}
    paths: dict[str, Any] = {
        "/v2": {"get": _operation("Server metadata: name, version, extensions",
                                  _json(_ref("ServerMetadataResponse"), "server metadata"), ())},
        "/v2/health/live": {"get": _operation("Server live", _json(_ref("ServerLiveResponse"), "live"), ())},
        "/v2/health/ready": {"get": _operation("Server ready (every version this worker should serve is loaded)",
                                               _json(_ref("ServerReadyResponse"), "ready"), (503,))},
    }
    for base, params, versioned in (("/v2/models/{model_name}", [model], False),
                                    ("/v2/models/{model_name}/versions/{model_version}", [model, version], True)):
        paths[base] = {"get": _operation("Model metadata: platform, inputs, outputs, labels, preprocessing",
                                         _json(_ref("ModelMetadataResponse"), "model metadata"), (404,),
                                         parameters=params)}
        paths[base + "/ready"] = {"get": _operation("Model ready", _json(_ref("ModelReadyResponse"), "ready"),
                                                    (404,), parameters=params)}
        paths[base + "/config"] = {"get": _operation("Triton-style model configuration (perf_analyzer reads it)",
                                                     _json(_ref("ModelConfigResponse"), "model config"), (404,),
                                                     parameters=params)}
        paths[base + "/infer"] = {"post": _infer_operation(params, versioned)}
    return paths


def extend_spec(spec: dict[str, Any], models: list[str], versions: list[str]) -> dict[str, Any]:
    """BentoML's document with the V2 paths, components and tag added (its own entries untouched)."""
    spec.setdefault("paths", {}).update(v2_paths(models, versions))
    spec.setdefault("components", {}).setdefault("schemas", {}).update(_COMPONENTS)
    tags = spec.setdefault("tags", [])
    if not any(t.get("name") == TAG for t in tags):
        tags.append({"name": TAG, "description": "KServe V2 / Open Inference Protocol: docs/open-inference.md"})
    return spec


class V2OpenAPI:
    """ASGI middleware: adds the V2 routes to ``GET /docs.json`` and to ``GET /schema.json``'s paths."""

    PATCHED = ("/docs.json", "/schema.json")

    def __init__(self, app: ASGIApp, service: V2Service) -> None:
        self.app = app
        self.service = service

    def _loaded(self) -> tuple[list[str], list[str]]:
        try:
            served = self.service.live.current.models.values()
        except RuntimeError:  # not loaded yet
            return [], []
        return (sorted({m.manifest.name for m in served}),
                sorted({str(m.manifest.version) for m in served}, key=int))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") not in self.PATCHED:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await send_patched(start, b"".join(chunks))

        async def send_patched(first: Message, body: bytes) -> None:
            if first["status"] == 200:
                document = json.loads(body)
                models, versions = self._loaded()
                if scope["path"] == "/docs.json":
                    extend_spec(document, models, versions)
                else:
                    document.setdefault("paths", {}).update({p: {"mounted": False} for p in v2_paths(models, versions)})
                body = json.dumps(document).encode()
            headers = [(k, v) for k, v in first.get("headers", []) if k.lower() != b"content-length"]
            await send({**first, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
