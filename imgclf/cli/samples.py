"""``imgclf samples list|export``: the images a service kept (``IMGCLF_SAMPLE_DIR``), to review and retrain on.

No torch: the sample store is the serving side's (``service.samples``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imgclf.cli.common import fail, settings, user_errors

if TYPE_CHECKING:
    from service.samples import SampleStore

samples_app = typer.Typer(help="Images a service kept (IMGCLF_SAMPLE_DIR, IMGCLF_SAMPLE_RATE): list them, "
                          "export a review tree for `imgclf pipeline --data`.", no_args_is_help=True)

DirOpt = Annotated[Path | None, typer.Option("--dir", help="sample directory (default $IMGCLF_SAMPLE_DIR)")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="only this model's samples (NAME)")]


def _store(folder: Path | None) -> SampleStore:
    from service.samples import SampleStore

    root = folder or settings(("sample_dir",)).sample_dir
    if root is None:
        fail("no sample directory: pass --dir or set IMGCLF_SAMPLE_DIR (the service's setting)")
    if not root.is_dir():
        fail(f"no samples at {root}: the service writes there once IMGCLF_SAMPLE_RATE > 0 and a request is sampled")
    return SampleStore(root)


def _verdict(record: dict) -> str:
    return {True: "confident", False: "NOT confident", None: "no threshold"}[record.get("confident")]


@samples_app.command("list")
def samples_list(
    folder: DirOpt = None, model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the JSON lines themselves")] = False,
) -> None:
    """Every kept sample, oldest first: time, model, top-1, score, verdict, sha256; then the totals."""
    store = _store(folder)
    records = store.records(model)
    if as_json:
        for record in records:
            typer.echo(json.dumps(record, separators=(",", ":")))
        return
    for r in records:
        best = r["top_k"][0]
        typer.echo(f"{r['time'][:19]}  {r['model']}:{r['version']}  {best['label']:<20} {best['score']:.4f}  "
                   f"{_verdict(r):<13}  {r['sha256'][:12]}  {r['file']}")
    verdicts = Counter(_verdict(r) for r in records)
    usage = store.usage()
    not_kept = ", ".join(f"{k} {v}" for k, v in sorted(usage["not_kept"].items())) or "none"
    typer.echo(f"{len(records)} samples ({', '.join(f'{n} {v}' for v, n in sorted(verdicts.items())) or 'none'}); "
               f"{usage['bytes']} bytes kept in all; not kept: {not_kept}")


@samples_app.command("export")
def samples_export(
    out: Annotated[Path, typer.Option("--out", help="the review tree to write (new files are added to it)")],
    folder: DirOpt = None, model: ModelOpt = None,
) -> None:
    """A review tree: one folder per predicted label plus _not_confident/. Move each wrongly labelled file to
    its class folder and each file you can label out of _not_confident/, then give the tree to
    `imgclf pipeline` as a second --data."""
    from service.samples import NOT_CONFIDENT, export_review

    store = _store(folder)
    if model is None:
        models = sorted({r["model"] for r in store.records()})
        if len(models) > 1:
            fail(f"the samples are of several models ({', '.join(models)}): pick one with --model")
        model = models[0] if models else None
    with user_errors(ValueError, OSError):
        counts = export_review(store, out, model)
    total = sum(counts.values())
    typer.echo(f"exported {total} new samples of {model or 'no model'} to {out}"
               + (": " + ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else ""))
    typer.echo(f"next: correct the tree (files under {NOT_CONFIDENT}/ are left out until moved), then "
               f"imgclf pipeline --name {model or 'NAME'} --data TRAINING_DATA --data {out} --holdout HELD_OUT")
