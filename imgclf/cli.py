"""The ``imgclf`` command. Thin: parse flags, call the library, print for people.

Heavy libraries are imported inside each command, so ``imgclf --help`` and the
serving commands work in an install without the ``train`` extra.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(
    help="Fine-tune CNNs, export verified ONNX models and serve them with BentoML and ONNX Runtime.",
    no_args_is_help=True, add_completion=False)

TRAIN_EXTRA_HINT = "this command needs the training extra: pip install 'imgclf[train]'"


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _require_training() -> None:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        _fail(f"{TRAIN_EXTRA_HINT} ({exc})")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with any training hyperparameters")]
DataOpt = Annotated[str | None, typer.Option("--data", help="'digits', an ImageFolder directory or a CSV manifest")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="architecture name (see `imgclf archs`)")]
PretrainedOpt = Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="start from ImageNet weights")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="local pretrained weights file (offline)")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="peak learning rate")]
SizeOpt = Annotated[int | None, typer.Option("--image-size", help="square model input size")]
SeedOpt = Annotated[int | None, typer.Option("--seed")]


def _overrides(
    data: str | None, arch: str | None, pretrained: bool | None, weights: Path | None, epochs: int | None,
    batch_size: int | None, lr: float | None, image_size: int | None, seed: int | None,
) -> dict[str, Any]:
    """Flags given on the command line, as a nested config fragment."""
    out: dict[str, Any] = {"data": {}, "model": {}, "optim": {}}
    if data is not None:
        out["data"]["source"] = data
    if arch is not None:
        out["model"]["arch"] = arch
    if pretrained is not None:
        out["model"]["pretrained"] = pretrained
    if weights is not None:
        out["model"]["weights"] = str(weights)
        out["model"].setdefault("pretrained", True)
    if image_size is not None:
        out["model"]["image_size"] = image_size
    if lr is not None:
        out["optim"]["lr"] = lr
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed)):
        if value is not None:
            out[key] = value
    return {k: v for k, v in out.items() if v != {}}


def _resolve(config: Path | None, overrides: dict[str, Any]):
    from training.config import ConfigError, resolve_config

    try:
        return resolve_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def train(
    config: ConfigOpt = None,
    data: DataOpt = None,
    arch: ArchOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    image_size: SizeOpt = None,
    seed: SeedOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<arch>-<time>)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this directory")] = None,
) -> None:
    """Fine-tune or train a CNN; writes checkpoints, metrics, report.json and plots to the run directory."""
    _require_training()
    import time

    from training.config import ConfigError
    from training.data import DataError
    from training.models import WeightsUnavailableError
    from training.train import train as run_training

    overrides = _overrides(data, arch, pretrained, weights, epochs, batch_size, lr, image_size, seed)
    if resume is not None:
        if overrides or config or out:
            _fail("--resume continues a run with its saved config.yaml; give no other options")
        cfg = _resolve(resume / "config.yaml", {})
        run_dir = resume
    else:
        cfg = _resolve(config, overrides)
        run_dir = out or Path("runs") / f"{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        report = run_training(cfg, run_dir, resume=resume is not None)
    except (ConfigError, DataError, WeightsUnavailableError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(
        f"{run_dir}: val top-1 {report['top1']:.4f}, top-5 {report['top5']:.4f}, "
        f"best epoch {report['best_epoch']}/{report['epochs_run']}, "
        f"ECE {report['ece_before_temperature']:.4f} -> {report['ece_after_temperature']:.4f} "
        f"(T={report['temperature']:.3f}), {report['wall_seconds']:.0f} s"
    )


@app.command("lr-find")
def lr_find(
    config: ConfigOpt = None,
    data: DataOpt = None,
    arch: ArchOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = None,
    image_size: SizeOpt = None,
    seed: SeedOpt = None,
    start_lr: Annotated[float, typer.Option(help="first learning rate")] = 1e-6,
    end_lr: Annotated[float, typer.Option(help="last learning rate")] = 1.0,
    num_iter: Annotated[int, typer.Option(help="number of batches")] = 100,
    out: Annotated[Path, typer.Option("--out", help="where lr_find.png and lr_find.json go")] = Path("runs/lr-find"),
) -> None:
    """Learning-rate range test: prints a suggested rate and saves the loss-vs-rate plot."""
    _require_training()
    from training.lr_finder import lr_find as run_lr_find

    cfg = _resolve(config, _overrides(data, arch, pretrained, weights, None, batch_size, None, image_size, seed))
    result = run_lr_find(cfg, out, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
    typer.echo(f"suggested learning rate: {result.suggested_lr:.3g} (plot: {out / 'lr_find.png'})")


@app.command("archs")
def archs() -> None:
    """Architectures that `imgclf train --arch` accepts."""
    _require_training()
    from training.models import list_models

    typer.echo("\n".join(list_models()))


RepoOpt = Annotated[Path | None, typer.Option("--repo", help="model repository (default $IMGCLF_MODEL_REPO or models/)")]


def _repository(repo: Path | None):
    from service.repository import ModelRepository
    from service.settings import Settings

    return ModelRepository(Settings.from_env(model_repo=repo).model_repo)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="training run directory (uses checkpoints/best.pt)")],
    name: Annotated[str, typer.Option("--name", help="model name in the repository")],
    repo: RepoOpt = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="'int8': static QDQ quantization")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 GPU variant, fp32 inputs/outputs kept")] = False,
    max_top1_drop: Annotated[float, typer.Option(help="refuse a variant losing more top-1 than this")] = 0.01,
    promote: Annotated[bool, typer.Option("--promote", help="make the new version production")] = False,
) -> None:
    """Export a run's best checkpoint to ONNX, check it, and register it as a new version."""
    _require_training()
    from service.manifest import validate_name
    from service.repository import RepositoryError
    from training.export import ExportError, from_run
    from training.export import export as run_export

    if quantize not in (None, "int8"):
        _fail(f"--quantize takes 'int8', not {quantize!r}")
    if quantize and fp16:
        _fail("--quantize int8 and --fp16 are separate variants; export them one at a time")
    try:
        validate_name(name)
        version = run_export(
            from_run(run_dir), _repository(repo), name,
            precision="int8" if quantize else "fp16" if fp16 else "fp32", max_top1_drop=max_top1_drop,
        )
        if promote:
            _repository(repo).promote(name, version.manifest.version)
    except (ExportError, RepositoryError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    m = version.manifest
    top1 = f"top-1 {m.metrics.top1:.4f}" if m.metrics.top1 is not None else "no metrics"
    typer.echo(f"registered {m.name}:{m.version} ({m.export.precision}, {m.export.exporter}, {top1}) at {version.path}")


@app.command()
def bootstrap(repo: RepoOpt = None) -> None:
    """Register the offline ImageNet EfficientNet-Lite0 as imagenet-lite0 (once; production if none)."""
    _require_training()
    from training.bootstrap import NAME
    from training.bootstrap import bootstrap as run_bootstrap

    repository = _repository(repo)
    version = run_bootstrap(repository)
    if version is None:
        typer.echo(f"{NAME} already in {repository.root}; nothing changed")
    else:
        typer.echo(f"registered {NAME}:{version.manifest.version} at {version.path}")


models_app = typer.Typer(help="Inspect and manage the model repository (no torch needed).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _ref(text: str):
    from service.repository import ModelRef

    try:
        return ModelRef.parse(text)
    except ValueError as exc:
        _fail(str(exc))


@models_app.command("list")
def models_list(repo: RepoOpt = None) -> None:
    """Every model with its versions and aliases."""
    repository = _repository(repo)
    names = repository.names()
    if not names:
        typer.echo(f"no models in {repository.root}")
    for name in names:
        aliases = repository.aliases(name)
        tags = {v: [a for a, av in aliases.items() if av == v] for v in repository.versions(name)}
        typer.echo(f"{name}: " + ", ".join(f"{v}" + (f" ({'/'.join(t)})" if t else "") for v, t in tags.items()))


def _get_version(ref: str, repo: Path | None):
    r = _ref(ref)
    return _repository(repo).get(r.name, r.version)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION")], repo: RepoOpt = None) -> None:
    """The manifest of a version (production by default)."""
    from service.repository import RepositoryError

    try:
        version = _get_version(ref, repo)
    except RepositoryError as exc:
        _fail(str(exc))
    typer.echo(version.manifest.model_dump_json(indent=2, exclude={"labels"}))


@models_app.command("verify")
def models_verify(ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION")], repo: RepoOpt = None) -> None:
    """Check schema and sha256 of every file; exit code 1 when verification fails."""
    from service.repository import RepositoryError

    try:
        version = _get_version(ref, repo)
    except RepositoryError as exc:
        typer.secho(f"FAILED: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"OK {version.manifest.name}:{version.manifest.version} ({len(version.manifest.files)} files verified)")


@models_app.command("promote")
def models_promote(name: str, version: int, repo: RepoOpt = None) -> None:
    """Make VERSION production; the current production becomes previous."""
    from service.repository import RepositoryError

    try:
        aliases = _repository(repo).promote(_ref(name).name, version)
    except RepositoryError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(aliases))


@models_app.command("rollback")
def models_rollback(name: str, repo: RepoOpt = None) -> None:
    """Swap production and previous."""
    from service.repository import RepositoryError

    try:
        aliases = _repository(repo).rollback(_ref(name).name)
    except RepositoryError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(aliases))


@app.command()
def batch(
    source: Annotated[str, typer.Argument(
        metavar="INPUT", help="directory (recursive), glob, or manifest (one path per line, or CSV with a path "
        "column); fsspec URLs (s3://, gs://, file://) when their filesystem package is installed")],
    model: Annotated[str, typer.Option("--model", help="NAME or NAME:VERSION (NAME: its production version)")],
    out: Annotated[Path, typer.Option("--out", help="output file; appears only when complete")],
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
) -> None:
    """Score many images offline into csv/jsonl/parquet: parallel, resumable, one row per input."""
    import sys

    from pydantic import ValidationError

    from service.batch.inputs import InputError
    from service.batch.output import JobStateError
    from service.batch.runner import BatchOptions, run_batch
    from service.repository import RepositoryError
    from service.settings import Settings

    try:
        options = BatchOptions(source=source, model=model, out=out, format=fmt, top_k=top_k, batch_size=batch_size,
                               workers=workers, chunk_size=chunk_size, ordered=ordered, resume=resume,
                               overwrite=overwrite, engine=engine, executor=executor,
                               ray_address=ray_address)
        summary = run_batch(options, Settings.from_env(model_repo=repo), show_progress=sys.stderr.isatty())
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except (InputError, JobStateError, RepositoryError, ValueError) as exc:
        _fail(str(exc))
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(summary.errors_by_kind.items())) or "none"
    typer.echo(f"{summary.total} rows -> {summary.out} ({summary.model}:{summary.version})\n"
               f"  ok {summary.ok}, error {summary.error} ({kinds})\n"
               f"  scored {summary.processed} in {summary.wall_s:.1f}s = {summary.images_per_s:.1f} img/s "
               f"({summary.engine}, {summary.workers} workers)"
               + (f"; {summary.resumed_rows} rows from the interrupted run" if summary.resumed_rows else ""))
    if fail_on_error and summary.error:
        raise typer.Exit(1)


@app.command()
def serve(
    repo: RepoOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port to listen on")] = 3000,
) -> None:
    """Serve the repository's production models over HTTP (a thin wrapper over `bentoml serve`)."""
    import os
    import sys

    from service.repository import ModelRepository
    from service.settings import Settings

    settings = Settings.from_env(model_repo=repo)
    if not ModelRepository(settings.model_repo).names():
        _fail(f"no models in {settings.model_repo}; run `imgclf bootstrap` or `imgclf export` first")
    env = {**os.environ, "IMGCLF_MODEL_REPO": str(settings.model_repo.resolve()), "BENTOML_DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "bentoml", "serve", "service.app:Classifier", "--host", host, "--port", str(port)]
    os.execvpe(command[0], command, env)


@app.command("preprocess")
def preprocess(
    image: Annotated[Path, typer.Argument(help="image file")],
    spec: Annotated[str, typer.Option(help="preprocessing spec as JSON")] = (
        '{"input_size": [224, 224], "resize_size": 256, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}'
    ),
) -> None:
    """Show what the shared preprocessing makes of an image (serving side; no torch)."""
    from service.preprocessing import ImageInputError, PreprocessSpec, image_to_tensor

    try:
        tensor = image_to_tensor(image.read_bytes(), PreprocessSpec.model_validate_json(spec))
    except (ImageInputError, ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"shape": list(tensor.shape), "mean": float(tensor.mean()), "std": float(tensor.std())}))



