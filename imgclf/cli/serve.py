"""``imgclf serve`` and ``imgclf preprocess``: the serving side (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgclf.cli.common import RepoOpt, fail, repository, settings, user_errors, validation_errors

app = typer.Typer()

SERVICE_TARGET = "service.http.app:Classifier"  # the BentoML service, as bentofile.yaml names it


@app.command()
def serve(
    repo: RepoOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port to listen on")] = 3000,
) -> None:
    """Serve the repository's production models over HTTP (a thin wrapper over `bentoml serve`)."""
    import os
    import sys

    checked = settings(None, repo)  # every IMGCLF_* variable, checked here: a bad one is one line, not a traceback
    found = repository(repo)
    if not found.names():
        fail(f"no models in {found.location}; run `imgclf bootstrap` or `imgclf export` first")
    location = found.location if checked.repo_is_url else str(found.root.resolve())  # workers start elsewhere
    env = {**os.environ, "IMGCLF_MODEL_REPO": location, "BENTOML_DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--host", host, "--port", str(port),
               "--timeout-keep-alive", str(checked.keepalive_s)]  # idle keep-alive connections are closed
    os.execvpe(command[0], command, env)


@app.command("preprocess")
def preprocess(
    image: Annotated[Path, typer.Argument(help="image file")],
    spec: Annotated[str, typer.Option(help="preprocessing spec as JSON")] = (
        '{"input_size": [224, 224], "resize_size": 256, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}'
    ),
) -> None:
    """Show what the shared preprocessing makes of an image (serving side; no torch)."""
    from pydantic import ValidationError

    from service.preprocessing import PreprocessSpec, image_to_tensor

    def spec_error(exc: ValidationError) -> str:
        return "--spec: " + validation_errors(exc, lambda loc: ".".join(map(str, loc)))

    with user_errors(ValidationError, describe=spec_error):
        parsed = PreprocessSpec.model_validate_json(spec)
    with user_errors(OSError, describe=lambda exc: f"cannot read {image}: {exc.strerror or exc}"):
        data = image.read_bytes()
    with user_errors(ValueError):  # ImageInputError (a user error anyway) and any other refusal of the bytes
        tensor = image_to_tensor(data, parsed)
    typer.echo(json.dumps({"shape": list(tensor.shape), "mean": float(tensor.mean()), "std": float(tensor.std())}))
