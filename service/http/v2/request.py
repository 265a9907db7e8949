"""The internal V2 inference request, and the checks that turn a transport's tensors into one.

REST (:mod:`.rest`) and gRPC (:mod:`.grpc_codec`) each unpack their message into :class:`RawInput`
and :class:`RawOutput` values; :func:`build_request` then applies the same rules to both: exactly one
of the model's inputs, the shape and datatype the metadata advertises, known outputs, sane
parameters. Every mistake is a :class:`~service.http.v2.errors.V2Error` whose message says what was
expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.http.v2.errors import V2Error, invalid
from service.http.v2.facts import IMAGE, LOGITS, PIXELS, ModelFacts
from service.http.v2.tensors import (
    bytes_from_json,
    deserialize_bytes,
    fp32_from_buffer,
    fp32_from_json,
)
from service.selective import parse_min_score

Source = Literal["binary", "base64", "json", "grpc"]


@dataclass(frozen=True)
class RawInput:
    """One input tensor as a transport delivered it: binary ``raw`` bytes, or ``data`` values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    raw: bytes | memoryview | None = None
    data: Any = None  # JSON data (flat or nested), or gRPC typed contents (a list)
    from_grpc: bool = False


@dataclass(frozen=True)
class RawOutput:
    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputRequest:
    """One output to answer: ``classification`` > 0 turns it into top-K ``"score:index:label"`` strings."""

    name: str
    binary: bool = False
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A validated request: encoded ``images`` or preprocessed ``pixels`` (N, C, H, W), never both."""

    model: str
    version: int
    outputs: tuple[OutputRequest, ...]
    id: str | None = None
    images: tuple[bytes, ...] | None = None
    pixels: np.ndarray | None = None
    source: Source = "json"
    min_score: float | None = None  # parameters.min_score: this request's confidence threshold

    @property
    def batch_size(self) -> int:
        return len(self.images) if self.images is not None else int(self.pixels.shape[0])

    @property
    def wants_logits(self) -> bool:
        return any(o.name == LOGITS for o in self.outputs)


def _int_param(parameters: Mapping[str, Any], key: str, what: str) -> int | None:
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{what}: parameters.{key} must be an integer, not {value!r}")
    return value


def _bool_param(parameters: Mapping[str, Any], key: str, what: str) -> bool | None:
    value = parameters.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise invalid(f"{what}: parameters.{key} must be true or false, not {value!r}")


def _refuse_shared_memory(parameters: Mapping[str, Any], what: str) -> None:
    if any(str(k).startswith("shared_memory") for k in parameters):
        raise invalid(f"{what}: the shared-memory extension is not supported; send the data in the request")


def _batch(shape: tuple[int, ...], max_images: int, what: str) -> int:
    if not shape or shape[0] < 1:
        raise invalid(f"{what}: the first dimension is the batch and must be at least 1, got {list(shape)}")
    if shape[0] > max_images:
        raise V2Error(413, f"{what}: at most {max_images} items per request, got {shape[0]}", "too_many_images")
    return shape[0]


def _images(raw: RawInput, facts: ModelFacts, max_images: int) -> tuple[tuple[bytes, ...], Source]:
    what = f"input {IMAGE!r}"
    if raw.datatype != "BYTES":
        raise invalid(f"{what} must be BYTES (encoded image files), not {raw.datatype}")
    if len(raw.shape) != 1 and tuple(raw.shape[1:]) != (1,):  # [N, 1]: Triton's "one element per item",
        raise invalid(f"{what} must have shape [N] (one encoded file per item; [N, 1] is accepted too), "
                      f"got {list(raw.shape)}")  # what perf_analyzer sends for a batching model
    count = _batch(raw.shape, max_images, what)
    content_type = raw.parameters.get("content_type")
    if content_type not in (None, "base64", "str", "bytes"):
        raise invalid(f"{what}: parameters.content_type {content_type!r} is not supported; use 'base64'")
    if raw.raw is not None:
        images, source = deserialize_bytes(raw.raw, count, what), ("grpc" if raw.from_grpc else "binary")
    elif raw.from_grpc:
        images, source = [bytes(b) for b in raw.data], "grpc"
        if len(images) != count:
            raise invalid(f"{what}: bytes_contents has {len(images)} elements but the shape says {count}")
    else:
        b64 = content_type == "base64"
        images, source = bytes_from_json(raw.data, count, b64, what), ("base64" if b64 else "json")
    for index, image in enumerate(images):
        if not image:
            raise invalid(f"image {index}: empty")
    return tuple(images), source


def _pixels(raw: RawInput, facts: ModelFacts, max_images: int) -> tuple[np.ndarray, Source]:
    what = f"input {PIXELS!r}"
    expected = [-1, *facts.pixels_shape]
    if raw.datatype != "FP32":
        raise invalid(f"{what} must be FP32 with shape {expected}, not {raw.datatype}")
    if len(raw.shape) != 4 or tuple(raw.shape[1:]) != facts.pixels_shape:
        raise invalid(f"{what} must have shape {expected} (N, channels, height, width of model "
                      f"{facts.model!r}), got {list(raw.shape)}")
    _batch(raw.shape, max_images, what)
    if raw.raw is not None:
        pixels = fp32_from_buffer(raw.raw, raw.shape, what)
    else:
        pixels = fp32_from_json(raw.data, raw.shape, what)
    if not np.isfinite(pixels).all():
        raise invalid(f"{what}: values must be finite (found NaN or infinity)")
    return pixels, ("grpc" if raw.from_grpc else "binary" if raw.raw is not None else "json")


def _outputs(requested: Sequence[RawOutput] | None, facts: ModelFacts, binary_default: bool) -> tuple[OutputRequest, ...]:
    offered = facts.output_names()
    if not requested:  # V2: "If outputs is omitted, all outputs are returned"
        return tuple(OutputRequest(n, binary=binary_default) for n in offered)
    seen: set[str] = set()
    out = []
    for item in requested:
        what = f"output {item.name!r}"
        if item.name not in offered:
            raise invalid(f"unknown output {item.name!r}; model {facts.model!r} offers "
                          + ", ".join(repr(n) for n in offered))
        if item.name in seen:
            raise invalid(f"{what} is requested twice")
        seen.add(item.name)
        _refuse_shared_memory(item.parameters, what)
        binary = _bool_param(item.parameters, "binary_data", what)
        k = _int_param(item.parameters, "classification", what) or 0
        if k < 0:
            raise invalid(f"{what}: parameters.classification must be at least 1 (or 0 for none), got {k}")
        out.append(OutputRequest(item.name, binary=binary_default if binary is None else binary,
                                 classification=min(k, facts.num_labels)))
    return tuple(out)


def build_request(inputs: Sequence[RawInput], outputs: Sequence[RawOutput] | None, parameters: Mapping[str, Any],
                  facts: ModelFacts, *, request_id: str | None = None, max_images: int | None = None) -> InferRequest:
    """The validated request, or a V2Error saying what the model expected instead."""
    max_images = facts.max_images if max_images is None else max_images
    if not inputs:
        raise invalid(f"the request has no inputs; model {facts.model!r} takes {facts.describe_inputs()}")
    names = [i.name for i in inputs]
    offered = {t.name for t in facts.inputs()}
    for name in names:
        if name not in offered:
            raise invalid(f"unknown input {name!r}; model {facts.model!r} takes {facts.describe_inputs()}")
    if len(inputs) != 1:
        raise invalid(f"supply exactly one input, {facts.describe_inputs()}; got {', '.join(map(repr, names))}")
    raw = inputs[0]
    if any(not isinstance(d, int) or isinstance(d, bool) for d in raw.shape):
        raise invalid(f"input {raw.name!r}: shape must be a list of integers, got {list(raw.shape)}")
    if any(d < 0 for d in raw.shape) or math.prod(raw.shape) == 0:
        raise invalid(f"input {raw.name!r}: shape dimensions must be positive, got {list(raw.shape)}")
    _refuse_shared_memory(raw.parameters, f"input {raw.name!r}")
    if raw.raw is None and raw.data is None:
        raise invalid(f"input {raw.name!r} has no data: give 'data' or parameters.binary_data_size "
                      "with the bytes after the JSON header")
    binary_default = bool(_bool_param(parameters, "binary_data_output", "request"))
    try:
        min_score = parse_min_score(parameters.get("min_score"), text=True)  # gRPC has no float parameter
    except ValueError as exc:
        raise invalid(f"request: parameters.{exc}") from None
    requested = _outputs(outputs, facts, binary_default)
    if raw.name == IMAGE:
        images, source = _images(raw, facts, max_images)
        return InferRequest(facts.model, facts.version, requested, request_id, images=images, source=source,
                            min_score=min_score)
    pixels, source = _pixels(raw, facts, max_images)
    return InferRequest(facts.model, facts.version, requested, request_id, pixels=pixels, source=source,
                        min_score=min_score)
