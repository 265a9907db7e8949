"""The retrain-and-deploy pipeline's configuration: one validated object, flags override the file.

Resolution order, lowest first: field defaults < the YAML file (``--config``) < command-line
flags. ``train`` is a training-config fragment (the keys of ``imgclf train --config``); it is
resolved with the architecture's recipe exactly as ``imgclf train`` resolves it, except that
``data.source`` belongs to the pipeline (the validated training images) and ``train.nproc`` (the
processes to train with, as ``imgclf train --nproc``) is a launch setting, not a hyperparameter. Secrets (the admin
token) never live here: they come from a flag or ``IMGCLF_ADMIN_TOKEN`` and are never recorded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from service.manifest import validate_name
from training.config import (
    ConfigError,
    TrainConfig,
    _Section,
    deep_merge,
    format_validation_error,
    read_yaml,
    resolve_config,
)


class ValidationPolicy(_Section):
    """What the data check accepts. Every count is written to the run record either way."""

    duplicates: Literal["drop", "fail"] = Field(
        default="drop", description="training images whose bytes are also in the held-out set: leave them out "
        "of training (drop) or stop (fail)")
    conflicting_labels: Literal["drop", "fail"] = Field(
        default="drop", description="the same bytes under two classes of the training data: leave every copy "
        "out (drop) or stop (fail)")
    max_unreadable_fraction: float = Field(default=0.05, ge=0, le=1, description="stop above this share of "
                                           "unreadable training images")
    min_train_per_class: int = Field(default=2, ge=1, description="readable training images each class needs")
    min_holdout_per_class: int = Field(default=1, ge=1, description="held-out images each class needs")


class GateConfig(_Section):
    """When a candidate may replace production (both measured on the same held-out set)."""

    top1_tolerance: float = Field(default=0.0, ge=0, le=1, description="candidate top-1 may be at most this "
                                  "much below production's (0.01 = 1 point)")
    max_class_recall_drop: float = Field(default=0.05, ge=0, le=1, description="no class's recall may fall by "
                                         "more than this")
    min_top1: float | None = Field(default=None, ge=0, le=1, description="absolute floor for the candidate's "
                                   "held-out top-1; applies also when there is no production to compare with")


class ExportSettings(_Section):
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    max_top1_drop: float = Field(default=0.01, ge=0, le=1, description="int8/fp16: refuse a variant losing "
                                 "more top-1 than this against fp32")
    target_precision: float = Field(default=0.99, gt=0, le=1, description="the confidence threshold is chosen "
                                    "on the validation set for this precision of the confident answers")


def _http_urls(urls: list[str], what: str) -> list[str]:
    """Base URLs, checked for a scheme, without a trailing slash."""
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{what} {url!r} must start with http:// or https://")
    return [u.rstrip("/") for u in urls]


class DeployConfig(_Section):
    """How running services are told to reload and how the switch is verified."""

    service_urls: list[str] = Field(default_factory=list, description="base URLs of the services to reload")
    timeout_s: float = Field(default=60.0, gt=0, description="per service: deadline for reload and verification")
    consecutive: int = Field(default=5, ge=1, description="answers in a row (GET /models and a smoke /classify) "
                             "that must all show the new version: with several workers each may answer")
    poll_interval_s: float = Field(default=0.2, ge=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    smoke_score_tolerance: float = Field(default=5e-3, gt=0, description="the served score of the smoke image "
                                         "may differ this much from the one measured at evaluation (same file, "
                                         "same preprocessing: 1e-6 on a CPU; raise it for CUDA services, TF32)")

    @field_validator("service_urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        return _http_urls(urls, "service URL")


class RolloutConfig(_Section):
    """A canary or shadow rollout between register and promote, decided on what the replicas measure.

    The candidate must earn its promotion on live traffic: ``min_answers`` candidate answers, summed over
    every replica's ``/metrics``, then every threshold below must hold; otherwise the rollout is ended
    and the run is rolled back with the reason.
    """

    mode: Literal["canary", "shadow"] = Field(
        default="shadow", description="shadow: production answers, the candidate scores a sample off the request "
        "path and is compared with it; canary: the candidate answers a share of the requests itself")
    weight: float = Field(default=0.1, gt=0, le=1, description="share of the requests that name no version")
    replicas: list[str] = Field(default_factory=list, validate_default=True, description="base URL of every "
                                "serving replica (its /metrics is read; all of them, or the counts are partial)")
    min_answers: int = Field(default=200, ge=1, description="candidate answers (shadow: compared with "
                             "production; canary: answered) over all replicas before deciding")
    timeout_s: float = Field(default=600.0, gt=0, description="no min_answers by then: rolled back")
    poll_s: float = Field(default=1.0, gt=0, description="seconds between reads of the replicas' /metrics")
    request_timeout_s: float = Field(default=5.0, gt=0, description="per /metrics request")
    min_agreement: float = Field(default=0.95, ge=0, le=1, description="shadow only: share of compared answers "
                                 "with production's top-1 class")
    max_abstention_increase: float = Field(default=0.05, ge=0, le=1, description="candidate abstention rate "
                                           "minus production's (answers under each model's threshold)")
    max_latency_ratio: float = Field(default=2.0, gt=0, description="candidate p99 seconds per image / "
                                     "production's")
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="candidate images failed / scored")

    @field_validator("replicas")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("list the base URL of every serving replica (e.g. http://10.0.0.5:3000): the "
                             "rollout is decided on their /metrics")
        return _http_urls(urls, "replica URL")

    @model_validator(mode="after")
    def _weight(self) -> RolloutConfig:
        if self.mode == "canary" and self.weight >= 1:
            raise ValueError("a canary at weight 1 leaves production no answers to compare with: use a weight "
                             "under 1 (or mode: shadow, which may sample every request)")
        return self


class PipelineConfig(_Section):
    name: str | None = Field(default=None, description="model name in the repository")
    data: Path | None = Field(default=None, description="ImageFolder tree of training images (class folders, "
                              "optionally under train/ and val/)")
    holdout: Path | None = Field(default=None, description="ImageFolder tree of the fixed held-out images")
    more_data: list[Path] = Field(default_factory=list, description="further ImageFolder trees merged into the "
                                  "training data, e.g. a corrected `imgclf samples export` tree (folders named "
                                  "_* are left out); the CLI's second and later --data")
    repo: str | None = Field(default=None, description="model repository: a folder or a URL such as s3://bucket/prefix "
                             "(default $IMGCLF_MODEL_REPO or models/)")
    work_dir: Path | None = Field(default=None, description="where training runs go (default "
                                  "<repo>/.pipeline/<name>/runs; warm starts read production's checkpoint there)")
    init: Literal["pretrained", "production"] = Field(
        default="pretrained", description="pretrained: the training config's initial weights (ImageNet when "
        "train.model.pretrained, random otherwise); production: warm start from production's checkpoint")
    allow_label_change: bool = Field(default=False, description="accept a label set that differs from "
                                     "production's: the candidate is then a new model, not compared with production")
    train: dict[str, Any] = Field(default_factory=dict, description="training config fragment (imgclf train keys), "
                                  "plus nproc: training processes on this machine (default 1)")
    validation: ValidationPolicy = ValidationPolicy()
    gate: GateConfig = GateConfig()
    export: ExportSettings = ExportSettings()
    deploy: DeployConfig = DeployConfig()
    rollout: RolloutConfig | None = Field(default=None, description="a canary or shadow rollout before "
                                          "promotion; none: register, then promote at once")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        return None if name is None else validate_name(name)

    @model_validator(mode="after")
    def _check_train(self) -> PipelineConfig:
        data = self.train.get("data")
        if isinstance(data, dict) and "source" in data:
            raise ValueError("train.data.source is set by the pipeline (--data); remove it")
        nproc = self.train.get("nproc", 1)
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"train.nproc must be a whole number of processes, 1 or more, not {nproc!r}")
        arch = self.train_config(Path("validated-later.csv")).model.arch  # a bad key or value fails here
        from training.models import list_models  # torch: only a run validates architectures

        if arch not in list_models():
            raise ValueError(f"unknown train.model.arch {arch!r}; available: {', '.join(list_models())}")
        return self

    @property
    def nproc(self) -> int:
        """``train.nproc``: how many processes train (the same model as one: left out of the fingerprint)."""
        return int(self.train.get("nproc", 1))

    def train_config(self, source: Path) -> TrainConfig:
        """The resolved training config (defaults < recipe < ``train``, less ``nproc``) for a data source."""
        fragment = {k: v for k, v in self.train.items() if k != "nproc"}
        return resolve_config(None, deep_merge(fragment, {"data": {"source": str(source)}}))

    def require(self) -> tuple[str, Path, Path]:
        """name, data and holdout, which a run needs and the file or the flags must give."""
        missing = [key for key in ("name", "data", "holdout") if getattr(self, key) is None]
        if missing:
            raise ConfigError("the pipeline needs " + ", ".join(f"--{k}" for k in missing)
                              + " (or the same keys in --config)")
        assert self.name is not None and self.data is not None and self.holdout is not None
        return self.name, self.data, self.holdout

    def fingerprint(self) -> str:
        """What decides the candidate model: training config, init, data policy, export.

        Not the paths (the data fingerprint covers the images), not the gate, deploy or rollout settings
        (they decide what happens to a model, not which model it is).
        """
        train = self.train_config(Path("-")).model_dump(mode="json")
        train["data"].pop("source")
        payload = {"train": train, "init": self.init, "allow_label_change": self.allow_label_change,
                   "validation": self.validation.model_dump(mode="json"),
                   "export": self.export.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_pipeline_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults < file < overrides, validated once. Raises ConfigError naming the key."""
    merged = deep_merge(read_yaml(file) if file else {}, overrides or {})
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, what="pipeline config")) from exc
