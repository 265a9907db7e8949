"""``imgclf pipeline``: retrain and deploy (train extra), and ``imgclf pipeline history`` (no torch)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imgclf.cli.common import (
    ArchOpt,
    EpochsOpt,
    RepoOpt,
    SeedOpt,
    model_ref,
    repository,
    require_training,
    settings,
    train_overrides,
)

if TYPE_CHECKING:
    from training.pipeline.record import StepRecord

pipeline_app = typer.Typer(
    help="Retrain and deploy: validate data, train, evaluate against production, gate, register, (with --rollout: "
    "canary or shadow on the replicas until their metrics decide), promote, "
    "reload services (roll back on failure). `imgclf pipeline --name N --data DIR --holdout DIR` runs it.",
    invoke_without_command=True)

STATUS_COLORS = {"promoted": typer.colors.GREEN, "skipped": typer.colors.GREEN, "rejected": typer.colors.YELLOW,
                 "failed": typer.colors.RED, "rolled_back": typer.colors.RED, "running": typer.colors.BLUE}
STEP_MARKS = {"ok": "ok  ", "failed": "FAIL", "skipped": "skip", "running": "... "}

RolloutOpt = Annotated[str | None, typer.Option(
    "--rollout", help="canary or shadow: roll the candidate out beside production on the --replica servers, "
    "promoted only if their metrics agree (rollout.mode)")]
ReplicaOpt = Annotated[list[str] | None, typer.Option(
    "--replica", help="base URL of a serving replica whose /metrics decide the rollout (repeatable; replaces "
    "rollout.replicas)")]
RolloutWeightOpt = Annotated[float | None, typer.Option(
    "--rollout-weight", help="share of the requests the canary answers or the shadow scores (rollout.weight)")]


def _given(**flags: Any) -> dict[str, Any]:
    """The flags that were given (None: not given; 0 is a value the config must see and may refuse)."""
    return {k: v for k, v in flags.items() if v is not None}


def admin_token(flag: str | None) -> str | None:
    """--admin-token, else IMGCLF_ADMIN_TOKEN read through Settings (its one reader); blank means none."""
    token = settings(("admin_token",), admin_token=flag).admin_token
    return (token.get_secret_value().strip() or None) if token is not None else None


def show_step(step: StepRecord) -> None:
    color = {"ok": None, "skipped": None, "failed": typer.colors.RED}.get(step.status)
    typer.secho(f"[{STEP_MARKS[step.status]}] {step.name:<13} {step.summary} ({step.seconds or 0:.1f} s)", fg=color)


@pipeline_app.callback()
def pipeline(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="pipeline YAML (see deploy/pipeline.yaml)")] = None,
    name: Annotated[str | None, typer.Option("--name", help="model name in the repository")] = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="ImageFolder tree of training images; "
                                                    "repeat it to merge more trees, e.g. a corrected "
                                                    "`imgclf samples export` tree")] = None,
    holdout: Annotated[Path | None, typer.Option("--holdout", help="ImageFolder tree of held-out images")] = None,
    repo: RepoOpt = None,
    arch: ArchOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, help="training processes on this machine "
                                              "(train.nproc; as imgclf train --nproc)")] = None,
    init: Annotated[str | None, typer.Option("--init", help="pretrained (the config's initial weights) or "
                                             "production (warm start from production's checkpoint)")] = None,
    service_url: Annotated[list[str] | None, typer.Option("--service-url", help="service to reload and verify "
                                                          "(repeatable; replaces the config's list)")] = None,
    token: Annotated[str | None, typer.Option("--admin-token", help="bearer token of the services' POST "
                                              "/admin/reload (default: $IMGCLF_ADMIN_TOKEN)",
                                              show_default=False)] = None,
    rollout: RolloutOpt = None,
    replica: ReplicaOpt = None,
    rollout_weight: RolloutWeightOpt = None,
    allow_label_change: Annotated[bool, typer.Option("--allow-label-change", help="accept a label set that "
                                                     "differs from production's (a new model)")] = False,
    force: Annotated[bool, typer.Option("--force", help="run even when data and config are unchanged")] = False,
) -> None:
    """Exit codes: 0 promoted (or no changes), 1 failed or rolled back, 2 usage error, 3 rejected by the gate."""
    if ctx.invoked_subcommand is not None:
        return
    require_training()
    from training.pipeline.config import load_pipeline_config
    from training.pipeline.run import run_pipeline

    first, more = (data[0], data[1:]) if data else (None, [])
    overrides: dict[str, Any] = {k: v for k, v in (("name", name), ("data", first), ("holdout", holdout),
                                                    ("repo", repo), ("init", init)) if v is not None}
    if more:
        overrides["more_data"] = more
    train = train_overrides(arch=arch, epochs=epochs, seed=seed) | ({"nproc": nproc} if nproc else {})
    if train:
        overrides["train"] = train
    if service_url:
        overrides["deploy"] = {"service_urls": service_url}
    if allow_label_change:
        overrides["allow_label_change"] = True
    if trial := _given(mode=rollout, replicas=replica, weight=rollout_weight):
        overrides["rollout"] = trial
    cfg = load_pipeline_config(config, overrides)  # ConfigError: a user error
    cfg.require()
    target = repository(cfg.repo, must_exist=False)  # a folder, or a URL through its local cache
    secret = admin_token(token)
    for chatty in ("onnxscript", "onnx_ir"):  # the ONNX exporter's pass-by-pass INFO lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    result = run_pipeline(cfg, target, admin_token=secret, config_file=config, force=force, on_step=show_step)
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
    from training.pipeline.record import read_records

    if name is not None:
        model_ref(name)
    records = read_records(repository(repo, must_exist=False).root, name)
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
