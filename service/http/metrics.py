"""The service's Prometheus metrics (BentoML's registry: /metrics aggregates them across workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bentoml

from service.urls import is_url

if TYPE_CHECKING:
    from service.http.catalog import Catalog
    from service.http.served import ServedModel

PREPROCESS_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_preprocess_seconds", documentation="bytes -> tensor per image", labelnames=["model"])
INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_inference_seconds", documentation="ONNX Runtime time per batch", labelnames=["model"])
BATCH_SIZE = bentoml.metrics.Histogram(
    name="imgclf_batch_size", documentation="images per ONNX Runtime call", labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ERRORS = bentoml.metrics.Counter(name="imgclf_errors_total", documentation="client errors by kind", labelnames=["kind"])
RECEIVING = bentoml.metrics.Gauge(
    name="imgclf_receiving_bodies", documentation="request bodies being received now (the cap per worker is "
    "IMGCLF_MAX_RECEIVING)", multiprocess_mode="livesum")
MODEL_INFO = bentoml.metrics.Gauge(
    name="imgclf_model_info", documentation="loaded models and the provider they run on", labelnames=["model", "provider"])
# What is answered (service/http/monitor.py): top-1 labels, their scores, the answers under the threshold, drift.
PREDICTIONS = bentoml.metrics.Counter(
    name="imgclf_predictions_total", documentation="top-1 answers by label (IMGCLF_METRICS_MAX_LABELS label "
    "series per model and worker, the rest under label=other)", labelnames=["model", "label"])
TOP1_SCORE = bentoml.metrics.Histogram(
    name="imgclf_top1_score", documentation="calibrated top-1 score of each answer", labelnames=["model"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0))
NOT_CONFIDENT = bentoml.metrics.Counter(
    name="imgclf_not_confident_total", documentation="answers whose top-1 score is under the threshold",
    labelnames=["model"])
DRIFT_INDEX = bentoml.metrics.Gauge(
    name="imgclf_drift_index", documentation="population stability index of this worker's window against the "
    "validation reference; kind: class or score", labelnames=["model", "kind"], multiprocess_mode="liveall")
SAMPLES = bentoml.metrics.Counter(
    name="imgclf_samples_total", documentation="sampled images by outcome: kept, duplicate, near_cap, cap "
    "(nothing written past the disk cap), busy, error", labelnames=["outcome"])

CACHE = bentoml.metrics.Counter(
    name="imgclf_cache_total", documentation="response cache lookups and evictions by outcome: hit, miss, "
    "eviction (IMGCLF_CACHE_ENTRIES, IMGCLF_CACHE_MAX_BYTES)", labelnames=["outcome"])

# Rollouts (service/http/rollout.py): per model name, version and role (production, canary, shadow), so a
# canary or shadow candidate can be judged against production here or in Prometheus.
_ROLE = ["model", "version", "role"]
ROLLOUT_ANSWERS = bentoml.metrics.Counter(
    name="imgclf_rollout_answers", documentation="images answered, by version and role", labelnames=_ROLE)
ROLLOUT_ABSTAINED = bentoml.metrics.Counter(
    name="imgclf_rollout_abstained", documentation="answers whose top-1 score is under the model's threshold",
    labelnames=_ROLE)
ROLLOUT_ERRORS = bentoml.metrics.Counter(
    name="imgclf_rollout_errors", documentation="images a version failed to score", labelnames=_ROLE)
ROLLOUT_TOP1 = bentoml.metrics.Histogram(
    name="imgclf_rollout_top1_score", documentation="calibrated top-1 score of each answer", labelnames=_ROLE,
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
ROLLOUT_SECONDS = bentoml.metrics.Histogram(
    name="imgclf_rollout_seconds", documentation="preprocessing + inference of one image", labelnames=_ROLE,
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))
_SHADOW = ["model", "version"]
SHADOW_COMPARED = bentoml.metrics.Counter(
    name="imgclf_shadow_compared", documentation="shadow answers compared with production's", labelnames=_SHADOW)
SHADOW_AGREED = bentoml.metrics.Counter(
    name="imgclf_shadow_agreed", documentation="shadow answers with production's top-1 class", labelnames=_SHADOW)
SHADOW_DROPPED = bentoml.metrics.Counter(
    name="imgclf_shadow_dropped", documentation="images sampled for the shadow but dropped: its queue was full "
    "(IMGCLF_SHADOW_QUEUE)", labelnames=_SHADOW)
STORE_REACHABLE = bentoml.metrics.Gauge(
    name="imgclf_store_reachable", documentation="1 when the last read of the model repository's object store "
    "worked, 0 while replicas serve from their cache (no series for a local repository)",
    multiprocess_mode="livemin")
SERVED_VERSION = bentoml.metrics.Gauge(
    name="imgclf_served_version", documentation="the production version each model is served at, and the "
    "candidate of a rollout (role canary or shadow)", labelnames=["model", "role"], multiprocess_mode="livemin")


def count_cache(outcome: str) -> None:
    CACHE.labels(outcome=outcome).inc()


def count_error(kind: str) -> None:
    ERRORS.labels(kind=kind).inc()


def count_receiving(bodies: int) -> None:
    RECEIVING.set(bodies)


def count_sample(outcome: str) -> None:
    SAMPLES.labels(outcome=outcome).inc()


def observe_batch(served: ServedModel, size: int, seconds: float) -> None:
    BATCH_SIZE.labels(model=served.key).observe(size)
    INFERENCE_SECONDS.labels(model=served.key).observe(seconds)


def observe_swap(added: list[ServedModel], retired: list[ServedModel]) -> None:
    """The models a load or reload brought in and the ones it retired."""
    for served in added:
        MODEL_INFO.labels(model=served.key, provider=served.provider).set(1)
    for served in retired:
        MODEL_INFO.labels(model=served.key, provider=served.provider).set(0)


def observe_catalog(catalog: Catalog) -> None:
    """The versions served (production, and a rollout's candidate; 0: none) and whether the store answered."""
    for name, version in catalog.production.items():
        SERVED_VERSION.labels(model=name, role="production").set(version)
        trial = catalog.rollouts.get(name)
        for mode in ("canary", "shadow"):
            SERVED_VERSION.labels(model=name, role=mode).set(trial.version if trial and trial.mode == mode else 0)
    if catalog.repo is not None and is_url(catalog.repo.location):
        STORE_REACHABLE.set(0 if catalog.repo.unreachable else 1)
