"""What a model offers over V2, taken from its manifest, and the metadata documents built from it.

One :class:`ModelFacts` feeds the request validation, the model metadata (``GET /v2/models/{m}``), the
Triton-style model config that perf_analyzer insists on (``GET /v2/models/{m}/config``) and the gRPC
equivalents, so what the server advertises is exactly what it accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

from service.manifest import Manifest

PLATFORM = "onnx_onnxv1"  # "An ONNX model encoded for ONNX Runtime" in KServe's required_api.md
BACKEND = "onnxruntime"
SERVER_NAME = "imgclf"
# "statistics": perf_analyzer asks for /stats (both transports) only when the server lists it.
EXTENSIONS = ("binary_tensor_data", "classification", "statistics", "model_repository")

IMAGE = "image"  # BYTES [-1]: encoded image files, preprocessed as /classify does
PIXELS = "pixels"  # FP32 [-1, C, H, W]: tensors the client preprocessed itself
# One-input views of every model, named ``<model>.<view>``, for clients that expect exactly one input and
# one output and a batching config (Triton's image_client.py, grpc_image_client.py, ensemble_image_client.py).
VIEWS = (PIXELS, IMAGE)
PROBABILITIES = "probabilities"  # FP32 [-1, K], calibrated with the manifest's temperature
LOGITS = "logits"  # FP32 [-1, K], the raw model output

# V2 datatype -> Triton model-config data_type (perf_analyzer reads the config).
CONFIG_DATA_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as metadata describes it; -1 marks a variable dimension (the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelFacts:
    """One served model version as V2 sees it.

    ``max_images`` is the most items one request may carry (a larger request is a 413);
    ``batch_size`` and ``batch_wait_ms`` describe the server-side batching queue that V2 items share
    with /classify (the config's ``dynamic_batching``).
    """

    name: str
    version: int
    labels: tuple[str, ...]
    channels: int
    input_size: tuple[int, int]
    preprocessing: dict[str, Any]
    architecture: str = ""
    temperature: float = 1.0
    versions: tuple[int, ...] = ()
    max_images: int = 32
    batch_size: int = 32
    batch_wait_ms: float = 2.0
    offers_logits: bool = True
    extra_parameters: dict[str, Any] = field(default_factory=dict)
    view: str = ""  # "": both inputs, both outputs, no batching config; or one of VIEWS

    @property
    def model(self) -> str:
        """The name V2 clients use: the model's, or ``<model>.<view>``."""
        return f"{self.name}.{self.view}" if self.view else self.name

    @classmethod
    def from_manifest(cls, manifest: Manifest, *, versions: list[int] | None = None, max_images: int = 32,
                      batch_size: int = 32, batch_wait_ms: float = 2.0, offers_logits: bool = True) -> ModelFacts:
        """``versions``: the versions of this model that are loaded now (default: just this one)."""
        spec = manifest.preprocessing
        return cls(
            name=manifest.name, version=manifest.version, labels=tuple(manifest.labels),
            channels=spec.channels, input_size=tuple(spec.input_size), preprocessing=spec.model_dump(mode="json"),
            architecture=manifest.architecture, temperature=manifest.temperature,
            versions=tuple(sorted(versions or [manifest.version])), max_images=max_images,
            batch_size=batch_size, batch_wait_ms=batch_wait_ms, offers_logits=offers_logits,
        )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def pixels_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (self.channels, *self.input_size)

    def inputs(self) -> list[TensorSpec]:
        """A request supplies exactly one of these."""
        image = TensorSpec(IMAGE, "BYTES", (-1, 1) if self.view else (-1,))  # a batching view: one file per item
        pixels = TensorSpec(PIXELS, "FP32", (-1, *self.pixels_shape))
        return {"": [image, pixels], IMAGE: [image], PIXELS: [pixels]}[self.view]

    def outputs(self) -> list[TensorSpec]:
        names = [PROBABILITIES, LOGITS] if self.offers_logits and not self.view else [PROBABILITIES]
        return [TensorSpec(n, "FP32", (-1, self.num_labels)) for n in names]

    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs()]

    def describe_inputs(self) -> str:
        """For error messages: what the model accepts."""
        return " or ".join(f"{t.name!r} ({t.datatype} {list(t.shape)})" for t in self.inputs())


