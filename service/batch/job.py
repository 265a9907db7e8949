"""What a batch job is, as both executors see it: its options and summary, its chunks, its scorer.

``runner`` (which picks an executor and writes the chunks), ``local`` (the worker pool) and
``ray_engine`` all import this module and none imports another executor: no cycle.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.batch.job_state import KillPoint, OutputFormat
from service.batch.rows import Item
from service.batch.scoring import Scorer
from service.manifest import Manifest
from service.preprocessing import DecodeLimits
from service.runtime import Device


class BatchOptions(BaseModel):
    """One job, as the CLI flags describe it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="directory, glob, or manifest (one path per line, or CSV with a path column)")
    model: str = Field(description="NAME or NAME:VERSION; NAME means its production version")
    out: Path | str = Field(description="output file, or an fsspec URL (s3://bucket/prefix/scores.jsonl): "
                            "service/batch/outputs.py")
    format: OutputFormat | None = Field(default=None, description="default: from the output's suffix, else jsonl")
    top_k: int = Field(default=5, ge=1)
    batch_size: int = Field(default=8, ge=1, description="images per ONNX Runtime call and per worker task; "
                            "single-threaded CPU sessions are fastest at 1-8 (benchmarks/NOTES.md), GPUs want more")
    workers: int = Field(default=0, ge=0, description="parallel workers; 0: one per usable core")
    chunk_size: int = Field(default=512, ge=1, description="rows written and journalled together")
    ordered: bool = Field(default=False, description="write rows in input order (else as chunks finish)")
    resume: bool = False
    overwrite: bool = False
    engine: Literal["local", "ray"] = "local"
    executor: Literal["process", "thread"] = Field(
        default="process", description="local workers: processes (measured faster: no GIL between decoders) or threads")
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: RAY_ADDRESS or a local Ray")
    kill_at: KillPoint | None = Field(
        default=None, description="TESTS ONLY: SIGKILL this process at that point of the job's durable writes "
        "(service/batch/job_state.py), so that resume can be tested at every point; never set it otherwise")

    @field_validator("out", mode="before")
    @classmethod
    def _path_or_url(cls, value: object) -> object:
        """A URL stays a string (a Path would fold ``s3://b`` into ``s3:/b``); anything else is a local path."""
        return Path(value) if isinstance(value, str) and "://" not in value else value


class BatchSummary(BaseModel):
    out: Path | str
    model: str
    version: int
    total: int
    ok: int
    error: int
    errors_by_kind: dict[str, int]
    resumed_rows: int = Field(description="rows already written by the interrupted run")
    processed: int = Field(description="rows scored by this run")
    wall_s: float
    images_per_s: float = Field(description="processed / wall_s")
    engine: str
    workers: int


@dataclass(frozen=True)
class Chunk:
    """The unit of durability: ``chunk_size`` inputs, written and journalled together."""

    id: int
    items: list[Item]
    digest: str = field(repr=False)  # sha256 of the paths: a resumed run must list the same inputs


@dataclass(frozen=True)
class ScorerSpec:
    """Everything a worker needs to build its own :class:`Scorer` (picklable, sent once)."""

    model: str | bytes  # a path, or the model's bytes for workers on other machines
    manifest: Manifest
    top_k: int
    batch_size: int
    limits: DecodeLimits
    device: Device = "cpu"
    threads: int = 1

    def build(self) -> Scorer:
        return Scorer.create(self.model, self.manifest, top_k=self.top_k, batch_size=self.batch_size,
                             limits=self.limits, device=self.device, threads=self.threads)


def chunks(paths: Iterator[str], size: int) -> Iterator[Chunk]:
    """The listing cut into chunks, numbered from 0; the same listing always gives the same chunks."""
    indexed = enumerate(paths)
    for chunk_id in itertools.count():
        items = list(itertools.islice(indexed, size))
        if not items:
            return
        digest = hashlib.sha256("\n".join(p for _, p in items).encode()).hexdigest()
        yield Chunk(chunk_id, items, digest)
