"""Triton's statistics extension and gRPC streaming inference (``ModelStreamInfer``), as Triton's own
clients use them.

In-process where the behaviour is arithmetic (the timings a batch hands its items, the statistics
document's shape, admission on a stream); on a real `imgclf serve` (one worker, gRPC on
IMGCLF_GRPC_PORT, a second model) with tritonclient.http and tritonclient.grpc for the rest. Counts are
compared as differences over what each test does, so the tests do not depend on their order.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from imgclf.devserver import free_port
from service.http.admission import Admission, LoadEstimate
from service.http.live import LiveCatalog
from service.http.stats import model_stats, record_request
from service.http.v2.facts import server_metadata
from service.http.v2.grpc_server import GrpcFront
from service.http.v2.proto import grpc_predict_v2_pb2 as pb
from service.http.v2.proto import triton_extensions_pb2 as ext_pb
from service.http.v2.route import Route, match
from service.http.v2.serving import V2Service
from service.settings import Settings
from tests.support import images
from tests.support.servers import NAME, V2Server, add_model, copy_repo, serve

pytestmark = pytest.mark.slow  # servers and subprocesses: not in `make test-quick`

OTHER = "pets-lite"  # a second model: /v2/models/stats lists both
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
HANG_S = 60  # a stream that is not ended by then hangs: the test fails instead of waiting forever
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
             "cache_miss")


# --- in process ---------------------------------------------------------------------------------------------


def test_the_stats_routes_are_matched() -> None:
    assert match("/v2/models/stats") == Route("stats") and match("/v2/models/stats/") == Route("stats")
    assert match("/v2/models/m/stats") == Route("stats", "m")
    assert match("/v2/models/m/versions/2/stats") == Route("stats", "m", "2")
    assert match("/v2/models/a%2Fb/stats") == Route("stats", "a/b") and match("/v2/models/m/stats").method == "GET"
    assert "statistics" in server_metadata()["extensions"]  # perf_analyzer asks for statistics only then


class SumModel:
    """What ServedModel uses of an OnnxModel: logits = each row's sum."""

    def __init__(self) -> None:
        self.session: object | None = object()
        self.manifest = SimpleNamespace(name="sums", version=3, temperature=1.0)
        self.key, self.provider, self.load_seconds = "sums:3", "CPUExecutionProvider", 0.0

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([batch.sum(axis=1), -batch.sum(axis=1)], axis=1)


