"""V2 over gRPC: ``inference.GRPCInferenceService`` messages to and from the same internal request.

A ``ModelInferRequest`` becomes the :class:`~service.http.v2.request.InferRequest` that REST builds
(same checks, same messages); the outputs go back in ``raw_output_contents`` (the layout of the binary
tensor extension), which is what tritonclient.grpc reads first. Errors map to gRPC status codes; the
message is the one REST puts in ``{"error"}``.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from service.http.errors import ServiceError
from service.http.v2.errors import invalid
from service.http.v2.facts import PLATFORM, ModelFacts, model_config, server_metadata
from service.http.v2.outputs import OutputTensor
from service.http.v2.proto import grpc_predict_v2_pb2 as pb
from service.http.v2.proto import triton_extensions_pb2 as ext_pb
from service.http.v2.proto import triton_model_config_pb2 as config_pb
from service.http.v2.request import InferRequest, RawInput, RawOutput, build_request
from service.http.v2.tensors import fp32_to_bytes, serialize_bytes

SERVICE = "inference.GRPCInferenceService"

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status for an HTTP-style one (``context.abort(status_code(e), e.message)``)."""
    if error.status in _STATUS:
        return _STATUS[error.status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= error.status < 500 else grpc.StatusCode.INTERNAL


def parameters(entries: Any) -> dict[str, Any]:
    """``map<string, InferParameter>`` as plain Python values (bool, int or str)."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def requested_model(message: pb.ModelInferRequest) -> tuple[str, str | None]:
    """The model name and version string a request names (empty version: the production one)."""
    return message.model_name, message.model_version or None


def _contents(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any] | None:
    contents = tensor.contents
    if tensor.datatype == "BYTES" and len(contents.bytes_contents):
        return list(contents.bytes_contents)
    if tensor.datatype == "FP32" and len(contents.fp32_contents):
        return list(contents.fp32_contents)
    return None


def parse_request(message: pb.ModelInferRequest, facts: ModelFacts, *, max_images: int | None = None) -> InferRequest:
    """``ModelInfer``'s request, validated against what the model offers."""
    raw_contents = message.raw_input_contents
    if raw_contents and len(raw_contents) != len(message.inputs):
        raise invalid(f"raw_input_contents has {len(raw_contents)} entries for {len(message.inputs)} inputs; "
                      "when used it holds one entry per input")
    inputs = []
    for index, tensor in enumerate(message.inputs):
        typed = _contents(tensor)
        if raw_contents and typed is not None:
            raise invalid(f"input {tensor.name!r} has both contents and raw_input_contents; send one")
        inputs.append(RawInput(
            tensor.name, tensor.datatype, tuple(tensor.shape), parameters(tensor.parameters),
            raw=raw_contents[index] if raw_contents else None, data=typed, from_grpc=True,
        ))
    outputs = [RawOutput(o.name, parameters(o.parameters)) for o in message.outputs] or None
    return build_request(inputs, outputs, parameters(message.parameters), facts,
                         request_id=message.id or None, max_images=max_images)


def encode_response(request: InferRequest, outputs: list[OutputTensor],
                    parameters: dict[str, Any] | None = None) -> pb.ModelInferResponse:
    """The answer, every output in ``raw_output_contents`` (gRPC has no JSON/binary choice). The proto's
    parameters hold bool, int64 or string: a float (the threshold) travels as its shortest repr."""
    response = pb.ModelInferResponse(model_name=request.model, model_version=str(request.version),
                                     id=request.id or "")
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        elif isinstance(value, int):
            response.parameters[key].int64_param = value
        else:
            response.parameters[key].string_param = repr(value) if isinstance(value, float) else str(value)
    for tensor in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        blob = serialize_bytes(tensor.values) if tensor.datatype == "BYTES" else fp32_to_bytes(tensor.values)
        response.raw_output_contents.append(blob)
    return response


def model_metadata(facts: ModelFacts) -> pb.ModelMetadataResponse:
    """``ModelMetadata`` (the gRPC message has no ``parameters``; REST's metadata has them)."""
    meta = pb.ModelMetadataResponse(name=facts.model, versions=[str(v) for v in facts.versions],
                                    platform=PLATFORM)
    for spec in facts.inputs():
        meta.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    for spec in facts.outputs():
        meta.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    return meta


def model_config_response(facts: ModelFacts) -> config_pb.ModelConfigResponse:
    """Triton's ``ModelConfig`` for perf_analyzer: the same document as REST's ``/config``."""
    return config_pb.ModelConfigResponse(config=json_format.ParseDict(model_config(facts), config_pb.ModelConfig()))


def server_metadata_response() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(**server_metadata())


def model_config_handler(behaviour: Any) -> grpc.GenericRpcHandler:
    """The extra ``/inference.GRPCInferenceService/ModelConfig`` method (KServe's proto has none).

    ``behaviour(request: ModelConfigRequest, context) -> ModelConfigResponse`` (may be async under
    ``grpc.aio``); register with ``server.add_generic_rpc_handlers((model_config_handler(fn),))``.
    """
    handler = grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=config_pb.ModelConfigRequest.FromString,
        response_serializer=config_pb.ModelConfigResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelConfig": handler})


def statistics_response(document: dict[str, Any]) -> ext_pb.ModelStatisticsResponse:
    """Triton's ``ModelStatistics``: the REST ``/stats`` document, field for field."""
    return json_format.ParseDict(document, ext_pb.ModelStatisticsResponse())


def stream_error(request: pb.ModelInferRequest, error: ServiceError) -> ext_pb.ModelStreamInferResponse:
    """One failed request on a ``ModelStreamInfer`` stream, as Triton sends it: the message REST would put
    in ``{"error"}``, the response empty but for the request's ``id``; the stream goes on."""
    return ext_pb.ModelStreamInferResponse(error_message=error.message,
                                           infer_response=pb.ModelInferResponse(id=request.id))


def triton_extension_handler(statistics: Any, stream_infer: Any) -> grpc.GenericRpcHandler:
    """Triton's ``/inference.GRPCInferenceService/ModelStatistics`` (unary) and ``ModelStreamInfer``
    (bidirectional streaming), which KServe's proto lacks; registered as :func:`model_config_handler` is.

    ``statistics(request: ModelStatisticsRequest, context) -> ModelStatisticsResponse``;
    ``stream_infer(requests: AsyncIterator[ModelInferRequest], context) -> AsyncIterator[ModelStreamInferResponse]``.
    """
    return grpc.method_handlers_generic_handler(SERVICE, {
        "ModelStatistics": grpc.unary_unary_rpc_method_handler(
            statistics, request_deserializer=ext_pb.ModelStatisticsRequest.FromString,
            response_serializer=ext_pb.ModelStatisticsResponse.SerializeToString),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=ext_pb.ModelStreamInferResponse.SerializeToString),
    })
