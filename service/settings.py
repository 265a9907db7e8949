"""One settings object, built once from ``IMGCLF_*`` variables (or CLI flags) and passed down."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from service.repository import Repository, open_repository
from service.urls import is_url

MULTI_WORKER_POLL_SECONDS = 2.0
# A folder (a Path is taken) or a URL; kept as text: Path("s3://b/p") would lose a slash.
RepoLocation = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repo: RepoLocation = Field(default="models", description="the model repository: a folder, or an "
                                     "fsspec URL such as s3://bucket/prefix (pip install 'imgclf[s3]'), read "
                                     "through a verified local cache")
    repo_cache: Path | None = Field(default=None, description="the local cache of a repository at a URL; "
                                    "unset: ~/.cache/imgclf/repositories/<hash of the URL>")
    store_writes: Literal["auto", "conditional", "lock"] = Field(
        default="auto", description="how writers to a repository at a URL exclude each other: conditional puts, "
        "or a lock object for stores without them; auto: probe the store (service/objectstore.py)")
    models: list[str] = Field(default_factory=list, description="NAME[:VERSION] to load, comma-separated; "
                              "default: the production version of every model")
    default_model: str | None = Field(default=None, description="the model a request without `model` gets; "
                                      "unset: the one model served, and a 400 listing them when there are several")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="cuda without a working CUDA "
                                                   "provider is a startup error")
    precision: Literal["auto", "fp32"] = Field(default="auto", description="auto: on CPUs, a version's int8 "
                                               "variant where export marked it preferred (it passed the accuracy "
                                               "check); fp32: always the fp32 file")
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per log "
                                                "line (time, level, logger, message, trace ids), for log shippers; "
                                                "the container image sets it")
    workers: int = Field(default=0, ge=0, description="worker processes, each with its own sessions; 0: one per "
                         "usable core (the fastest configuration measured: benchmarks/NOTES.md)")
    intra_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime threads per session; 0: cores / workers")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="largest image file accepted")
    max_pixels: int = Field(default=50_000_000, gt=0, description="largest decoded image accepted")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="largest /classify_batch body")
    max_batch_images: int = Field(default=32, ge=1, description="images per /classify_batch request")
    max_batch_size: int = Field(default=32, ge=1, description="images per ONNX Runtime call")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="how long a batch waits for more images")
    max_concurrency: int = Field(default=1024, ge=1, description="requests in flight per worker, all routes but "
                                 "health and metrics, before BentoML's bare 429: a backstop far above IMGCLF_MAX_QUEUE "
                                 "and IMGCLF_MAX_RECEIVING, whose answers (503/408 with a reason) come first")
    max_queue: int = Field(default=32, ge=1, description="/classify and /classify_batch requests in flight per "
                           "worker; more get 503 with Retry-After at once (service/http/admission.py)")
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
    upload_grace_s: float = Field(default=5.0, ge=0, description="seconds an upload may take before "
                                  "IMGCLF_MIN_UPLOAD_RATE applies")
    min_upload_rate: int = Field(default=10 * 1024, ge=0, description="bytes/s an upload must average after the "
                                 "grace period, else 408 and the connection is closed; 0: off")
    max_receiving: int = Field(default=128, ge=1, description="request bodies received at once per worker (memory "
                               "<= this x the upload limit); past it a new upload takes the place of one that "
                               "has fallen behind IMGCLF_MIN_UPLOAD_RATE for a second, else gets 503 + Retry-After")
    keepalive_s: int = Field(default=5, ge=1, description="idle keep-alive connections are closed after this")
    max_batch_jobs: int = Field(default=2, ge=1, description="/batch jobs queued or running per worker; more "
                                "get 503 with Retry-After")
    poll_seconds: float = Field(default=0.0, ge=0, description="re-read the aliases every N seconds and reload "
                                "when production or a rollout changed; 0: off (2 s when IMGCLF_WORKERS > 1 "
                                "or the repository is a URL)")
    shadow_queue: int = Field(default=64, ge=1, description="images waiting to be scored by a shadow candidate, "
                              "per worker; a sampled image that finds it full is dropped (counted), never waited for")
    grpc_port: int | None = Field(default=None, ge=1, le=65535, description="serve the Open Inference Protocol "
                                  "(KServe V2) over gRPC on this port, in every worker (SO_REUSEPORT); unset: off")
    grpc_host: str = Field(default="0.0.0.0", description="address the V2 gRPC server listens on")
    cache_entries: int = Field(default=4096, ge=0, description="response cache: logits rows kept per worker, by "
                               "model version and image sha256 (a repeated image skips decoding and inference); 0: off")
    cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0, description="response cache: bytes of logits "
                                 "kept per worker; least recently used rows go first past it or past "
                                 "IMGCLF_CACHE_ENTRIES")
    # --- trust, drift and sampling (docs/trust-and-retrain.md) ---
    abstain: bool = Field(default=False, description="1: an answer whose top-1 score is under the threshold "
                          "comes back with label null (its predictions kept, abstained: true)")
    metrics_max_labels: int = Field(default=100, ge=0, description="label series of imgclf_predictions_total "
                                    "per model and worker; answers with further labels count under label=other")
    drift_window: int = Field(default=1000, ge=10, description="answers per model each worker compares with "
                              "the validation reference; not_enough_data until it is full")
    drift_class_psi: float = Field(default=0.25, gt=0, description="population stability index of the "
                                   "answered classes above which the verdict is drift")
    drift_score_psi: float = Field(default=0.25, gt=0, description="population stability index of the top-1 "
                                   "scores above which the verdict is drift")
    sample_dir: Path | None = Field(default=None, description="keep sampled requests' images here (exact bytes "
                                    "+ a JSON line each); unset: off")
    sample_rate: float = Field(default=0.0, ge=0, le=1, description="share of answered images to keep")
    sample_max_bytes: int = Field(default=1024 * 1024 * 1024, gt=0, description="disk cap of IMGCLF_SAMPLE_DIR; "
                                  "near it only non-confident answers are kept, at it none (counted)")

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("admin_token", "grpc_port", "sample_dir", "default_model", "repo_cache", mode="before")
    @classmethod
    def _blank_is_off(cls, value: object) -> object:
        """A variable set but empty means unset, as a shell user expects of an optional setting."""
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
        one of them, so the others must watch to converge; a repository in object storage is shared by
        replicas: polling is on by default for both."""
        shared = self.worker_count > 1 or self.repo_is_url
        return self.poll_seconds or (MULTI_WORKER_POLL_SECONDS if shared else 0.0)

    def repository(self) -> Repository:
        """The model repository these settings name: a folder, or a URL read through its cache."""
        return open_repository(self.model_repo, self.repo_cache, self.store_writes)

    @property
    def repo_is_url(self) -> bool:
        """Whether the repository is in object storage (replicas elsewhere change it: watch it)."""
        return is_url(self.model_repo)

    @property
    def threads_per_session(self) -> int:
        return self.intra_op_threads or max(1, usable_cores() // self.worker_count)

    @property
    def worker_count(self) -> int:
        """IMGCLF_WORKERS, or one worker per usable core when it is 0 (the default)."""
        return self.workers or usable_cores()

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, only: Collection[str] | None = None, **overrides: object
    ) -> Settings:
        """Settings from ``IMGCLF_*`` variables, then ``overrides`` (CLI flags; None means not given).

        ``only`` names the fields a caller uses: just their variables are read and the rest keep their
        defaults, so a command that needs the repository path is not stopped by a bad serving variable.
        Raises pydantic's ValidationError; :func:`format_settings_error` words it for people.
        """
        env = os.environ if env is None else env
        fields = cls.model_fields if only is None else only
        unknown = sorted(set(fields) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"not settings: {unknown}")
        values: dict[str, object] = {}
        for field in fields:
            key = env_name(field)
            if key in env:
                values[field] = env[key]
        values |= {k: v for k, v in overrides.items() if v is not None}
        return cls.model_validate(values)


