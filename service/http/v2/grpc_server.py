"""V2 over gRPC (``inference.GRPCInferenceService``): a ``grpc.aio`` server inside each worker.

BentoML 1.4's class-based services cannot serve gRPC themselves, so each worker runs this server on
its own event loop, beside uvicorn: the same models, batching queues, admission and hot reload as its
HTTP routes (:class:`~.serving.V2Service`), with no second copy of anything. Every worker binds
``IMGCLF_GRPC_PORT`` with ``SO_REUSEPORT``, so the kernel spreads connections over the workers as it
does for HTTP. Messages up to ``IMGCLF_MAX_REQUEST_BYTES`` are accepted (gRPC's own default is 4 MiB);
``IMGCLF_TIMEOUT_S`` bounds one inference as it does over HTTP; ``IMGCLF_MAX_CONCURRENCY`` bounds the
RPCs in progress, as BentoML's backstop does for HTTP (a stream is one RPC).

Beside KServe's six RPCs it serves three of Triton's, which Triton's clients and perf_analyzer use:
``ModelConfig``, ``ModelStatistics`` and ``ModelStreamInfer``. Each request on a stream goes through
exactly what a unary ``ModelInfer`` goes through (:meth:`InferenceServicer._infer`: admission, the
pick, the limits, the timeout, the statistics); the requests of one stream run concurrently and are
answered in the order they finish, each with its ``id``. A failed request is answered with its
``error_message`` and the stream goes on; when the client half-closes, the answers still owed are sent
and then the stream ends (tritonclient's ``stop_stream()`` waits for that).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from service.http.errors import ServiceError
from service.http.v2 import grpc_codec
from service.http.v2.errors import V2Error
from service.http.v2.proto import grpc_predict_v2_pb2 as pb
from service.http.v2.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.http.v2.proto import triton_extensions_pb2 as ext_pb
from service.http.v2.proto import triton_model_config_pb2 as config_pb
from service.http.v2.serving import V2Service

log = logging.getLogger(__name__)
StreamAnswers = asyncio.Queue[ext_pb.ModelStreamInferResponse | None]  # None: the stream's last answer is sent


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six KServe RPCs, plus Triton's ModelConfig, ModelStatistics and ModelStreamInfer (registered
    separately; perf_analyzer and Triton's example clients use them)."""

    def __init__(self, service: V2Service, timeout_s: float, on_error: Callable[[str], None] | None = None) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.on_error = on_error  # told the kind of every refusal, for imgclf_errors_total

    async def _abort(self, context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        """gRPC's rendering of the error tree: the status mapped, headers as trailing metadata, counted."""
        self._count(error)
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

    def _count(self, error: ServiceError) -> None:
        if self.on_error is not None and error.counted:
            self.on_error(error.kind)

    async def ModelStatistics(self, request: ext_pb.ModelStatisticsRequest,
                              context: Any) -> ext_pb.ModelStatisticsResponse:
        try:
            document = await asyncio.to_thread(self.service.statistics, request.name, request.version or None)
            return grpc_codec.statistics_response(document)
        except ServiceError as exc:
            await self._abort(context, exc)
            raise

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return await self._infer(request)
        except ServiceError as exc:
            await self._abort(context, exc)
            raise

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One inference, unary or on a stream: admitted, picked and leased, parsed, answered within the
        timeout, counted in the statistics (:meth:`V2Service.inference`). Every failure is a ServiceError
        (a timeout a 504, a bug or a model failure a logged 500), as REST answers them."""
        name, version = grpc_codec.requested_model(request)
        try:
            with self.service.inference(name, version) as call:
                parsed = grpc_codec.parse_request(request, call.facts)
                async with asyncio.timeout(self.timeout_s):
                    answer = await call.answer(parsed)
                return grpc_codec.encode_response(parsed, answer.outputs, answer.parameters)
        except ServiceError:
            raise
        except TimeoutError:
            raise V2Error(504, f"not answered within {self.timeout_s:g} s", kind="timeout") from None
        except Exception as exc:
            log.exception("V2 gRPC inference failed")
            raise V2Error(500, "internal error while scoring; see the server log", kind="internal_error") from exc

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: Any) -> AsyncIterator[ext_pb.ModelStreamInferResponse]:
        """Triton's streaming inference (see the module docstring): answers in the order they are ready."""
        answers: StreamAnswers = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, answers))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a request stream that broke ends the RPC with its error
        finally:
            reader.cancel()  # the client went away: its requests in progress are cancelled with the reader

    async def _read_stream(self, requests: AsyncIterator[pb.ModelInferRequest], answers: StreamAnswers) -> None:
        """One task per request as it arrives; after the client's half-close, wait for them; then the end."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                task = asyncio.create_task(self._stream_answer(request, answers))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in list(tasks):
                task.cancel()
            answers.put_nowait(None)

    async def _stream_answer(self, request: pb.ModelInferRequest, answers: StreamAnswers) -> None:
        try:
            answer = ext_pb.ModelStreamInferResponse(infer_response=await self._infer(request))
        except ServiceError as exc:
            self._count(exc)
            answer = grpc_codec.stream_error(request, exc)
        answers.put_nowait(answer)


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
        server.add_generic_rpc_handlers((grpc_codec.model_config_handler(servicer.ModelConfig),
                                         grpc_codec.triton_extension_handler(servicer.ModelStatistics,
                                                                             servicer.ModelStreamInfer)))
        server.add_insecure_port(self.address)  # raises RuntimeError when it cannot bind
        await server.start()
        self.server = server
        log.info("V2 gRPC (inference.GRPCInferenceService) listening on %s", self.address)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Finish the RPCs in progress (up to ``grace_s``), then close."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