def test_each_item_learns_its_wait_and_its_batchs_phases_and_the_model_counts_executions() -> None:
    from service.http.served import ServedModel

    served = ServedModel(SumModel(), max_batch_size=3, batch_wait_ms=0)  # type: ignore[arg-type]
    x = np.ones(2, np.float32)
    (before,) = model_stats([("sums", served)])  # counts live in the process's counters: compare differences

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(served.infer_timed(x) for _ in range(4)))  # a batch of 3, then 1

    results = asyncio.run(scenario())
    assert all(np.allclose(row, [2, -2]) for row, _ in results)
    runs = [timing.batch for _, timing in results]
    assert [r.size for r in runs] == [3, 3, 3, 1] and runs[0] is runs[1] is runs[2] and runs[3] is not runs[0]
    assert all(t.queued_ns >= 0 for _, t in results) and runs[3].started_ns >= runs[0].ended_ns
    (ran,) = model_stats([("sums", served)])
    assert (ran["inference_count"] - before["inference_count"], ran["execution_count"] - before["execution_count"]) \
        == (4, 2)
    batches = {b["batch_size"]: b["compute_infer"]["count"] for b in ran["batch_stats"]}
    assert sorted(batches) == [1, 3] and sum(batches.values()) == ran["execution_count"]

    record_request(served, 5_000, results[3][1])
    record_request(served, 7_000, None, ok=False)
    (stat,) = model_stats([("sums", served)])
    assert (stat["name"], stat["version"], stat["response_stats"], stat["memory_usage"]) == ("sums", "3", {}, [])
    inference, earlier = stat["inference_stats"], before["inference_stats"]
    assert set(inference) == set(DURATIONS) and inference["cache_hit"] == {"count": 0, "ns": 0}
    delta = {k: (inference[k]["count"] - earlier[k]["count"], inference[k]["ns"] - earlier[k]["ns"]) for k in DURATIONS}
    assert delta["success"] == (1, 5_000) and delta["fail"] == (1, 7_000)
    assert delta["queue"] == (1, results[3][1].queued_ns)
    assert delta["compute_infer"] == (1, runs[3].infer_ns)
    assert all(inference[k]["count"] == inference["success"]["count"]
               for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert stat["execution_count"] == ran["execution_count"] and stat["last_inference"] > 0

    again = ServedModel(SumModel(), max_batch_size=3, batch_wait_ms=0)  # type: ignore[arg-type]
    (reloaded,) = model_stats([("sums.pixels", again)])  # a version loaded anew continues its counts
    assert reloaded["name"] == "sums.pixels" and reloaded["inference_stats"] == inference


def full_service(max_queue: int = 2) -> V2Service:
    """A V2Service whose worker already has ``max_queue`` requests in flight."""
    settings, load = Settings(max_queue=max_queue), LoadEstimate()
    for _ in range(max_queue):
        load.started()
    return V2Service(LiveCatalog(settings), settings, Admission(max_queue, 1000, load))


def test_a_stream_on_a_full_worker_answers_each_request_with_the_refusal_and_ends() -> None:
    counted: list[str] = []

    async def run() -> list[ext_pb.ModelStreamInferResponse]:
        port = free_port()
        front = GrpcFront(full_service(), "127.0.0.1", port, 1 << 20, 16, 30.0, on_error=counted.append)
        await front.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = channel.stream_stream(STREAM, request_serializer=pb.ModelInferRequest.SerializeToString,
                                               response_deserializer=ext_pb.ModelStreamInferResponse.FromString)
                requests = [pb.ModelInferRequest(model_name=NAME, id=i) for i in ("a", "b")]
                call = stream(iter(requests))
                answers = [answer async for answer in call]
                assert await call.code() == grpc.StatusCode.OK  # refusals are answers; the stream ended well
                return answers
        finally:
            await front.stop()

    answers = asyncio.run(asyncio.wait_for(run(), HANG_S))
    assert sorted(a.infer_response.id for a in answers) == ["a", "b"]
    assert all("2 requests already in flight" in a.error_message for a in answers), answers
    assert counted == ["overloaded", "overloaded"]


# --- a real server -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[V2Server]:
    tmp = tmp_path_factory.mktemp("v2x")
    repo = copy_repo(imagenet_repo, tmp / "models")
    add_model(repo.root, OTHER, "pet ")
    port = free_port()
    env = {"IMGCLF_WORKERS": "1",  # one worker: the statistics it answers count every request
           "IMGCLF_CACHE_ENTRIES": "0",  # no response cache: every image is inferred and counted
           "IMGCLF_GRPC_PORT": str(port), "IMGCLF_GRPC_HOST": "127.0.0.1", "IMGCLF_DEFAULT_MODEL": NAME}
    with serve(repo.root, tmp / "home", **env) as live:
        yield V2Server(live, f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [images.encode(images.photo(size, which).convert("RGB"), "JPEG", quality=90)
            for which, size in (("chelsea", (451, 300)), ("coffee", (400, 300)))]


def http_input(photos: Sequence[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(photos)], "BYTES")
    tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))
    return tensor


def grpc_input(photos: Sequence[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(photos)], "BYTES")
    tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))
    return tensor


def rest_stats(client: httpx.Client, path: str = f"/v2/models/{NAME}/versions/1/stats") -> dict[str, Any]:
    """The one entry of a version's statistics, as perf_analyzer reads them: every key, integers only."""
    response = client.get(path)
    assert response.status_code == 200, response.text
    (stat,) = response.json()["model_stats"]
    assert isinstance(stat["version"], str) and set(stat["inference_stats"]) == set(DURATIONS)
    for key in ("last_inference", "inference_count", "execution_count"):
        assert isinstance(stat[key], int) and stat[key] >= 0, (key, stat)
    for duration in [*stat["inference_stats"].values(),
                     *(b[k] for b in stat["batch_stats"] for k in ("compute_input", "compute_infer", "compute_output"))]:
        assert set(duration) == {"count", "ns"} and all(isinstance(v, int) and v >= 0 for v in duration.values())
    assert stat["response_stats"] == {} and stat["memory_usage"] == []
    return stat


