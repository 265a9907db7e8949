"""The V2 front doors share the worker's limits: admission (503 + Retry-After), the body reader, gRPC's port.

In-process where the behaviour is arithmetic (a full admission is refused over REST and gRPC alike),
a subprocess where it is wiring (service.http.app hands both doors the very objects /classify uses),
and a real two-worker server for SO_REUSEPORT. The OpenAPI extension is checked for well-formedness
here; tests/test_hostile.py fuzzes the real document, V2 routes included.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from imgclf.devserver import free_port
from service.http.admission import Admission, LoadEstimate
from service.http.body import BodyReader, UploadPace
from service.http.errors import ErrorResponses
from service.http.live import LiveCatalog
from service.http.v2.grpc_server import GrpcFront
from service.http.v2.openapi import extend_spec, v2_paths
from service.http.v2.proto import grpc_predict_v2_pb2 as pb
from service.http.v2.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.http.v2.route import V2App, match
from service.http.v2.serving import V2Service
from service.settings import Settings
from tests.support import ROOT
from tests.support.servers import NAME, jpeg_photo, serve

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`


def full_service(max_queue: int = 2) -> tuple[V2Service, list[str]]:
    """A V2Service whose worker already has ``max_queue`` requests in flight; the error kinds it counts."""
    settings = Settings(max_queue=max_queue)
    load = LoadEstimate()
    for _ in range(max_queue):
        load.started()
    counted: list[str] = []
    admission = Admission(max_queue=max_queue, latency_budget_ms=1000, estimate=load)
    return V2Service(LiveCatalog(settings), settings, admission), counted


async def call_asgi(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-length", str(len(body)).encode())]}
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


async def _never(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("a V2 path reached the app behind the middleware")


def test_a_full_worker_refuses_rest_inference_with_retry_after() -> None:
    service, counted = full_service()
    routes = ErrorResponses(V2App(service, BodyReader(UploadPace(), 8), max_body=1 << 20), count=counted.append)
    status, headers, body = asyncio.run(call_asgi(routes, "POST", f"/v2/models/{NAME}/infer", b'{"inputs": []}'))
    assert status == 503 and int(headers["retry-after"]) >= 1, body
    assert json.loads(body).keys() == {"error"} and "2 requests already in flight" in json.loads(body)["error"]
    assert counted == ["overloaded"] and service.admission.load.in_flight == 2  # the refusal did not count itself
    status, _, body = asyncio.run(call_asgi(routes, "GET", "/v2/health/live"))  # health is never refused
    assert status == 200 and json.loads(body) == {"live": True}


def test_a_full_worker_refuses_grpc_inference_with_a_retry_after_trailer() -> None:
    service, counted = full_service()

    async def run() -> grpc.aio.AioRpcError:
        port = free_port()
        front = GrpcFront(service, "127.0.0.1", port, 1 << 20, 16, 30.0, on_error=counted.append)
        await front.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert (await stub.ServerLive(pb.ServerLiveRequest())).live
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(pb.ModelInferRequest(model_name=NAME))
                return caught.value
        finally:
            await front.stop()

    error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in error.details()
    assert int(dict(error.trailing_metadata())["retry-after"]) >= 1 and counted == ["overloaded"]


def test_no_grpc_port_means_no_grpc_server() -> None:
    service, _ = full_service()
    front = GrpcFront(service, "127.0.0.1", None, 1 << 20, 16, 30.0)
    asyncio.run(front.start())
    assert front.server is None and Settings().grpc_port is None


def test_the_app_gives_v2_the_objects_classify_uses() -> None:
    """One body reader, one load estimate, the same queue limit and budget, per worker."""
    check = (
        "import service.http.app as a\n"
        "from service.http.admission import AdmissionControl\n"
        "from service.http.guard import RequestGuard\n"
        "from service.http.routes import table\n"
        "w = a.edge().worker\n"
        "stack, layers = a.edge().asgi(lambda *_: None).edge, {}\n"
        "while hasattr(stack, 'app'):\n"
        "    layers[type(stack).__name__], stack = stack, stack.app\n"
        "v2 = next(e.handler for e in table(w, None) if e.path == '/v2')\n"
        "assert v2.bodies is w.bodies and layers['RequestGuard'].bodies is w.bodies\n"
        "assert w.v2.admission is w.admission and layers['AdmissionControl'].admission is w.admission\n"
        "assert w.v2.admission.max_queue == w.admission.max_queue == a.settings.max_queue\n"
        "assert w.v2.admission.budget_s * 1000 == a.settings.latency_budget_ms\n"
        "assert w.grpc.service is w.v2 and w.v2.live is w.live\n"
        "assert '/v2' not in layers['RequestGuard'].routes  # V2 reads its own body, answers its own error shape\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_routes_are_matched_on_the_encoded_path() -> None:
    assert match("/v2/models/m/versions/3/infer").action == "infer"
    assert (match("/v2/models/m/versions/3").action, match("/v2/models/m/versions/3").version) == ("model", "3")
    assert match("/v2/models/m/ready/").action == "model_ready" and match("/v2/").action == "server"
    assert match("/v2/models/a%2Finfer").model == "a/infer"  # one segment, not the infer route
    assert match("/v2/models/m/bogus") is None and match("/v2/models") is None


def test_the_openapi_extension_is_well_formed() -> None:
    """Every $ref resolves, BentoML's entries stay, and schemathesis finds every V2 operation."""
    import schemathesis

    from service.http.app import Classifier

    spec = extend_spec(Classifier.openapi_spec.asdict(), [NAME], ["1", "2"])
    text = json.dumps(spec)
    refs = {r.split("/")[-1] for r in _refs(spec)}
    assert refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])
    assert "/classify" in spec["paths"] and "V2InferenceRequest" in text
    labels = {op.ok().label for op in schemathesis.openapi.from_dict(spec).get_all_operations()}
    expected = {f"{method.upper()} {path}" for path, item in v2_paths([NAME], ["1"]).items() for method in item}
    assert len(expected) == 11 and expected <= labels
    model = spec["paths"]["/v2/models/{model_name}/infer"]["post"]["parameters"][0]
    assert model["schema"]["enum"] == [NAME]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.mark.slow
