"""The V2 (Open Inference Protocol) codec against the real clients' own encoders and decoders.

Requests are built by tritonclient's client-side code (``InferInput``, ``InferRequestedOutput``,
``InferenceServerClient.generate_request_body`` = ``_get_inference_request``, tritonclient.grpc's
request builder) and answers are read back by tritonclient's ``InferResult``, so what passes here is
what those clients send and read. No server: the HTTP and gRPC wiring is tested elsewhere.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import numpy as np
import pytest

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request as grpc_request
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
)

from service.http.v2 import ModelFacts, V2Error, build_outputs, grpc_codec, rest, schemas
from service.http.v2.errors import parse_version
from service.http.v2.facts import model_config, model_metadata, server_metadata
from service.http.v2.proto import grpc_predict_v2_pb2 as pb
from service.manifest import ExportProvenance, InputSpec, Manifest, OutputSpec
from service.preprocessing import PreprocessSpec
from tests.support.images import encode, photo

LABELS = ["tabby", "tiger cat", "coffee", "astronaut", "rocket"]


def _manifest(spec: PreprocessSpec, version: int = 3) -> Manifest:
    return Manifest(
        name="pets", version=version, created_at=datetime.now(UTC), architecture="tiny", labels=LABELS,
        input=InputSpec(shape=["batch", spec.channels, *spec.input_size]), output=OutputSpec(shape=["batch", 5]),
        preprocessing=spec, temperature=1.5, export=ExportProvenance(exporter="dynamo", opset=18, versions={}),
        files={},
    )


@pytest.fixture(scope="module")
def facts() -> ModelFacts:
    spec = PreprocessSpec(input_size=(24, 32), resize_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    return ModelFacts.from_manifest(_manifest(spec), versions=[2, 3], max_images=8, batch_size=16)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Real photos as JPEG and PNG files (scikit-image's chelsea, coffee, astronaut)."""
    return [encode(photo((96, 64), "chelsea"), "JPEG", quality=90), encode(photo((80, 60), "coffee"), "JPEG"),
            encode(photo((64, 64), "astronaut"), "PNG")]


def _probs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    logits = np.random.default_rng(seed).normal(size=(n, len(LABELS))).astype(np.float32)
    e = np.exp(logits / 1.5)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32), logits


def _http_body(inputs, outputs=None, **kw) -> tuple[bytes, int | None]:
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return body, header_length


def _image_input(images: list[bytes], binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def _answer(facts: ModelFacts, request, probs, logits) -> httpclient.InferResult:
    answer = rest.encode_response(request, build_outputs(request, facts, probs, logits))
    length = answer.headers.get(rest.HEADER_LENGTH)
    return httpclient.InferenceServerClient.parse_response_body(answer.body, header_length=length and int(length))


# --- REST: binary BYTES images ---------------------------------------------------------------------
def test_binary_images_from_tritonclient(facts: ModelFacts, jpegs: list[bytes]) -> None:
    body, length = _http_body([_image_input(jpegs)], request_id="req-7")
    request = rest.parse_request(body, length, facts)
    assert request.images == tuple(jpegs) and request.source == "binary" and request.id == "req-7"
    assert [o.name for o in request.outputs] == ["probabilities", "logits"]
    assert all(o.binary for o in request.outputs)  # no outputs named: binary_data_output


def test_binary_answer_with_classification_is_read_by_infer_result(facts: ModelFacts, jpegs: list[bytes]) -> None:
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=True),
               httpclient.InferRequestedOutput("logits", binary_data=True, class_count=3)]
    body, length = _http_body([_image_input(jpegs)], outputs=outputs, request_id="abc")
    request = rest.parse_request(body, length, facts)
    probs, logits = _probs(len(jpegs))
    result = _answer(facts, request, probs, logits)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    top = result.as_numpy("logits")
    assert top.shape == (3, 3) and top.dtype == np.object_
    for row, strings in zip(logits, top, strict=True):
        parsed = [s.decode().split(":", 2) for s in strings]
        order = np.argsort(-row, kind="stable")[:3]
        assert [int(p[1]) for p in parsed] == order.tolist()
        assert [p[2] for p in parsed] == [LABELS[i] for i in order]
        np.testing.assert_array_equal(np.float32([float(p[0]) for p in parsed]), row[order])  # exact
    response = result.get_response()
    assert response["model_name"] == "pets" and response["model_version"] == "3" and response["id"] == "abc"
    schemas.InferenceResponse.model_validate(response)


