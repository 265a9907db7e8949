"""Durable, resumable job output.

While a job runs, its state lives beside the output in ``<out>.job/``:

    job.json        what the job is (input, model version, format, top-k, chunking)
    journal.jsonl   one line per finished chunk, appended and fsynced after its rows
    rows.csv|jsonl  the rows so far (csv and jsonl), appended chunk by chunk
    parts/          one file per finished chunk (parquet, which cannot be appended)

A chunk counts as done only once its journal line is on disk; rows written
after the last journal line are cut off on resume. When every chunk is done,
the output is moved into place with one rename, so ``<out>`` is either absent
or complete, and the state directory is removed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from service.atomic import atomic_path, atomic_write_json, fsync_dir
from service.batch.scoring import Row

log = logging.getLogger(__name__)


class OutputFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"

    @classmethod
    def for_path(cls, path: Path) -> OutputFormat:
        """From the output's suffix; jsonl when it says nothing."""
        suffix = path.suffix.lower().lstrip(".")
        return cls(suffix) if suffix in cls._value2member_map_ else cls.jsonl


class JobStateError(RuntimeError):
    """The output or its state directory is in the way, or does not belong to this job."""


class JobIdentity(BaseModel):
    """What must not change between an interrupted run and its ``--resume``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    model: str
    version: int
    format: OutputFormat
    top_k: int
    chunk_size: int
    ordered: bool


@dataclass(frozen=True)
class ChunkRecord:
    chunk: int
    digest: str  # sha256 of the chunk's paths: a resumed run must list the same inputs
    rows: int
    ok: int
    errors: dict[str, int]  # error rows by kind
    end: int  # length of rows.<fmt> after this chunk (append formats)


def record(row: Row, model: str, version: int) -> dict[str, Any]:
    """A row as written to jsonl and parquet (and served by the HTTP batch task)."""
    return {
        "index": row.index, "path": row.path, "status": row.status, "model": model, "version": version,
        "labels": list(row.labels), "scores": list(row.scores),
        "error_kind": row.error_kind, "error_message": row.error_message,
    }


def csv_header(top_k: int) -> list[str]:
    ranked = [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("label", "score")]
    return ["index", "path", "status", "model", "version", *ranked, "error_kind", "error_message"]


def encode_rows(rows: Iterable[Row], fmt: OutputFormat, model: str, version: int, top_k: int) -> bytes:
    """csv (without header) or jsonl bytes for rows."""
    if fmt is OutputFormat.jsonl:
        return "".join(json.dumps(record(r, model, version)) + "\n" for r in rows).encode()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows:
        ranked: list[Any] = []
        for i in range(top_k):
            ranked += [r.labels[i], repr(r.scores[i])] if i < len(r.labels) else ["", ""]
        writer.writerow([r.index, r.path, r.status, model, version, *ranked, r.error_kind or "", r.error_message or ""])
    return buf.getvalue().encode()


def _parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise JobStateError("parquet output needs pyarrow: pip install 'imgclf[parquet]'") from exc
    return pa, pq


def _append_fsync(path: Path, data: bytes) -> int:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


class JobState:
    """The state directory of one job: opened fresh or resumed, written chunk by chunk, finished once."""

    def __init__(self, out: Path, identity: JobIdentity, done: dict[int, ChunkRecord]) -> None:
        self.out, self.identity, self.done = out, identity, done
        self.dir = state_dir(out)
        self.rows_file = self.dir / f"rows.{identity.format.value}"
        self.parts = self.dir / "parts"
        self.journal = self.dir / "journal.jsonl"

    @classmethod
    def open(cls, out: Path, identity: JobIdentity, *, resume: bool, overwrite: bool) -> JobState:
        directory = state_dir(out)
        if overwrite:
            shutil.rmtree(directory, ignore_errors=True)
            out.unlink(missing_ok=True)
        elif out.exists():
            raise JobStateError(f"{out} exists; pass --overwrite to replace it")
        if directory.exists() and not resume:
            raise JobStateError(f"{directory} holds an interrupted run; pass --resume to continue it "
                                "or --overwrite to start again")
        if resume and (directory / "job.json").exists():
            previous = JobIdentity.model_validate_json((directory / "job.json").read_text())
            if previous != identity:
                changed = {k: (v, getattr(identity, k)) for k, v in previous if getattr(identity, k) != v}
                raise JobStateError(f"cannot resume: the interrupted run differs in {changed} (was, now)")
            state = cls(out, identity, {})
            state._load_journal()
            log.info("resuming: %d chunks (%d rows) already done", len(state.done),
                     sum(r.rows for r in state.done.values()))
            return state
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "job.json", identity.model_dump(mode="json"))
        state = cls(out, identity, {})
        state.journal.unlink(missing_ok=True)
        state.rows_file.unlink(missing_ok=True)
        if identity.format is OutputFormat.csv:
            _append_fsync(state.rows_file, ",".join(csv_header(identity.top_k)).encode() + b"\n")
        return state

    def _load_journal(self) -> None:
        """Read finished chunks; cut a torn last journal line and rows written after the last chunk."""
        good = 0
        if self.journal.exists():
            data = self.journal.read_bytes()
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                entry = ChunkRecord(**json.loads(line))
                self.done[entry.chunk] = entry
                good += len(line)
            if good != len(data):
                os.truncate(self.journal, good)
        if self.identity.format is not OutputFormat.parquet:
            if not self.rows_file.exists():
                raise JobStateError(f"cannot resume: {self.rows_file} is missing")
            header = len(",".join(csv_header(self.identity.top_k))) + 1 if self.identity.format is OutputFormat.csv else 0
            valid = max((r.end for r in self.done.values()), default=header)
            if self.rows_file.stat().st_size > valid:
                os.truncate(self.rows_file, valid)

    def write_chunk(self, chunk: int, digest: str, rows: list[Row]) -> None:
        ident = self.identity
        if ident.format is OutputFormat.parquet:
            pa, pq = _parquet()
            table = pa.Table.from_pylist([record(r, ident.model, ident.version) for r in rows], schema=_schema(pa))
            with atomic_path(self.parts / f"part-{chunk:08d}.parquet") as tmp:
                pq.write_table(table, tmp)
            end = 0
        else:
            end = _append_fsync(self.rows_file, encode_rows(rows, ident.format, ident.model, ident.version, ident.top_k))
        errors = Counter(r.error_kind or "" for r in rows if r.status == "error")
        entry = ChunkRecord(chunk, digest, len(rows), len(rows) - errors.total(), dict(errors), end)
        _append_fsync(self.journal, (json.dumps(asdict(entry)) + "\n").encode())
        self.done[chunk] = entry

    def finish(self) -> None:
        """Move the complete output into place with one rename, then drop the state directory."""
        if self.identity.format is OutputFormat.parquet:
            pa, pq = _parquet()
            order = sorted(self.done) if self.identity.ordered else list(self.done)
            with atomic_path(self.out) as tmp, pq.ParquetWriter(tmp, _schema(pa)) as writer:
                for chunk in order:
                    writer.write_table(pq.read_table(self.parts / f"part-{chunk:08d}.parquet", schema=_schema(pa)))
        else:
            os.replace(self.rows_file, self.out)
            fsync_dir(self.out.parent)
        shutil.rmtree(self.dir)


def state_dir(out: Path) -> Path:
    return out.with_name(out.name + ".job")


def _schema(pa):
    return pa.schema([
        ("index", pa.int64()), ("path", pa.string()), ("status", pa.string()), ("model", pa.string()),
        ("version", pa.int64()), ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
        ("error_kind", pa.string()), ("error_message", pa.string()),
    ])
