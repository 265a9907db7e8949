"""Durable, resumable job output: a job killed at any moment resumes to the output of an uninterrupted run.

While a job runs, its state lives beside the output in ``<out>.job/`` (for an output URL: beside the
URL's staging file in the user's cache, ``service/batch/outputs.py``):

    job.json        what the job is (input, model version, format, top-k, chunking)
    journal.jsonl   one line per finished chunk, appended and fsynced after its rows
    rows.csv|jsonl  the rows so far (csv and jsonl), appended chunk by chunk
    parts/          one file per finished chunk (parquet, which cannot be appended)
    finished        present once every chunk is journalled: only the final rename and clean-up are left

The steps, and what a kill after each leaves for ``--resume``:

1. The state directory is built as ``.<out>.job.new`` and renamed into place complete: a kill
   before that rename leaves no state (resume starts afresh; the half-built directory is removed).
2. A chunk's rows are appended (csv/jsonl) or written atomically (parquet), then its journal line.
   A chunk counts as done only once its journal line is on disk; rows after the last journal line,
   and a torn last journal line, are cut off on resume, and the chunk is scored again.
3. ``finished`` is written, then the output is moved into place with one rename (so ``<out>`` is
   either absent or complete), an output URL gets that file in one put, then the state directory is
   removed. Resumed after ``finished``, nothing is scored again: the rename is done (or redone), the
   put redone, and the directory removed.

:data:`KillPoint` names the moments between those steps; ``BatchOptions.kill_at`` (tests only)
makes the process SIGKILL itself at one of them, which is how the suite proves each one resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections import Counter
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from service.atomic import atomic_path, atomic_write_json, fsync_dir
from service.batch.outputs import Output
from service.batch.rows import Row, csv_header, encode_rows, parquet_schema

log = logging.getLogger(__name__)

KillPoint = Literal[
    "before_first_chunk",  # the state directory exists, no chunk written yet
    "mid_chunk",  # the 2nd chunk this run writes is half on disk (parquet: its temporary file, not renamed)
    "after_chunk_before_journal",  # the 2nd chunk's rows are all on disk, its journal line is not
    "before_rename",  # every chunk journalled, ``finished`` written; the output not yet in place
    "after_rename",  # the output in place (a URL's: uploaded), the state directory not yet removed
]
_KILL_CHUNK = 2  # mid-chunk kill points hit the 2nd chunk written, so that one chunk is done before


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
    """A finished chunk, as its journal line says."""

    chunk: int
    digest: str  # sha256 of the chunk's paths: a resumed run must list the same inputs
    rows: int
    ok: int
    errors: dict[str, int]  # error rows by kind
    end: int  # length of rows.<fmt> after this chunk (append formats)


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


def state_dir(out: Path) -> Path:
    return out.with_name(out.name + ".job")


class JobState:
    """The state directory of one job: opened fresh or resumed, written chunk by chunk, finished once."""

    def __init__(self, target: Output, identity: JobIdentity, *, kill_at: KillPoint | None = None) -> None:
        self.target, self.identity, self.kill_at = target, identity, kill_at
        self.out = target.local  # the finished file's local path (an output URL's staged copy)
        self.done: dict[int, ChunkRecord] = {}
        self.dir = state_dir(self.out)
        self.rows_file = self.dir / f"rows.{identity.format.value}"
        self.parts = self.dir / "parts"
        self.journal = self.dir / "journal.jsonl"
        self.marker = self.dir / "finished"
        self._written = 0  # chunks written by this run
        self._committed = False  # the output is in place: an interrupted run got past its final rename

    @property
    def finished(self) -> bool:
        """Every chunk is journalled: nothing is left to score, only :meth:`finish`."""
        return self.marker.exists()

    @property
    def rows_done(self) -> int:
        return sum(r.rows for r in self.done.values())

    @classmethod
    def open(cls, target: Output, identity: JobIdentity, *, resume: bool, overwrite: bool,
             kill_at: KillPoint | None = None) -> JobState:
        state = cls(target, identity, kill_at=kill_at)
        directory = state.dir
        if overwrite:
            shutil.rmtree(directory, ignore_errors=True)
            target.discard()
        if directory.exists() and not resume:
            raise JobStateError(f"{directory} holds an interrupted run of {target.location}; pass --resume to "
                                "continue it or --overwrite to start again")
        # An output beside the state of the job being resumed: a local one is this job's, killed after its
        # final rename; a URL's may also be the previous output, which the final put replaces.
        resuming = resume and (directory.exists() if target.replaced_by_publish else state.marker.exists())
        if not (resuming or overwrite) and target.exists():  # a URL's previous output stays until the put
            raise JobStateError(f"{target.location} exists; pass --overwrite to replace it")
        if resume and (directory / "job.json").exists():
            previous = JobIdentity.model_validate_json((directory / "job.json").read_text())
            if previous != identity:
                changed = {k: (v, getattr(identity, k)) for k, v in previous if getattr(identity, k) != v}
                raise JobStateError(f"cannot resume: the interrupted run differs in {changed} (was, now)")
            state._load_journal()
            log.info("resuming: %d chunks (%d rows) already done%s", len(state.done), state.rows_done,
                     "; only the final rename is left" if state.finished else "")
            return state
        if directory.exists():  # no job.json: a directory an older version began to build; nothing in it is done
            log.warning("%s has no job.json; starting the job afresh", directory)
            shutil.rmtree(directory)
        state._create()
        return state

    def _create(self) -> None:
        """Build the state directory beside the output and rename it into place complete."""
        building = self.dir.with_name(f".{self.dir.name}.new")
        shutil.rmtree(building, ignore_errors=True)  # a build a kill interrupted
        building.mkdir(parents=True)
        atomic_write_json(building / "job.json", self.identity.model_dump(mode="json"))
        _append_fsync(building / self.journal.name, b"")
        if self.identity.format is OutputFormat.parquet:
            (building / self.parts.name).mkdir()
        else:
            _append_fsync(building / self.rows_file.name, self._header())
        fsync_dir(building)
        os.rename(building, self.dir)
        fsync_dir(self.dir.parent)

    def _header(self) -> bytes:
        if self.identity.format is OutputFormat.csv:
            return ",".join(csv_header(self.identity.top_k)).encode() + b"\n"
        return b""

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
        self._committed = self.finished and self.out.exists()
        if self.identity.format is OutputFormat.parquet or self._committed:
            return  # parquet parts are written whole; or the rows file is the output already
        if not self.rows_file.exists():
            if self.done:
                raise JobStateError(f"cannot resume: {self.rows_file} is missing; rerun with --overwrite")
            _append_fsync(self.rows_file, self._header())  # an older version's state, killed before chunk 1
        valid = max((r.end for r in self.done.values()), default=len(self._header()))
        if self.rows_file.stat().st_size > valid:
            os.truncate(self.rows_file, valid)

    def _reached(self, point: KillPoint, chunk_written: int | None = None) -> None:
        """The test hook: SIGKILL ourselves at ``point`` when asked to (``BatchOptions.kill_at``)."""
        if self.kill_at == point and chunk_written in (None, _KILL_CHUNK):
            log.warning("kill_at=%s: SIGKILL (a test of resume)", point)
            os.kill(os.getpid(), signal.SIGKILL)

    def write_chunk(self, chunk: int, digest: str, rows: list[Row]) -> None:
        if self._written == 0:
            self._reached("before_first_chunk")
        self._written += 1
        ident = self.identity
        if ident.format is OutputFormat.parquet:
            pa, pq = _parquet()
            table = pa.Table.from_pylist([r.to_record(ident.model, ident.version) for r in rows],
                                         schema=parquet_schema(pa))
            with atomic_path(self._part(chunk)) as tmp:
                pq.write_table(table, tmp)
                self._reached("mid_chunk", self._written)
            fsync_dir(self.parts)
            end = 0
        else:
            data = encode_rows(rows, ident.format.value, ident.model, ident.version, ident.top_k)
            if self.kill_at == "mid_chunk" and self._written == _KILL_CHUNK:
                _append_fsync(self.rows_file, data[: len(data) // 2])
                self._reached("mid_chunk", self._written)
            end = _append_fsync(self.rows_file, data)
        self._reached("after_chunk_before_journal", self._written)
        errors = Counter(r.error_kind or "" for r in rows if r.status == "error")
        entry = ChunkRecord(chunk, digest, len(rows), len(rows) - errors.total(), dict(errors), end)
        _append_fsync(self.journal, (json.dumps(asdict(entry)) + "\n").encode())
        self.done[chunk] = entry

    def _part(self, chunk: int) -> Path:
        return self.parts / f"part-{chunk:08d}.parquet"

    def finish(self) -> None:
        """Move the complete output into place with one rename, then drop the state directory."""
        if not self.finished:
            _append_fsync(self.marker, b"")
            fsync_dir(self.dir)
        if not self._committed:
            self._commit()
        self.target.publish()  # an output URL: one put of the finished file (again, if resumed after it)
        self._reached("after_rename")
        shutil.rmtree(self.dir)
        fsync_dir(self.dir.parent)
        self.target.clean_up()

    def _commit(self) -> None:
        if self.identity.format is OutputFormat.parquet:
            pa, pq = _parquet()
            schema = parquet_schema(pa)
            order = sorted(self.done) if self.identity.ordered else list(self.done)
            with atomic_path(self.out) as tmp:
                with pq.ParquetWriter(tmp, schema) as writer:
                    for chunk in order:
                        writer.write_table(pq.read_table(self._part(chunk), schema=schema))
                self._reached("before_rename")
        else:
            self._reached("before_rename")
            os.replace(self.rows_file, self.out)
        fsync_dir(self.out.parent)