def test_classification_on_probabilities_uses_the_labels_and_caps_k(facts: ModelFacts, jpegs: list[bytes]) -> None:
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=50)]
    request = rest.parse_request(*_http_body([_image_input(jpegs[:1])], outputs=outputs), facts)
    probs, logits = _probs(1, seed=4)
    strings = _answer(facts, request, probs, logits).as_numpy("probabilities")
    assert strings.shape == (1, len(LABELS))  # K above the label count: every class, best first
    scores = [float(s.split(":")[0]) for s in strings[0]]
    assert scores == sorted(scores, reverse=True) and {s.split(":", 2)[2] for s in strings[0]} == set(LABELS)


def test_json_answer_when_binary_is_not_asked(facts: ModelFacts, jpegs: list[bytes]) -> None:
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    request = rest.parse_request(*_http_body([_image_input(jpegs)], outputs=outputs), facts)
    probs, _ = _probs(len(jpegs), seed=1)
    answer = rest.encode_response(request, build_outputs(request, facts, probs, None))
    assert rest.HEADER_LENGTH not in answer.headers and answer.headers["Content-Type"] == "application/json"
    document = json.loads(answer.body)
    assert [o["name"] for o in document["outputs"]] == ["probabilities"]
    result = httpclient.InferenceServerClient.parse_response_body(answer.body)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)  # JSON floats read back exact


# --- REST: JSON inputs ------------------------------------------------------------------------------
def test_curl_style_json_with_base64(facts: ModelFacts, jpegs: list[bytes]) -> None:
    document = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                            "data": [base64.b64encode(j).decode() for j in jpegs[:2]]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    request = rest.parse_request(json.dumps(document).encode(), None, facts)
    assert request.images == tuple(jpegs[:2]) and request.source == "base64"
    assert request.outputs[0].classification == 2 and not request.outputs[0].binary
    column = document["inputs"][0] | {"shape": [2, 1], "data": [[d] for d in document["inputs"][0]["data"]]}
    assert rest.parse_request(_doc(column), None, facts).images == tuple(jpegs[:2])  # perf_analyzer's [N, 1]


def test_plain_json_strings_are_their_utf8_bytes(facts: ModelFacts, jpegs: list[bytes]) -> None:
    """Why base64 is needed: tritonclient refuses non-UTF-8 BYTES without the binary extension."""
    with pytest.raises(InferenceServerException, match="UTF-8"):
        _image_input(jpegs[:1], binary=False)
    body, length = _http_body([_image_input([b"not an image"], binary=False)])
    request = rest.parse_request(body, length, facts)
    assert request.images == (b"not an image",) and request.source == "json"


def test_kserve_clients_model_name_field_is_accepted(facts: ModelFacts) -> None:
    """KServe's InferRequest.to_rest() puts model_name (and a uuid id) in the body."""
    body = _doc(IMG, model_name="pets", id="0b6c")
    assert rest.parse_request(body, None, facts).id == "0b6c"


@pytest.mark.parametrize("binary", [True, False])
def test_pixels_fp32(facts: ModelFacts, binary: bool) -> None:
    pixels = np.random.default_rng(2).normal(size=(2, 3, 24, 32)).astype(np.float32)
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    request = rest.parse_request(*_http_body([tensor]), facts)
    np.testing.assert_array_equal(request.pixels, pixels)
    assert request.batch_size == 2 and request.images is None