def counts(stat: dict[str, Any]) -> dict[str, int]:
    return {key: stat["inference_stats"][key]["count"] for key in DURATIONS}


def test_statistics_count_http_and_grpc_requests_over_both_transports(server: V2Server, photos: list[bytes]) -> None:
    client = server.live.client
    before = rest_stats(client)
    http, grpc_client = server.http, server.grpc
    for batch in ([photos[0]], photos, [photos[1]]):  # N = 3 HTTP requests, 4 images
        http.infer(NAME, [http_input(batch)], model_version="1")
    for batch in (photos, [photos[0]]):  # M = 2 gRPC requests, 3 images
        grpc_client.infer(NAME, [grpc_input(batch)], model_version="1")
    with pytest.raises(InferenceServerException, match="image 0: "):
        http.infer(NAME, [http_input([b"not an image"])], model_version="1")

    after = rest_stats(client)
    delta = {k: after_count - counts(before)[k] for k, after_count in counts(after).items()}
    assert delta["success"] == 5 and delta["fail"] == 1 and delta["cache_hit"] == delta["cache_miss"] == 0
    assert counts(after)["queue"] == counts(after)["compute_input"] == counts(after)["compute_infer"] \
        == counts(after)["compute_output"] == counts(after)["success"]
    assert all(after["inference_stats"][k]["ns"] > 0 for k in ("success", "fail", "queue", "compute_infer"))
    assert after["inference_count"] - before["inference_count"] >= 7  # images, each one inference
    assert after["execution_count"] - before["execution_count"] >= 1 and after["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"]) == after["inference_count"]
    assert after["last_inference"] >= before["last_inference"] and after["version"] == "1"

    by_http = http.get_inference_statistics(NAME, "1")["model_stats"][0]
    by_grpc = grpc_client.get_inference_statistics(NAME, "1").model_stats[0]  # Triton's own messages
    assert by_grpc.name == NAME and by_grpc.version == "1"
    assert by_grpc.inference_stats.success.count == by_http["inference_stats"]["success"]["count"] == counts(after)["success"]
    assert by_grpc.inference_stats.queue.ns == after["inference_stats"]["queue"]["ns"]
    assert by_grpc.execution_count == after["execution_count"] and len(by_grpc.batch_stats) == len(after["batch_stats"])


def test_statistics_of_every_model_and_the_404s(server: V2Server) -> None:
    everything = server.live.client.get("/v2/models/stats").json()["model_stats"]
    assert sorted((s["name"], s["version"]) for s in everything) == [(NAME, "1"), (OTHER, "1")]
    assert [s.name for s in server.grpc.get_inference_statistics().model_stats] == [NAME, OTHER]
    assert [s["name"] for s in server.http.get_inference_statistics(OTHER)["model_stats"]] == [OTHER]
    for path in ("/v2/models/no-such-model/stats", f"/v2/models/{NAME}/versions/7/stats"):
        response = server.live.client.get(path)
        assert response.status_code == 404 and set(response.json()) == {"error"}, response.text
    with pytest.raises(InferenceServerException) as http_error:
        server.http.get_inference_statistics("no-such-model")
    assert http_error.value.status() == "404"
    for version in ("", "7"):
        with pytest.raises(InferenceServerException) as grpc_error:
            server.grpc.get_inference_statistics("no-such-model" if not version else NAME, version)
        assert grpc_error.value.status() == "StatusCode.NOT_FOUND"


def stop_within(client: grpcclient.InferenceServerClient, seconds: float) -> None:
    """``stop_stream()`` waits for the server to end the stream: a hang fails here instead of forever."""
    stopper = threading.Thread(target=client.stop_stream, daemon=True)
    stopper.start()
    stopper.join(seconds)
    assert not stopper.is_alive(), f"stop_stream() still waiting after {seconds} s: the server kept the stream open"