def model_metadata(facts: ModelFacts) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]``: required_api.md's shape plus ``parameters``.

    V2 parameter values are scalars, so the preprocessing spec travels as a JSON string.
    """
    parameters: dict[str, Any] = {
        "labels": facts.num_labels, "architecture": facts.architecture, "temperature": facts.temperature,
        "preprocessing": json.dumps(facts.preprocessing, sort_keys=True, separators=(",", ":")),
        "max_images": facts.max_images, **facts.extra_parameters,
    }
    return {
        "name": facts.model, "versions": [str(v) for v in facts.versions], "platform": PLATFORM,
        "inputs": [t.as_dict() for t in facts.inputs()], "outputs": [t.as_dict() for t in facts.outputs()],
        "parameters": parameters,
    }


def model_config(facts: ModelFacts) -> dict[str, Any]:
    """Triton's ``GET /v2/models/{m}/config``, with values true for this model.

    perf_analyzer stops without it. ``max_batch_size`` is 0, Triton's "the client gives the full shape,
    batch dimension included", which is what the metadata's ``[-1, ...]`` says. A positive value makes
    perf_analyzer strip the first dim and refuse the empty per-item shape left of ``image`` [-1]
    ("unable to set shape for the input"; run against this codec). So perf_analyzer sends N images per
    request with ``--shape image:N`` (``-b`` stays 1) and the server batches across requests, as
    ``dynamic_batching`` says. Both inputs are ``optional``: an input-data file that names only
    ``image`` makes perf_analyzer send only ``image`` (a request carries exactly one of them).
    """
    if facts.view:
        return _view_config(facts)
    inputs = [
        {"name": IMAGE, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [-1], "optional": True},
        {"name": PIXELS, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [-1, *facts.pixels_shape],
         "optional": True},
    ]
    outputs = [{"name": t.name, "data_type": CONFIG_DATA_TYPES[t.datatype], "dims": list(t.shape)}
               for t in facts.outputs()]
    return {
        "name": facts.name, "platform": PLATFORM, "backend": BACKEND, "max_batch_size": 0,
        "input": inputs, "output": outputs,
        "dynamic_batching": {"preferred_batch_size": [facts.batch_size],
                             "max_queue_delay_microseconds": round(facts.batch_wait_ms * 1000)},
    }


def _view_config(facts: ModelFacts) -> dict[str, Any]:
    """A one-input view's config, as Triton publishes a batching model: ``max_batch_size`` > 0 and per-item
    ``dims`` (the batch dimension left out); ``format`` is what Triton's image clients read."""
    (tensor,) = facts.inputs()
    fmt = "FORMAT_NCHW" if tensor.name == PIXELS else "FORMAT_NONE"
    return {
        "name": facts.model, "platform": PLATFORM, "backend": BACKEND, "max_batch_size": facts.max_images,
        "input": [{"name": tensor.name, "data_type": CONFIG_DATA_TYPES[tensor.datatype], "format": fmt,
                   "dims": list(tensor.shape[1:])}],
        "output": [{"name": t.name, "data_type": CONFIG_DATA_TYPES[t.datatype], "dims": list(t.shape[1:])}
                   for t in facts.outputs()],
        "dynamic_batching": {"preferred_batch_size": [facts.batch_size],
                             "max_queue_delay_microseconds": round(facts.batch_wait_ms * 1000)},
    }


def server_version() -> str:
    try:
        return importlib_metadata.version("imgclf")
    except importlib_metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def server_metadata(extensions: tuple[str, ...] = EXTENSIONS) -> dict[str, Any]:
    """``GET /v2``. perf_analyzer indexes ``extensions`` directly, so the key is always there."""
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(extensions)}