pipeline_app = typer.Typer(
    help="Retrain and deploy: validate data, train, evaluate against production, gate, register, promote, "
    "reload services (roll back on failure). `imgclf pipeline --name N --data DIR --holdout DIR` runs it.",
    invoke_without_command=True)
app.add_typer(pipeline_app, name="pipeline")

STATUS_COLORS = {"promoted": typer.colors.GREEN, "skipped": typer.colors.GREEN, "rejected": typer.colors.YELLOW,
                 "failed": typer.colors.RED, "rolled_back": typer.colors.RED, "running": typer.colors.BLUE}
STEP_MARKS = {"ok": "ok  ", "failed": "FAIL", "skipped": "skip", "running": "... "}


@pipeline_app.callback()
def pipeline(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="pipeline YAML (see deploy/pipeline.yaml)")] = None,
    name: Annotated[str | None, typer.Option("--name", help="model name in the repository")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="ImageFolder tree of training images")] = None,
    holdout: Annotated[Path | None, typer.Option("--holdout", help="ImageFolder tree of held-out images")] = None,
    repo: RepoOpt = None,
    arch: ArchOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    init: Annotated[str | None, typer.Option("--init", help="pretrained (the config's initial weights) or "
                                             "production (warm start from production's checkpoint)")] = None,
    service_url: Annotated[list[str] | None, typer.Option("--service-url", help="service to reload and verify "
                                                          "(repeatable; replaces the config's list)")] = None,
    admin_token: Annotated[str | None, typer.Option("--admin-token", envvar="IMGCLF_ADMIN_TOKEN",
                                                    help="bearer token of the services' POST /admin/reload",
                                                    show_default=False)] = None,
    allow_label_change: Annotated[bool, typer.Option("--allow-label-change", help="accept a label set that "
                                                     "differs from production's (a new model)")] = False,
    force: Annotated[bool, typer.Option("--force", help="run even when data and config are unchanged")] = False,
) -> None:
    """Exit codes: 0 promoted (or no changes), 1 failed or rolled back, 2 usage error, 3 rejected by the gate."""
    if ctx.invoked_subcommand is not None:
        return
    _require_training()
    from training.config import ConfigError
    from training.pipeline import run_pipeline
    from training.pipeline_config import load_pipeline_config
    from training.pipeline_record import PipelineBusyError, StepRecord

    overrides: dict[str, Any] = {k: v for k, v in (("name", name), ("data", data), ("holdout", holdout),
                                                    ("repo", repo), ("init", init)) if v is not None}
    train_overrides = _overrides(None, arch, None, None, epochs, None, None, None, seed)
    if train_overrides:
        overrides["train"] = train_overrides
    if service_url:
        overrides["deploy"] = {"service_urls": service_url}
    if allow_label_change:
        overrides["allow_label_change"] = True
    try:
        cfg = load_pipeline_config(config, overrides)
        cfg.require()
    except ConfigError as exc:
        _fail(str(exc))
    repository = _repository(cfg.repo)
    for chatty in ("onnxscript", "onnx_ir"):  # the ONNX exporter's pass-by-pass INFO lines
        logging.getLogger(chatty).setLevel(logging.WARNING)

    def show(step: StepRecord) -> None:
        color = {"ok": None, "skipped": None, "failed": typer.colors.RED}.get(step.status)
        typer.secho(f"[{STEP_MARKS[step.status]}] {step.name:<13} {step.summary} ({step.seconds or 0:.1f} s)", fg=color)

    try:
        result = run_pipeline(cfg, repository.root, admin_token=(admin_token or "").strip() or None,
                              config_file=config, force=force, on_step=show)
    except (ConfigError, PipelineBusyError) as exc:
        _fail(str(exc))
    record = result.record
    typer.secho(f"{record.status}: {record.reason}", fg=STATUS_COLORS.get(record.status), bold=True)
    typer.echo(f"run record: {result.path}")
    raise typer.Exit(result.exit_code)


@pipeline_app.command("history")
def pipeline_history(
    repo: RepoOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="only this model")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the full records, as a JSON list")] = False,
) -> None:
    """Past pipeline runs, oldest first: outcome, versions, held-out top-1 of both models, why."""
    from training.pipeline_record import read_records

    if name is not None:
        _ref(name)
    records = read_records(_repository(repo).root, name)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    if not records:
        typer.echo("no pipeline runs recorded")
        return
    for r in records:
        before, after = r.versions.get("before", {}), r.versions.get("after", {})
        cand, prod = r.metrics.get("candidate"), r.metrics.get("production")
        top1 = (f"top-1 {cand['top1']:.4f}" if cand else "top-1 -") + (f" vs {prod['top1']:.4f}" if prod else "")
        typer.secho(f"{r.run_id}  {r.name:<16} {r.status:<11}", fg=STATUS_COLORS.get(r.status), nl=False)
        typer.echo(f" v{before.get('production', '-')} -> v{after.get('production', '-')}  {top1:<24} "
                   f"{r.timings.get('total', 0):6.1f} s  {r.reason}")


if __name__ == "__main__":
    app()
