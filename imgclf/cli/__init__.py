"""The ``imgclf`` command. Thin: parse flags, call the library, print for people.

One module per command group: ``train`` (train, lr-find, archs), ``models`` (the repository, export,
bootstrap), ``batch``, ``serve`` (serve, preprocess) and ``pipeline``; ``common`` holds what they share.
Heavy libraries are imported inside each command, so ``imgclf --help`` and the serving commands work
in an install without the ``train`` extra. Every user mistake ends in :func:`common.errors_exit`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from imgclf.cli import batch, explain, models, pipeline, samples, serve, train
from imgclf.cli.common import errors_exit, user_error_message

__all__ = ["app"]


class _Commands(TyperGroup):
    """The top-level group: the one place where an exception of any command meets the user-error rule."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if user_error_message(exc) is None:
                raise  # a bug: keep the traceback
            errors_exit(exc, verbose=bool(ctx.params.get("verbose")))


app = typer.Typer(
    cls=_Commands,
    help="Fine-tune CNNs, export verified ONNX models and serve them with BentoML and ONNX Runtime.",
    no_args_is_help=True, add_completion=False)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging, and tracebacks of errors")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("aiobotocore", "botocore"):  # "found credentials in ..." on every command run against S3
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)


app.add_typer(train.app)
app.add_typer(models.app)
app.add_typer(models.models_app, name="models")
app.add_typer(batch.app)
app.add_typer(serve.app)
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.add_typer(samples.samples_app, name="samples")  # samples list|export: what a service kept
app.add_typer(explain.app)  # explain, featuremaps, summary