def test_nested_json_pixels(facts: ModelFacts) -> None:
    pixels = np.zeros((1, 3, 24, 32), np.float32)
    document = {"inputs": [{"name": "pixels", "shape": [1, 3, 24, 32], "datatype": "FP32", "data": pixels.tolist()}]}
    assert rest.parse_request(json.dumps(document).encode(), None, facts).pixels.shape == (1, 3, 24, 32)


# --- REST: client mistakes --------------------------------------------------------------------------
def _error(body: bytes, length: int | None, facts: ModelFacts) -> V2Error:
    with pytest.raises(V2Error) as info:
        rest.parse_request(body, length, facts)
    assert json.loads(info.value.body()) == {"error": info.value.message}
    return info.value


def _doc(*inputs: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


PIX = {"name": "pixels", "shape": [1, 3, 24, 32], "datatype": "FP32", "data": [0.0] * (3 * 24 * 32)}
IMG = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="], "parameters": {"content_type": "base64"}}


@pytest.mark.parametrize(("body", "status", "needle"), [
    (_doc({**PIX, "shape": [1, 3, 32, 24]}), 400, "must have shape [-1, 3, 24, 32]"),
    (_doc({**PIX, "datatype": "FP16"}), 400, "must be FP32"),
    (_doc({**IMG, "datatype": "FP32"}), 400, "must be BYTES"),
    (_doc({**IMG, "shape": [1, 2], "data": ["eA=="] * 2}), 400, "must have shape [N]"),
    (_doc(), 400, "List should have at least 1 item"),
    (_doc({**IMG, "name": "input__0"}), 400, "unknown input 'input__0'; model 'pets' takes 'image' (BYTES [-1])"),
    (_doc(IMG, PIX), 400, "supply exactly one input"),
    (_doc(IMG, outputs=[{"name": "scores"}]), 400, "offers 'probabilities', 'logits'"),
    (_doc(IMG, outputs=[{"name": "logits"}, {"name": "logits"}]), 400, "requested twice"),
    (_doc(IMG, outputs=[{"name": "logits", "parameters": {"classification": -1}}]), 400, "at least 1"),
    (_doc(IMG, outputs=[{"name": "logits", "parameters": {"binary_data": "yes"}}]), 400, "true or false"),
    (_doc({**IMG, "shape": [9], "data": ["eA=="] * 9}), 413, "at most 8 items"),
    (_doc({**IMG, "data": ["***"]}), 400, "element 0 is not valid base64"),
    (_doc({**IMG, "data": [""]}), 400, "image 0: empty"),
    (_doc({**IMG, "shape": [2]}), 400, "data has 1 elements but the shape says 2"),
    (_doc({**PIX, "data": [0.0] * 5}), 400, "data has 5 values; shape [1, 3, 24, 32] needs 2304"),
    (_doc({**PIX, "data": ["1.5"] * 2304}), 400, "numbers only"),
    (_doc({**PIX, "shape": [0, 3, 24, 32], "data": []}), 400, "must be positive"),
    (_doc({"name": "image", "shape": [1], "datatype": "BYTES"}), 400, "has no data"),
    (_doc({**IMG, "parameters": {"shared_memory_region": "r0"}}), 400, "shared-memory extension is not supported"),
    (_doc(IMG, extra_field=1), 400, "extra_field: Extra inputs are not permitted"),
    (b"{not json", 400, "not valid JSON"),
])
def test_client_mistakes_are_400s_that_say_what_was_expected(facts: ModelFacts, body: bytes, status: int,
                                                             needle: str) -> None:
    error = _error(body, None, facts)
    assert error.status == status and needle in error.message, error.message


def test_nan_pixels_are_refused(facts: ModelFacts) -> None:
    pixels = np.zeros((1, 3, 24, 32), np.float32)
    pixels[0, 0, 0, 0] = np.nan
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    assert "finite" in _error(*_http_body([tensor]), facts).message


def test_binary_framing_mistakes(facts: ModelFacts, jpegs: list[bytes]) -> None:
    body, length = _http_body([_image_input(jpegs[:2])])
    assert "not valid JSON" in _error(body, None, facts).message  # binary without the header
    assert "bytes after the JSON header belong to no input" in _error(body + b"xx", length, facts).message
    assert "only" in _error(body[:-10], length, facts).message
    assert "Inference-Header-Content-Length" in _error(body, len(body) + 1, facts).message
    wrong_shape = _image_input(jpegs[:2])
    wrong_shape.set_shape([3])
    assert "elements but the shape says 3" in _error(*_http_body([wrong_shape]), facts).message
    header = json.loads(body[:length])
    header["inputs"][0]["parameters"]["binary_data_size"] -= 3  # a length prefix now overruns its slice
    text = json.dumps(header).encode()
    assert "claims" in _error(text + body[length:-3], len(text), facts).message


def test_tritonclient_reads_the_error_body() -> None:
    class Response:  # what tritonclient.http's _get_error reads from geventhttpclient's response
        status_code = 400

        def read(self) -> bytes:
            return V2Error(400, "input 'pixels' must be FP32").body()

    from tritonclient.http._utils import _get_error

    error = _get_error(Response())
    assert error.message() == "input 'pixels' must be FP32" and error.status() == "400"


# --- gRPC ---------------------------------------------------------------------------------------------
def _grpc_message(inputs, outputs=None, request_id: str = "") -> pb.ModelInferRequest:
    theirs = grpc_request("pets", inputs, "", request_id, outputs, 0, False, False, 0, None, None)
    assert isinstance(theirs, service_pb2.ModelInferRequest)
    return pb.ModelInferRequest.FromString(theirs.SerializeToString())  # over the wire


def test_grpc_images_and_classification_round_trip(facts: ModelFacts, jpegs: list[bytes]) -> None:
    tensor = grpcclient.InferInput("image", [len(jpegs)], "BYTES")
    tensor.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    outputs = [grpcclient.InferRequestedOutput("probabilities"), grpcclient.InferRequestedOutput("logits", class_count=2)]
    message = _grpc_message([tensor], outputs, request_id="g1")
    assert grpc_codec.requested_model(message) == ("pets", None)
    request = grpc_codec.parse_request(message, facts)
    assert request.images == tuple(jpegs) and request.source == "grpc" and request.id == "g1"
    probs, logits = _probs(len(jpegs), seed=3)
    mine = grpc_codec.encode_response(request, build_outputs(request, facts, probs, logits))
    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(mine.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    top = result.as_numpy("logits")
    assert top.shape == (3, 2) and top[0][0].decode().split(":")[1] == str(int(np.argmax(logits[0])))
    assert result.get_response().model_version == "3" and result.get_response().id == "g1"


def test_grpc_pixels_typed_contents(facts: ModelFacts) -> None:
    pixels = np.random.default_rng(5).normal(size=(1, 3, 24, 32)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="pets")
    message.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 24, 32]).contents.fp32_contents.extend(
        pixels.ravel().tolist())
    np.testing.assert_array_equal(grpc_codec.parse_request(message, facts).pixels, pixels)
    message.inputs[0].shape[:] = [1, 3, 24, 24]
    with pytest.raises(V2Error, match=r"\[-1, 3, 24, 32\]") as info:
        grpc_codec.parse_request(message, facts)
    assert grpc_codec.status_code(info.value).name == "INVALID_ARGUMENT"


