"""A batch row and its one schema: csv, jsonl, parquet and Ray's columns all come from :data:`COLUMNS`.

A row is what one input became (its top-k, or why it could not be scored). :meth:`Row.to_record`
adds the job-level columns (model, version) and is the jsonl line, the parquet row, the HTTP
batch task's line and what a Ray actor sends back; :func:`csv_header` / :func:`encode_rows` flatten
the ranked list columns into ``label_1, score_1, ...`` pairs for csv. Change a column here and
every format follows.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Item = tuple[int, str]  # (position in the input listing, path)
Kind = Literal["int", "str", "optional_str", "optional_bool", "labels", "scores"]


@dataclass(frozen=True, slots=True)
class Row:
    """One input's outcome. Bad files are rows too: a batch job never stops for one."""

    index: int
    path: str
    status: Literal["ok", "error"]
    labels: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    error_kind: str | None = None
    error_message: str | None = None
    confident: bool | None = None  # top-1 score >= the model's threshold; None: no threshold, or an error row

    def to_record(self, model: str, version: int) -> dict[str, Any]:
        """The row as one flat record, in column order (jsonl, parquet, HTTP, Ray)."""
        job = {"model": model, "version": version}
        return {c.name: job[c.name] if c.job else _TO_PLAIN[c.kind](getattr(self, c.name)) for c in COLUMNS}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Row:
        """Back from a record, whatever container types it went through (numpy arrays from Ray)."""
        return cls(**{c.name: _FROM_PLAIN[c.kind](record.get(c.name)) for c in COLUMNS if not c.job})


def error_row(index: int, path: str, kind: str, message: str) -> Row:
    return Row(index, path, "error", error_kind=kind, error_message=message)


@dataclass(frozen=True)
class Column:
    """One output column. ``job``: the same for every row of a job (not a field of :class:`Row`);
    ``ranked``: a top-k list, written to csv as ``<ranked>_1 .. <ranked>_k``."""

    name: str
    kind: Kind
    job: bool = False
    ranked: str | None = None


COLUMNS: tuple[Column, ...] = (
    Column("index", "int"),
    Column("path", "str"),
    Column("status", "str"),
    Column("model", "str", job=True),
    Column("version", "int", job=True),
    Column("labels", "labels", ranked="label"),
    Column("scores", "scores", ranked="score"),
    Column("confident", "optional_bool"),
    Column("error_kind", "optional_str"),
    Column("error_message", "optional_str"),
)

_TO_PLAIN: dict[Kind, Callable[[Any], Any]] = {
    "int": int, "str": str, "optional_str": lambda v: v, "optional_bool": lambda v: v, "labels": list, "scores": list,
}
_FROM_PLAIN: dict[Kind, Callable[[Any], Any]] = {
    "int": int, "str": str,
    "optional_str": lambda v: None if v is None else str(v),
    "optional_bool": lambda v: None if v is None or v == "" else v in (True, "true", "True", 1),
    "labels": lambda v: tuple(str(x) for x in (() if v is None else v)),
    "scores": lambda v: tuple(float(x) for x in (() if v is None else v)),
}
# csv cells: scores by repr() so that a float reads back exactly; a missing value is an empty cell
_CSV_CELL: dict[Kind, Callable[[Any], str]] = {
    "int": str, "str": str, "optional_str": lambda v: "" if v is None else v,
    "optional_bool": lambda v: "" if v is None else str(bool(v)).lower(),
    "labels": str, "scores": repr,
}


def _csv_layout() -> list[Column | tuple[Column, ...]]:
    """Columns as csv lays them out: runs of ranked columns grouped, to be interleaved rank by rank."""
    layout: list[Column | tuple[Column, ...]] = []
    for column in COLUMNS:
        if column.ranked and layout and isinstance(layout[-1], tuple):
            layout[-1] = (*layout[-1], column)
        else:
            layout.append((column,) if column.ranked else column)
    return layout


def csv_header(top_k: int) -> list[str]:
    header: list[str] = []
    for entry in _csv_layout():
        if isinstance(entry, Column):
            header.append(entry.name)
        else:
            header += [f"{c.ranked}_{rank}" for rank in range(1, top_k + 1) for c in entry]
    return header


def _csv_cells(record: Mapping[str, Any], top_k: int) -> list[str]:
    cells: list[str] = []
    for entry in _csv_layout():
        if isinstance(entry, Column):
            cells.append(_CSV_CELL[entry.kind](record[entry.name]))
            continue
        for rank in range(top_k):
            for c in entry:
                values = record[c.name]
                cells.append(_CSV_CELL[c.kind](values[rank]) if rank < len(values) else "")
    return cells


def encode_rows(rows: Iterable[Row], fmt: Literal["csv", "jsonl"], model: str, version: int, top_k: int) -> bytes:
    """csv (without header) or jsonl bytes for rows."""
    records = (row.to_record(model, version) for row in rows)
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in records:
        writer.writerow(_csv_cells(r, top_k))
    return buf.getvalue().encode()


def parquet_schema(pa: Any) -> Any:
    """The parquet schema (``pa`` is pyarrow, imported by the caller: it is an optional extra)."""
    types = {"int": pa.int64(), "str": pa.string(), "optional_str": pa.string(), "optional_bool": pa.bool_(),
             "labels": pa.list_(pa.string()), "scores": pa.list_(pa.float64())}
    return pa.schema([(c.name, types[c.kind]) for c in COLUMNS])


def to_columns(records: Iterable[Mapping[str, Any]], extra: Mapping[str, list[Any]] | None = None) -> dict[str, list]:
    """Records as column lists (Ray Data's batch format), plus ``extra`` columns of the same length."""
    out: dict[str, list[Any]] = {c.name: [] for c in COLUMNS}
    for record in records:
        for c in COLUMNS:
            out[c.name].append(record[c.name])
    return {**(extra or {}), **out}
