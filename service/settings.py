"""One settings object, built once from ``IMGCLF_*`` variables (or CLI flags) and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

MULTI_WORKER_POLL_SECONDS = 2.0


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repo: Path = Field(default=Path("models"), description="the model repository")
    models: list[str] = Field(default_factory=list, description="NAME[:VERSION] to load, comma-separated; "
                              "default: the production version of every model")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="cuda without a working CUDA "
                                                   "provider is a startup error")
    workers: int = Field(default=1, ge=1, description="worker processes, each with its own sessions")
    intra_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime threads per session; 0: cores / workers")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="largest image file accepted")
    max_pixels: int = Field(default=50_000_000, gt=0, description="largest decoded image accepted")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="largest /classify_batch body")
    max_batch_images: int = Field(default=32, ge=1, description="images per /classify_batch request")
    max_batch_size: int = Field(default=32, ge=1, description="images per ONNX Runtime call")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="how long a batch waits for more images")
    max_concurrency: int = Field(default=64, ge=1, description="requests in flight per worker, all routes but "
                                 "health and metrics, before BentoML's bare 429 (a backstop above IMGCLF_MAX_QUEUE)")
    max_queue: int = Field(default=32, ge=1, description="/classify and /classify_batch requests in flight per "
                           "worker; more get 503 with Retry-After at once (service/admission.py)")
    latency_budget_ms: float = Field(default=1000.0, ge=0, description="refuse (503, Retry-After) a request whose "
                                     "estimated latency, in flight x measured service time, is over this; 0: off")
    timeout_s: float = Field(default=30.0, gt=0, description="request timeout (504 past it)")
    max_archive_bytes: int = Field(default=256 * 1024 * 1024, gt=0, description="largest /batch/submit upload")
    max_archive_entries: int = Field(default=10_000, gt=0, description="files in one /batch/submit archive")
    max_archive_expanded_bytes: int = Field(default=1024 * 1024 * 1024, gt=0,
                                            description="uncompressed bytes of one archive")
    max_archive_ratio: float = Field(default=100.0, gt=1, description="uncompressed / compressed size above which "
                                     "an archive or entry is refused as a bomb")
    admin_token: SecretStr | None = Field(default=None, description="bearer token for POST /admin/reload; "
                                          "unset: the admin endpoints are off (404)")
    poll_seconds: float = Field(default=0.0, ge=0, description="re-read the aliases every N seconds and reload "
                                "when production changed; 0: off (2 s when IMGCLF_WORKERS > 1)")

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _blank_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _queue_below_backstop(self) -> Settings:
        """Overload must meet admission control (503 + Retry-After), not BentoML's 429 that also locks out
        /admin/reload and /models: leave BentoML's limit headroom above the queue."""
        if self.max_queue >= self.max_concurrency:
            raise ValueError(f"IMGCLF_MAX_QUEUE ({self.max_queue}) must be below IMGCLF_MAX_CONCURRENCY "
                             f"({self.max_concurrency})")
        return self

    @property
    def watch_seconds(self) -> float:
        """How often each worker checks the aliases. With several workers an admin reload reaches only
        one of them, so the others must watch to converge: polling is on by default then."""
        return self.poll_seconds or (MULTI_WORKER_POLL_SECONDS if self.workers > 1 else 0.0)

    @property
    def threads_per_session(self) -> int:
        return self.intra_op_threads or max(1, (os.cpu_count() or 1) // self.workers)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in cls.model_fields:
            key = f"IMGCLF_{field.upper()}"
            if key in env:
                values[field] = env[key]
        values |= {k: v for k, v in overrides.items() if v is not None}
        return cls.model_validate(values)