def test_grpc_bytes_contents_and_raw_mismatch(facts: ModelFacts, jpegs: list[bytes]) -> None:
    message = pb.ModelInferRequest(model_name="pets")
    message.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(jpegs[:2])
    assert grpc_codec.parse_request(message, facts).images == tuple(jpegs[:2])
    message.raw_input_contents.append(serialize_byte_tensor(np.array(jpegs[:2], dtype=np.object_)).item())
    with pytest.raises(V2Error, match="both contents and raw_input_contents"):
        grpc_codec.parse_request(message, facts)


# --- metadata, config, versions -------------------------------------------------------------------------
def test_model_metadata_tells_the_truth(facts: ModelFacts) -> None:
    meta = schemas.ModelMetadataResponse.model_validate(model_metadata(facts))
    assert meta.platform == "onnx_onnxv1" and meta.versions == ["2", "3"]
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("image", "BYTES", [-1]),
                                                                     ("pixels", "FP32", [-1, 3, 24, 32])]
    assert [(t.name, t.shape) for t in meta.outputs] == [("probabilities", [-1, 5]), ("logits", [-1, 5])]
    assert meta.parameters["labels"] == 5 and json.loads(meta.parameters["preprocessing"])["input_size"] == [24, 32]
    ours = grpc_codec.model_metadata(facts)
    theirs = service_pb2.ModelMetadataResponse.FromString(ours.SerializeToString())
    assert [list(t.shape) for t in theirs.inputs] == [[-1], [-1, 3, 24, 32]] and theirs.platform == "onnx_onnxv1"
    gray = PreprocessSpec(input_size=(28, 28), resize_size=28, mean=(0.5,), std=(0.5,), color_mode="L")
    small = ModelFacts.from_manifest(_manifest(gray), offers_logits=False)
    assert small.pixels_shape == (1, 28, 28) and small.output_names() == ["probabilities"]


