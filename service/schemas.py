"""HTTP response bodies: the public contract of the service, shown in /docs."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.preprocessing import PreprocessSpec


class PredictionOut(BaseModel):
    label: str
    index: int = Field(description="position in the model's output")
    score: float = Field(description="calibrated probability (softmax of logits / temperature)")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[PredictionOut]
    timing_ms: dict[str, float] = Field(description="decode_and_preprocess, inference, total")


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
