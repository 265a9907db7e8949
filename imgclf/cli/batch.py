"""``imgclf batch``: score many images offline (serving side; no torch)."""

from __future__ import annotations

from typing import Annotated

import typer

from imgclf.cli.common import RepoOpt, flag_errors, repository, settings, user_errors

app = typer.Typer()

# What a batch job reads from Settings (service/batch/runner.py: the repository, decode limits, device);
# a bad serving-only variable such as IMGCLF_MAX_QUEUE does not stop a job.
BATCH_FIELDS = ("model_repo", "repo_cache", "store_writes", "device", "precision", "max_upload_bytes", "max_pixels")
# BatchOptions field -> the flag that sets it, for error messages
FLAGS = {"source": "INPUT", "format": "--format", "out": "--out", "model": "--model"}


@app.command()
def batch(
    source: Annotated[str, typer.Argument(
        metavar="INPUT", help="directory (recursive), glob, or manifest (one path per line, or CSV with a path "
        "column); fsspec URLs (s3://, gs://, file://) when their filesystem package is installed")],
    model: Annotated[str, typer.Option("--model", help="NAME or NAME:VERSION (NAME: its production version)")],
    out: Annotated[str, typer.Option("--out", help="output file or fsspec URL (s3://bucket/key.jsonl); appears "
                                     "only when complete (a URL's job is staged in ~/.cache/imgclf/batch)")],
    fmt: Annotated[str | None, typer.Option("--format", help="csv, jsonl or parquet (default: from --out)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1)] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per ONNX Runtime call and per "
                                            "task of a worker (raise it on GPUs)")] = 8,
    workers: Annotated[int, typer.Option("--workers", min=0, help="parallel workers (0: one per core)")] = 0,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="rows written durably together")] = 512,
    ordered: Annotated[bool, typer.Option("--ordered", help="rows in input order (else as chunks finish)")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run of the same job")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the output and any interrupted run")] = False,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray (pip install 'imgclf[ray]')")] = "local",
    executor: Annotated[str, typer.Option("--executor", help="local workers: process or thread")] = "process",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster (default: RAY_ADDRESS or "
                                                    "a local Ray)")] = None,
    fail_on_error: Annotated[bool, typer.Option("--fail-on-error", help="exit 1 when any input was bad")] = False,
    repo: RepoOpt = None,
    kill_at: Annotated[str | None, typer.Option("--kill-at", hidden=True, help="TESTS ONLY: SIGKILL the job at "
                                                "this point of its durable writes (BatchOptions.kill_at)")] = None,
) -> None:
    """Score many images offline into csv/jsonl/parquet: parallel, resumable, one row per input."""
    import sys

    from pydantic import ValidationError

    from service.batch.job import BatchOptions
    from service.batch.runner import run_batch

    with user_errors(ValidationError, describe=lambda exc: flag_errors(exc, FLAGS)):
        options = BatchOptions(source=source, model=model, out=out, format=fmt, top_k=top_k, batch_size=batch_size,
                               workers=workers, chunk_size=chunk_size, ordered=ordered, resume=resume,
                               overwrite=overwrite, engine=engine, executor=executor, ray_address=ray_address,
                               kill_at=kill_at)
    job_settings = settings(BATCH_FIELDS, repository(repo).location)
    with user_errors(ValueError):  # e.g. an unreadable manifest or an unusable output path
        summary = run_batch(options, job_settings, show_progress=sys.stderr.isatty())
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(summary.errors_by_kind.items())) or "none"
    typer.echo(f"{summary.total} rows -> {summary.out} ({summary.model}:{summary.version})\n"
               f"  ok {summary.ok}, error {summary.error} ({kinds})\n"
               f"  scored {summary.processed} in {summary.wall_s:.1f}s = {summary.images_per_s:.1f} img/s "
               f"({summary.engine}, {summary.workers} workers)"
               + (f"; {summary.resumed_rows} rows from the interrupted run" if summary.resumed_rows else ""))
    if fail_on_error and summary.error:
        raise typer.Exit(1)