def test_every_worker_serves_grpc_on_the_same_port(imagenet_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    with serve(imagenet_repo, tmp_path, IMGCLF_WORKERS="2", IMGCLF_GRPC_PORT=str(port),
               IMGCLF_GRPC_HOST="127.0.0.1") as live:
        deadline = time.monotonic() + 120  # /readyz answers once one worker is up; the other may still load
        while len(listening := _listening(live.proc.pid, port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(listening) == 2, "both workers bind the gRPC port (SO_REUSEPORT)"
        photo = jpeg_photo()
        for _ in range(6):  # a new channel each time: the kernel picks a worker per connection
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            tensor = grpcclient.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([photo], dtype=np.object_))
            assert client.infer(NAME, [tensor]).as_numpy("probabilities").shape == (1, 1000)
            client.close()


def _listening(root: int, port: int) -> set[int]:
    """The processes under ``root`` that listen on ``port``."""
    found = set()
    for process in psutil.Process(root).children(recursive=True):
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in process.net_connections("tcp")):
                found.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_the_v2_benchmark_runs(imagenet_repo: Path, tmp_path: Path) -> None:
    """benchmarks/v2_perf.py on a tiny load, with tritonclient's clients (no perf_analyzer download here)."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.v2_perf", "--repo", str(imagenet_repo), "--seconds", "0.5",
         "--concurrency", "2", "--distinct", "6", "--settle", "0", "--perf-analyzer", "off", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "v2_perf.json").read_text())["runs"]["2"]
    assert set(run) == {"loadgen /classify (multipart)", "loadgen V2 REST", "tritonclient V2 http",
                        "tritonclient V2 grpc"}
    assert run["loadgen V2 REST"]["ok"] > 0 and run["tritonclient V2 grpc"]["throughput_rps"] > 0
    assert run["tritonclient V2 http"]["errors"] == 0 and run["loadgen V2 REST"]["errors"] == 0
    assert "tritonclient's own clients measured instead" in (tmp_path / "v2_perf.md").read_text()
