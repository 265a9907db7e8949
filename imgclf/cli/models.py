"""The model repository: ``imgclf export`` and ``imgclf bootstrap`` write versions (train extra);
``imgclf models ...`` inspects and manages them without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgclf.cli.common import RepoOpt, fail, model_ref, repository, require_training, user_errors

app = typer.Typer()
models_app = typer.Typer(help="Inspect and manage the model repository (no torch needed).", no_args_is_help=True)

RefArg = Annotated[str, typer.Argument(help="NAME or NAME:VERSION")]


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="training run directory (uses checkpoints/best.pt)")],
    name: Annotated[str, typer.Option("--name", help="model name in the repository")],
    repo: RepoOpt = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="'int8': also write a static QDQ int8 "
                                                  "file, served on CPUs where it passes the accuracy check")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 GPU variant, fp32 inputs/outputs kept")] = False,
    max_top1_drop: Annotated[float, typer.Option(help="refuse a variant losing more top-1 than this")] = 0.01,
    promote: Annotated[bool, typer.Option("--promote", help="make the new version production")] = False,
    target_precision: Annotated[float, typer.Option(
        "--target-precision", min=0.0, max=1.0, help="choose the confidence threshold at which the confident "
        "answers reach this precision on the validation set")] = 0.99,
) -> None:
    """Export a run's best checkpoint to ONNX, check it, and register it as a new version."""
    require_training()
    from service.manifest import validate_name
    from training.export import export as run_export
    from training.export import from_run

    if quantize not in (None, "int8"):
        fail(f"--quantize takes 'int8', not {quantize!r}")
    if quantize and fp16:
        fail("--quantize int8 and --fp16 are separate variants; export them one at a time")
    target = repository(repo, must_exist=False)
    with user_errors(ValueError, FileNotFoundError):  # a bad --name; a run directory without its files
        validate_name(name)
        version = run_export(from_run(run_dir), target, name,
                             precision="int8" if quantize else "fp16" if fp16 else "fp32", max_top1_drop=max_top1_drop,
                             target_precision=target_precision)
    if promote:
        target.promote(name, version.manifest.version)
    m = version.manifest
    top1 = f"top-1 {m.metrics.top1:.4f}" if m.metrics.top1 is not None else "no metrics"
    typer.echo(f"registered {m.name}:{m.version} ({m.export.precision}, {m.export.exporter}, {top1}) at {version.path}")
    for variant in m.variants:
        verdict = "served on CPUs" if variant.preferred_on_cpu else "kept, fp32 served"
        typer.echo(f"{variant.precision} variant {variant.file}: {verdict} ({variant.decision})")
    s = m.selective
    if s is not None and s.reached:
        typer.echo(f"confident from score {s.threshold:.6g}: precision {s.precision:.4f} at coverage "
                   f"{s.coverage:.3f} on {s.num_images} validation images (target {s.target_precision:g})")
    elif s is not None:
        typer.echo(f"no confidence threshold: {s.note}")


@app.command()
def bootstrap(repo: RepoOpt = None) -> None:
    """Register the offline ImageNet EfficientNet-Lite0 as imagenet-lite0 (once; production if none)."""
    require_training()
    from training.bootstrap import NAME
    from training.bootstrap import bootstrap as run_bootstrap

    target = repository(repo, must_exist=False)
    version = run_bootstrap(target)
    if version is None:
        typer.echo(f"{NAME} already in {target.location}; nothing changed")
    else:
        typer.echo(f"registered {NAME}:{version.manifest.version} at {version.path}")


@models_app.command("list")
def models_list(repo: RepoOpt = None) -> None:
    """Every model with its versions and aliases."""
    found = repository(repo)
    names = found.names()
    if not names:
        typer.echo(f"no models in {found.location}")
    for name in names:
        aliases = found.aliases(name)
        tags = {v: [a for a, av in aliases.items() if av == v] for v in found.versions(name)}
        trial = found.rollout(name)
        if trial is not None:
            tags.setdefault(trial.version, []).append(f"{trial.mode} {trial.weight:g}")
        typer.echo(f"{name}: " + ", ".join(f"{v}" + (f" ({'/'.join(t)})" if t else "") for v, t in tags.items()))


@models_app.command("show")
def models_show(ref: RefArg, repo: RepoOpt = None) -> None:
    """The manifest of a version (production by default)."""
    r = model_ref(ref)
    version = repository(repo).get(r.name, r.version)
    typer.echo(version.manifest.model_dump_json(indent=2, exclude={"labels"}))


@models_app.command("verify")
def models_verify(ref: RefArg, repo: RepoOpt = None) -> None:
    """Check schema and sha256 of every file; exit code 1 when verification fails."""
    from service.repository import RepositoryError

    r = model_ref(ref)
    found = repository(repo)
    try:
        version = found.get(r.name, r.version)
    except RepositoryError as exc:  # the answer this command exists to give, not a usage error
        typer.secho(f"FAILED: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"OK {version.manifest.name}:{version.manifest.version} ({len(version.manifest.files)} files verified)")


@models_app.command("promote")
def models_promote(name: str, version: int, repo: RepoOpt = None) -> None:
    """Make VERSION production; the current production becomes previous."""
    typer.echo(json.dumps(repository(repo).promote(model_ref(name).name, version)))


@models_app.command("rollback")
def models_rollback(name: str, repo: RepoOpt = None) -> None:
    """Swap production and previous."""
    typer.echo(json.dumps(repository(repo).rollback(model_ref(name).name)))


@models_app.command("canary")
def models_canary(
    name: str,
    version: Annotated[int | None, typer.Argument(help="the candidate (not production)")] = None,
    weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of the requests that name no version: "
                                          "answered by the candidate (canary), or also scored by it (--shadow)")] = 0.1,
    shadow: Annotated[bool, typer.Option("--shadow", help="production answers; the candidate scores a sample "
                                         "off the request path and each replica records how the two compare")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="end the rollout under way (production unchanged)")] = False,
    repo: RepoOpt = None,
) -> None:
    """Roll VERSION out beside production: replicas pick it up on their next poll (GET /models shows it).
    Promote it with `imgclf models promote`, or end it with --stop."""
    found, model = repository(repo), model_ref(name).name
    if stop:
        typer.echo(json.dumps(found.end_rollout(model)))
        return
    if version is None:
        fail("name the candidate VERSION, or pass --stop to end the rollout under way")
    typer.echo(json.dumps(found.start_rollout(model, version, "shadow" if shadow else "canary", weight)))
