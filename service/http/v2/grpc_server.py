"""V2 over gRPC (``inference.GRPCInferenceService``): a ``grpc.aio`` server inside each worker.

BentoML 1.4's class-based services cannot serve gRPC themselves, so each worker runs this server on
its own event loop, beside uvicorn: the same models, batching queues, admission and hot reload as its
HTTP routes (:class:`~.serving.V2Service`), with no second copy of anything. Every worker binds
``IMGCLF_GRPC_PORT`` with ``SO_REUSEPORT``, so the kernel spreads connections over the workers as it
does for HTTP. Messages up to ``IMGCLF_MAX_REQUEST_BYTES`` are accepted (gRPC's own default is 4 MiB);
``IMGCLF_TIMEOUT_S`` bounds one inference as it does over HTTP; ``IMGCLF_MAX_CONCURRENCY`` bounds the
RPCs in progress, as BentoML's backstop does for HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from service.http.errors import ServiceError
from service.http.v2 import grpc_codec
from service.http.v2.errors import V2Error
from service.http.v2.proto import grpc_predict_v2_pb2 as pb
from service.http.v2.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.http.v2.proto import triton_model_config_pb2 as config_pb
from service.http.v2.serving import V2Service

log = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six KServe RPCs, plus Triton's ModelConfig (registered separately; perf_analyzer needs it)."""

    def __init__(self, service: V2Service, timeout_s: float, on_error: Callable[[str], None] | None = None) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.on_error = on_error  # told the kind of every refusal, for imgclf_errors_total

    async def _abort(self, context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        """gRPC's rendering of the error tree: the status mapped, headers as trailing metadata, counted."""
        if self.on_error is not None and error.counted:
            self.on_error(error.kind)
        if error.headers:
            context.set_trailing_metadata(tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in error.headers))
        await context.abort(grpc_codec.status_code(error), error.message)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.not_ready() is None)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """``ready: false`` for a model or version not loaded here (tritonclient reads just the flag)."""
        return pb.ModelReadyResponse(ready=self.service.is_ready(request.name, request.version or None))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return grpc_codec.server_metadata_response()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            return grpc_codec.model_metadata(self.service.model_facts(request.name, request.version or None))
        except ServiceError as exc:
            await self._abort(context, exc)
            raise  # not reached: abort raises

    async def ModelConfig(self, request: config_pb.ModelConfigRequest, context: Any) -> config_pb.ModelConfigResponse:
        try:
            return grpc_codec.model_config_response(self.service.model_facts(request.name, request.version or None))
        except ServiceError as exc:
            await self._abort(context, exc)
            raise

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        service = self.service
        try:
            with service.admitted():
                catalog = service.live.current  # once per request: a reload swaps it whole
                name, version = grpc_codec.requested_model(request)
                served = service.pick(catalog, name, version)
                with served.lease():  # no await between the pick and the lease
                    facts = service.facts(catalog, served)
                    parsed = grpc_codec.parse_request(request, facts)
                    async with asyncio.timeout(self.timeout_s):
                        answer = await service.infer_answer(served, parsed, facts)
                    return grpc_codec.encode_response(parsed, answer.outputs, answer.parameters)
        except ServiceError as exc:
            await self._abort(context, exc)
            raise
        except TimeoutError:
            await self._abort(context, V2Error(504, f"not answered within {self.timeout_s:g} s", kind="timeout"))
            raise


class GrpcFront:
    """Starts and stops one worker's gRPC server (``Classifier``'s startup and shutdown hooks)."""

    def __init__(self, service: V2Service, host: str, port: int | None, max_message_bytes: int,
                 max_concurrent_rpcs: int, timeout_s: float, on_error: Callable[[str], None] | None = None) -> None:
        self.service = service
        self.on_error = on_error
        self.address = None if port is None else f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.timeout_s = timeout_s
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Listen on the configured address (nothing when no port is set); a port in use is an error."""
        if self.address is None or self.server is not None:
            return
        options = [("grpc.so_reuseport", 1),
                   ("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes)]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        servicer = InferenceServicer(self.service, self.timeout_s, self.on_error)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((grpc_codec.model_config_handler(servicer.ModelConfig),))
        server.add_insecure_port(self.address)  # raises RuntimeError when it cannot bind
        await server.start()
        self.server = server
        log.info("V2 gRPC (inference.GRPCInferenceService) listening on %s", self.address)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Finish the RPCs in progress (up to ``grace_s``), then close."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