def test_streaming_answers_each_request_by_id_and_ends_when_the_client_stops(server: V2Server,
                                                                           photos: list[bytes]) -> None:
    before = counts(rest_stats(server.live.client))
    client = server.grpc
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for request_id, data in (("1", photos[0]), ("2", photos[1][:300]), ("3", photos[1])):
        client.async_stream_infer(NAME, [grpc_input([data])], request_id=request_id, model_version="1")
    stop_within(client, HANG_S)
    got = [answers.get_nowait() for _ in range(3)]  # stop_stream returned: every answer has arrived
    assert answers.empty()
    results = {result.get_response().id: result for result, error in got if error is None}
    errors = [error for result, error in got if error is not None]
    assert sorted(results) == ["1", "3"] and len(errors) == 1 and "image 0: " in str(errors[0])
    assert all(r.as_numpy("probabilities").shape == (1, 1000) for r in results.values())
    assert int(np.argmax(results["1"].as_numpy("probabilities"))) != int(np.argmax(results["3"].as_numpy("probabilities")))
    after = counts(rest_stats(server.live.client))
    assert (after["success"] - before["success"], after["fail"] - before["fail"]) == (2, 1)
    client.close()


def test_a_stream_the_client_closes_at_once_ends_with_no_answer(server: V2Server) -> None:
    client, answers = server.grpc, []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    stop_within(client, HANG_S)
    assert answers == []  # no request, no answer, and the stream ended
    client.close()


# --- several workers ---------------------------------------------------------------------------------------


def workers_serving(client: httpx.Client) -> set[str]:
    """The pids of the workers that serve a model, from the per-process imgclf_model_info gauge."""
    return {line.split('pid="', 1)[1].split('"', 1)[0] for line in client.get("/metrics").text.splitlines()
            if line.startswith("imgclf_model_info{") and 'pid="' in line and float(line.rsplit(" ", 1)[1]) == 1}


def successes_per_worker(home: Path) -> dict[str, int]:
    """pid -> the V2 successes that worker counted, from its own file of BentoML's multiprocess folder."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[str, int] = {}
    for file in (home / "bentoml" / "prometheus_multiproc_dir").glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(file)]):
            for sample in metric.samples:
                if sample.name == "imgclf_v2_stats_requests_total" and sample.labels.get("kind") == "success":
                    pid = file.stem.rsplit("_", 1)[1]
                    out[pid] = out.get(pid, 0) + int(sample.value)
    return out


def test_statistics_are_the_sum_over_the_workers(imagenet_repo: Path, tmp_path: Path, photos: list[bytes]) -> None:
    """perf_analyzer sends its requests on pooled connections and asks for the statistics on another: any
    worker's answer must count every worker's requests."""
    home = tmp_path / "home"
    with serve(imagenet_repo, home, IMGCLF_WORKERS="2", IMGCLF_CACHE_ENTRIES="0") as live:  # each image inferred
        deadline = time.monotonic() + 120  # /readyz answers once one worker is up; the other may still load
        while len(workers_serving(live.client)) < 2:
            assert time.monotonic() < deadline, "the second worker never came up"
            time.sleep(0.2)
        sent = 0
        while sent < 12 or len(successes_per_worker(home)) < 2:  # until both workers answered some
            assert sent < 200, f"every new connection went to one worker: {successes_per_worker(home)}"
            client = httpclient.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=120)
            client.infer(NAME, [http_input([photos[sent % 2]])], model_version="1", headers={"Connection": "close"})
            client.close()  # a new connection each time: the kernel picks a worker per connection
            sent += 1
        assert sum(successes_per_worker(home).values()) == sent and max(successes_per_worker(home).values()) < sent
        for _ in range(6):  # on fresh connections: whichever worker answers, it counts both workers' requests
            with httpx.Client(base_url=live.url, timeout=60) as fresh:
                stat = rest_stats(fresh)
            seen = counts(stat)
            assert seen["success"] == sent and seen["fail"] == 0, seen
            assert seen["queue"] == seen["compute_input"] == seen["compute_infer"] == seen["compute_output"] == sent
            assert all(stat["inference_stats"][k]["ns"] > 0 for k in ("success", "queue", "compute_infer"))
            assert stat["inference_count"] >= sent and stat["execution_count"] >= 1 and stat["last_inference"] > 0
            assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in stat["batch_stats"]) \
                == stat["inference_count"]
