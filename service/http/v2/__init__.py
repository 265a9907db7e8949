"""The Open Inference Protocol (KServe V2), REST and gRPC: a codec, free of BentoML and Starlette.

How the application uses it (one request)::

    facts = ModelFacts.from_manifest(served.manifest, versions=loaded, max_images=..., batch_size=...)
    request = rest.parse_request(body, headers.get(rest.HEADER_LENGTH), facts)   # or grpc_codec.parse_request
    # request.images (encoded files -> image_to_tensor each) or request.pixels (N, C, H, W float32)
    outputs = build_outputs(request, facts, probabilities, logits if request.wants_logits else None)
    answer = rest.encode_response(request, outputs)                                # or grpc_codec.encode_response

Every client mistake is a :class:`V2Error` (status + message; REST body ``{"error": message}``).
Modules: ``facts`` (what a model offers; metadata, config, server metadata), ``request`` (validation),
``tensors`` (wire formats), ``outputs`` (probabilities, logits, classification), ``rest``,
``grpc_codec``, ``schemas`` (pydantic, for the OpenAPI document), ``proto`` (generated stubs).
Those import nothing of BentoML or Starlette. The application side, wired in ``service.http.edge``
and ``service.http.routes``: ``serving`` (what both transports share with /classify: models,
admission, decoding, the batching queue), ``route`` (the REST routes, one ASGI app in the route
table), ``grpc_server`` (``grpc.aio`` in each worker), ``openapi`` (the V2 routes in ``/docs.json``).
"""

from service.http.v2.errors import (
    V2Error,
    image_error,
    parse_version,
    unknown_model,
    unknown_version,
)
from service.http.v2.facts import (
    EXTENSIONS,
    IMAGE,
    LOGITS,
    PIXELS,
    PLATFORM,
    PROBABILITIES,
    ModelFacts,
    TensorSpec,
    model_config,
    model_metadata,
    server_metadata,
)
from service.http.v2.outputs import OutputTensor, build_outputs, classification_strings
from service.http.v2.request import InferRequest, OutputRequest, RawInput, RawOutput, build_request

__all__ = [
    "EXTENSIONS", "IMAGE", "LOGITS", "PIXELS", "PLATFORM", "PROBABILITIES", "InferRequest", "ModelFacts",
    "OutputRequest", "OutputTensor", "RawInput", "RawOutput", "TensorSpec", "V2Error", "build_outputs",
    "build_request", "classification_strings", "image_error", "model_config", "model_metadata",
    "parse_version", "server_metadata", "unknown_model", "unknown_version",
]
