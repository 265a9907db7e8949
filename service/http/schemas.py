"""HTTP response bodies: the public contract of the service, shown in /docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.preprocessing.spec import PreprocessSpec


class PredictionOut(BaseModel):
    label: str
    index: int = Field(description="position in the model's output")
    score: float = Field(description="calibrated probability (softmax of logits / temperature)")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[PredictionOut]
    timing_ms: dict[str, float] = Field(description="milliseconds: preprocess (decode, resize, normalise) and total")


class ErrorOut(BaseModel):
    kind: str = Field(description="machine-readable error kind, e.g. invalid_image, unsupported_format")
    message: str
    status: int


class BatchItem(BaseModel):
    index: int = Field(description="position of the image in the request")
    predictions: list[PredictionOut] | None = None
    error: ErrorOut | None = None


class BatchResponse(BaseModel):
    model: str
    version: int
    results: list[BatchItem]
    timing_ms: dict[str, float]


class ModelInfo(BaseModel):
    name: str
    version: int
    labels: int
    preprocessing: PreprocessSpec
    provider: str
    load_seconds: float
    default: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    not_loaded: dict[str, str] = Field(default_factory=dict, description="name:version -> why this worker "
                                       "could not load it (it reports not ready on /readyz meanwhile)")


class ServedVersion(BaseModel):
    name: str
    version: int


class VersionChange(BaseModel):
    """Serialised with ``by_alias=True``: the JSON field is ``from``."""

    model_config = ConfigDict(populate_by_name=True)

    name: str
    from_: int | None = Field(alias="from", description="version served before; null for a model new to the service")
    to: int = Field(description="version served now")


class ReloadResponse(BaseModel):
    """POST /admin/reload (200): what the worker that took the request serves now.

    Other workers converge by watching the repository's aliases (IMGCLF_POLL_SECONDS).
    """

    models: list[ServedVersion]
    changed: list[VersionChange] = Field(description="models whose version this reload changed; empty: none")
