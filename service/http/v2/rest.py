"""V2 over HTTP: the inference request body in, the response body and headers out.

Body layout (binary tensor extension): the JSON header, then the tensors' bytes in the order the
inputs appear; ``Inference-Header-Content-Length`` gives the JSON's length (missing: the whole body is
JSON, as Triton reads it) and each binary input names its ``parameters.binary_data_size``. The answer
uses the same layout when an output is asked for as binary, and plain JSON otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from service.http.v2.errors import V2Error, invalid
from service.http.v2.facts import ModelFacts
from service.http.v2.outputs import OutputTensor
from service.http.v2.request import InferRequest, RawInput, RawOutput, build_request
from service.http.v2.schemas import InferenceRequest
from service.http.v2.tensors import fp32_to_bytes, fp32_to_json, serialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class RestResponse:
    """What to answer: status, body and the headers the body's layout needs."""

    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON_TYPE})
    status: int = 200


def _header_length(value: str | int | None, body_length: int) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or int(text) > body_length:  # "" and "²" are not lengths
        raise invalid(f"{HEADER_LENGTH} must be the JSON header's length in bytes (0..{body_length}), "
                      f"got {value!r}")
    return int(text) or None  # 0: the whole body is JSON (Triton's reading of a missing header)


def _validation_message(exc: ValidationError, header_given: bool) -> str:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        hint = "" if header_given else f" (binary tensor data needs the {HEADER_LENGTH} header)"
        return f"the request's JSON header is not valid JSON: {first['msg']}{hint}"
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    return f"invalid inference request: {where or 'body'}: {first['msg']}"


def _split_binary(header: InferenceRequest, tail: memoryview) -> list[RawInput]:
    """Each input with its slice of the bytes after the JSON header, in the inputs' order."""
    raws: list[RawInput] = []
    offset = 0
    for item in header.inputs:
        parameters: Mapping[str, Any] = item.parameters or {}
        size = parameters.get("binary_data_size")
        what = f"input {item.name!r}"
        if size is None:
            raws.append(RawInput(item.name, item.datatype, tuple(item.shape), parameters, data=item.data))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise invalid(f"{what}: parameters.binary_data_size must be a byte count, not {size!r}")
        if item.data is not None:
            raise invalid(f"{what} has both 'data' and parameters.binary_data_size; send one")
        if offset + size > len(tail):
            raise invalid(f"{what}: binary_data_size says {size} bytes but only {len(tail) - offset} follow "
                          "the JSON header")
        raws.append(RawInput(item.name, item.datatype, tuple(item.shape), parameters, raw=tail[offset:offset + size]))
        offset += size
    if offset != len(tail):
        raise invalid(f"{len(tail) - offset} bytes after the JSON header belong to no input's binary_data_size")
    return raws


def parse_request(body: bytes, header_length: str | int | None, facts: ModelFacts, *,
                  max_images: int | None = None) -> InferRequest:
    """``POST /v2/models/{m}[/versions/{v}]/infer``: the body and its ``Inference-Header-Content-Length``."""
    length = _header_length(header_length, len(body))
    view = memoryview(body)
    json_part, tail = (view, view[len(view):]) if length is None else (view[:length], view[length:])
    try:
        header = InferenceRequest.model_validate_json(bytes(json_part))
    except ValidationError as exc:
        raise invalid(_validation_message(exc, length is not None)) from None
    inputs = _split_binary(header, tail)
    outputs = None if header.outputs is None else [RawOutput(o.name, o.parameters or {}) for o in header.outputs]
    return build_request(inputs, outputs, header.parameters or {}, facts, request_id=header.id,
                         max_images=max_images)


def _output_json(tensor: OutputTensor, blobs: list[bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    if tensor.binary:
        blob = serialize_bytes(tensor.values) if tensor.datatype == "BYTES" else fp32_to_bytes(tensor.values)
        out["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    elif tensor.datatype == "BYTES":
        out["data"] = [v.decode("utf-8") for v in tensor.values]
    else:
        out["data"] = fp32_to_json(tensor.values)
    return out


def encode_response(request: InferRequest, outputs: list[OutputTensor],
                    parameters: Mapping[str, Any] | None = None) -> RestResponse:
    """The 200 answer: JSON, or JSON header + binary outputs when any output is binary."""
    header: dict[str, Any] = {"model_name": request.model, "model_version": str(request.version)}
    if request.id is not None:
        header["id"] = request.id  # "If id is given it must be echoed"
    if parameters:
        header["parameters"] = dict(parameters)  # e.g. confident (service.http.v2.serving)
    blobs: list[bytes] = []
    header["outputs"] = [_output_json(t, blobs) for t in outputs]
    try:
        text = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # JSON has no NaN/Infinity: the model produced them
        raise V2Error(500, "the model produced non-finite values", kind="internal_error") from None
    if not blobs:
        return RestResponse(text)
    return RestResponse(text + b"".join(blobs), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(text))})


def error_response(error: V2Error) -> RestResponse:
    """A V2 error answer: its status and ``{"error": message}``."""
    return RestResponse(error.body(), status=error.status)


def json_response(document: Mapping[str, Any], status: int = 200) -> RestResponse:
    """Metadata, config and health answers."""
    return RestResponse(json.dumps(document, separators=(",", ":")).encode(), status=status)
