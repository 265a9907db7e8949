"""The service's Prometheus metrics (BentoML's registry: /metrics aggregates them across workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bentoml

if TYPE_CHECKING:
    from service.http.served import ServedModel

PREPROCESS_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_preprocess_seconds", documentation="bytes -> tensor per image", labelnames=["model"])
INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_inference_seconds", documentation="ONNX Runtime time per batch", labelnames=["model"])
BATCH_SIZE = bentoml.metrics.Histogram(
    name="imgclf_batch_size", documentation="images per ONNX Runtime call", labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ERRORS = bentoml.metrics.Counter(name="imgclf_errors_total", documentation="client errors by kind", labelnames=["kind"])
MODEL_INFO = bentoml.metrics.Gauge(
    name="imgclf_model_info", documentation="loaded models and the provider they run on", labelnames=["model", "provider"])


def count_error(kind: str) -> None:
    ERRORS.labels(kind=kind).inc()


def observe_batch(served: ServedModel, size: int, seconds: float) -> None:
    BATCH_SIZE.labels(model=served.key).observe(size)
    INFERENCE_SECONDS.labels(model=served.key).observe(seconds)


def observe_swap(added: list[ServedModel], retired: list[ServedModel]) -> None:
    """The models a load or reload brought in and the ones it retired."""
    for served in added:
        MODEL_INFO.labels(model=served.key, provider=served.provider).set(1)
    for served in retired:
        MODEL_INFO.labels(model=served.key, provider=served.provider).set(0)