def test_model_config_for_perf_analyzer(facts: ModelFacts) -> None:
    """max_batch_size 0: perf_analyzer then sends the metadata's full shapes (``--shape image:N``)."""
    config = schemas.ModelConfigResponse.model_validate(model_config(facts))
    assert config.max_batch_size == 0 and all(i.optional for i in config.input)
    assert [(i.name, i.data_type, i.dims) for i in config.input] == [("image", "TYPE_STRING", [-1]),
                                                                      ("pixels", "TYPE_FP32", [-1, 3, 24, 32])]
    assert [(o.data_type, o.dims) for o in config.output] == [("TYPE_FP32", [-1, 5])] * 2
    assert config.dynamic_batching.preferred_batch_size == [16]
    theirs = service_pb2.ModelConfigResponse.FromString(grpc_codec.model_config_response(facts).SerializeToString())
    assert theirs.config.input[0].optional and theirs.config.input[1].data_type == 11  # TYPE_FP32
    assert list(theirs.config.input[1].dims) == [-1, 3, 24, 32] and theirs.config.name == "pets"


def test_server_metadata_and_version_routing() -> None:
    document = schemas.ServerMetadataResponse.model_validate(server_metadata())
    assert document.name == "imgclf" and document.extensions == ["binary_tensor_data", "classification", "statistics", "model_repository"]
    assert grpc_codec.server_metadata_response().extensions == ["binary_tensor_data", "classification", "statistics", "model_repository"]
    assert parse_version("pets", None, [2, 3]) is None and parse_version("pets", "2", [2, 3]) == 2
    with pytest.raises(V2Error, match="loaded versions: 2, 3") as info:
        parse_version("pets", "7", [2, 3])
    assert info.value.status == 404 and grpc_codec.status_code(info.value).name == "NOT_FOUND"


def test_bytes_wire_format_matches_tritonclient(jpegs: list[bytes]) -> None:
    from service.http.v2.tensors import deserialize_bytes, serialize_bytes

    theirs = serialize_byte_tensor(np.array(jpegs, dtype=np.object_)).item()  # one bytes element
    assert serialize_bytes(jpegs) == theirs and deserialize_bytes(theirs, 3, "x") == jpegs
    assert list(deserialize_bytes_tensor(serialize_bytes(jpegs))) == jpegs


# --- the committed stubs ----------------------------------------------------------------------------------
def test_stubs_coexist_with_tritonclient_and_are_fresh() -> None:
    from service.http.v2.proto import generate, grpc_predict_v2_pb2_grpc

    assert grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer.ModelInfer  # imports beside tritonclient.grpc
    pytest.importorskip("grpc_tools")
    assert generate.main(["--check"]) == 0