def env_name(field: str) -> str:
    """The variable that sets a field: ``max_queue`` -> ``IMGCLF_MAX_QUEUE``."""
    return f"IMGCLF_{field.upper()}"


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))  # pydantic's Field(ge=...) metadata
_KINDS = {int: "an integer", float: "a number", Path: "a path", list[str]: "a comma-separated list",
          int | None: "an integer (unset: off)", bool: "0 or 1", Path | None: "a path (unset: off)",
          str | None: "a string (unset: none)"}


def allowed_values(field: str) -> str:
    """What a field accepts, in words: ``an integer >= 1``, ``one of auto, cpu, cuda``."""
    info = Settings.model_fields[field]
    if get_origin(info.annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(info.annotation)))
    kind = _KINDS.get(info.annotation, "a string")
    bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata for attr, op in _BOUNDS
              if getattr(m, attr, None) is not None]
    return " ".join([kind, " and ".join(bounds)]).strip()


def format_settings_error(exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line for a ValidationError of Settings, naming each variable (or the flag in ``flags`` that
    gave the field instead) and what it allows; a secret's value (the admin token) is never echoed."""
    problems = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # a check across fields: its message names the variables
            problems.append(msg)
            continue
        field = str(err["loc"][0])
        name = (flags or {}).get(field) or env_name(field)
        if field not in Settings.model_fields:
            problems.append(f"{name}: not a setting")
            continue
        secret = "SecretStr" in str(Settings.model_fields[field].annotation)
        got = "" if secret else f" (got {err.get('input')!r})"
        problems.append(f"{name}: {msg[:1].lower()}{msg[1:]}{got}; allowed: {allowed_values(field)}")
    return "; ".join(problems)
