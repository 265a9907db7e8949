"""Run records: one JSON file per pipeline run, inside the model repository, written atomically.

    <repo>/.pipeline/<name>/<run_id>.json     the record, rewritten after every step
    <repo>/.pipeline/<name>/runs/<run_id>/    the training run (default work_dir)
    <repo>/.pipeline/<name>/.lock             one pipeline run per model at a time

The folder starts with a dot: ``ModelRepository.names()`` (and so the service) skips it, and no
model can be called that (names start with a letter or digit). No torch here, so
``imgclf pipeline history`` runs in a serving-only install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from service.atomic import LockBusyError, atomic_path, atomic_write_text, file_lock
from service.repository import ModelVersion

log = logging.getLogger(__name__)

RECORDS_DIR = ".pipeline"
Status = Literal["running", "promoted", "rejected", "skipped", "failed", "rolled_back"]
StepStatus = Literal["running", "ok", "failed", "skipped"]
# promoted/skipped: 0; failed or rolled back: 1; a usage error: 2 (no record); rejected by the gate: 3
EXIT_CODES: dict[str, int] = {"promoted": 0, "skipped": 0, "failed": 1, "rolled_back": 1, "rejected": 3}


class PipelineBusyError(LockBusyError):
    """Another pipeline run holds this model's lock."""


class StepRecord(BaseModel):
    name: str
    status: StepStatus = "running"
    started_at: datetime
    seconds: float | None = None
    summary: str = ""


class RunRecord(BaseModel):
    schema_version: Literal[1] = 1
    run_id: str
    name: str
    status: Status = "running"
    reason: str = ""
    exit_code: int | None = None
    started_at: datetime
    finished_at: datetime | None = None
    inputs: dict[str, Any] = Field(default_factory=dict, description="data, holdout, config file, resolved config")
    fingerprints: dict[str, str] = Field(default_factory=dict, description="data, holdout, config, run")
    versions: dict[str, Any] = Field(default_factory=dict, description="aliases before and after, the candidate")
    steps: list[StepRecord] = Field(default_factory=list)
    validation: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="candidate and production on the held-out set")
    gate: dict[str, Any] | None = None
    deploy: dict[str, Any] | None = None
    rollout: dict[str, Any] | None = Field(default=None, description="canary or shadow rollout: the stats per role, "
                                           "the checks, the decision, the plot (training.pipeline.rollout)")
    error: str | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step, and total")


def records_dir(repo_root: Path, name: str) -> Path:
    return Path(repo_root) / RECORDS_DIR / name


def new_run_id(now: datetime | None = None) -> str:
    import secrets

    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def write_record(repo_root: Path, record: RunRecord) -> Path:
    path = records_dir(repo_root, record.name) / f"{record.run_id}.json"
    atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
    return path


def read_records(repo_root: Path, name: str | None = None) -> list[RunRecord]:
    """Every readable record (of one model, or all), oldest first; unreadable files are logged, skipped."""
    base = Path(repo_root) / RECORDS_DIR
    if not base.is_dir():
        return []
    folders = [base / name] if name else sorted(p for p in base.iterdir() if p.is_dir())
    out = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            try:
                out.append(RunRecord.model_validate_json(path.read_text()))
            except (OSError, ValidationError, json.JSONDecodeError) as exc:
                log.warning("skipping unreadable run record %s: %s", path, exc)
    return sorted(out, key=lambda r: r.started_at)


def run_that_made(repo_root: Path, name: str, version: int) -> RunRecord | None:
    """The (latest) promoted run whose candidate became ``version``; None if no run of this pipeline made it."""
    made = [r for r in read_records(repo_root, name) if r.status == "promoted" and r.versions.get("candidate") == version]
    return made[-1] if made else None


def checkpoints_of(repo_root: Path, name: str, version: int) -> list[Path]:
    """The best checkpoints of the runs whose candidate became ``version`` (a warm start needs one)."""
    return [Path(repo_root) / r.training["run_dir"] / "checkpoints" / "best.pt" for r in read_records(repo_root, name)
            if r.versions.get("candidate") == version and r.training and r.training.get("run_dir")]


def in_repo(repo_root: Path, path: Path) -> str:
    """A path inside the repository is recorded relative to it (the repository may be mounted elsewhere)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path(repo_root).resolve()))
    return str(Path(path).resolve())


def warm_start(repo_root: Path, production: ModelVersion | None, init: str,
               labels_changed: bool) -> tuple[Path | None, str]:
    """The checkpoint a run starts from (None: the training config's own weights) and how to say so.

    ``init: production`` continues from the checkpoint that made the production version, found in the
    run records or the manifest's training run; it is refused, not silently replaced, when none is left.
    """
    own = "the training config's initial weights"
    if init == "pretrained":
        return None, own
    if production is None:
        return None, f"{own} (init: production, but there is no production version yet)"
    if labels_changed:
        return None, f"{own} (init: production, but the label set changed)"
    name, version = production.manifest.name, production.manifest.version
    candidates = checkpoints_of(repo_root, name, version)
    if production.manifest.training.run_dir:
        candidates.append(Path(production.manifest.training.run_dir) / "checkpoints" / "best.pt")
    for path in candidates:
        if path.is_file():
            return path, f"warm start from production {name}:{version} ({in_repo(repo_root, path)})"
    raise StopRun("failed", f"init: production needs the checkpoint of {name}:{version}, but none is left "
                          f"(looked at {[str(p) for p in candidates] or 'nothing'}); use init: pretrained")


@contextlib.contextmanager
def run_lock(repo_root: Path, name: str) -> Iterator[None]:
    """One run per model at a time: a second one fails at once rather than waiting behind the first."""
    lock = records_dir(repo_root, name) / ".lock"
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(lock, wait=False))
    except LockBusyError:
        raise PipelineBusyError(f"another pipeline run for {name!r} is in progress ({lock})") from None
    with held:
        yield


class StopRun(Exception):
    """Ends the run with a status and a reason (not an error of the pipeline itself)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Recorder:
    """A run's record on disk, rewritten as each step starts and ends: a crash leaves how far it got."""

    repo_root: Path
    record: RunRecord
    on_step: Callable[[StepRecord], None] | None = None
    started: float = field(default_factory=time.monotonic)
    path: Path | None = None

    def save(self) -> Path:
        self.path = write_record(self.repo_root, self.record)
        return self.path

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        """One step: ok when the body returns (unless it set another status), failed when it raises."""
        step = StepRecord(name=name, started_at=datetime.now(UTC))
        self.record.steps.append(step)
        self.save()
        began = time.monotonic()
        log.info("step %s", name)
        try:
            yield step
        except BaseException as exc:
            step.status = "failed"
            step.summary = step.summary or (exc.reason if isinstance(exc, StopRun) else f"{type(exc).__name__}: {exc}")
            raise
        else:
            if step.status == "running":
                step.status = "ok"
        finally:
            step.seconds = time.monotonic() - began
            self.record.timings[name] = step.seconds
            self.save()
            if self.on_step is not None:
                self.on_step(step)

    def finish(self) -> Path:
        """The run is over, whatever its status: the exit code and the total time, written."""
        self.record.finished_at = datetime.now(UTC)
        self.record.exit_code = EXIT_CODES.get(self.record.status, 1)
        self.record.timings["total"] = time.monotonic() - self.started
        return self.save()


def rollout_plot(report: dict[str, Any], path: Path) -> Path:
    """Production beside the candidate, as a rollout measured them (a ``RolloutReport`` dumped): rates,
    p99 latency against its limit, and the shadow agreement against its floor, so the failing check shows.

    Beside the training run's learning curves; matplotlib is imported here only (history needs no plots).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats, checks = report["stats"], {c["name"]: c for c in report["decision"]["checks"]}
    roles = [(f"production v{report['production_version']}", stats["production"], "tab:blue"),
             (f"{stats['mode']} v{report['candidate_version']}", stats["candidate"], "tab:orange")]
    panels = 3 if stats.get("shadow") else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4))
    rates = ("abstention_rate", "error_rate", "mean_top1_score")
    for i, (label, role, color) in enumerate(roles):
        axes[0].bar([r + 0.4 * i for r in range(len(rates))], [role[k] or 0 for k in rates], 0.4, label=label,
                    color=color)
        axes[1].bar(i, (role["p99_seconds"] or 0) * 1000, 0.6, label=label, color=color)
    axes[0].set(xticks=[r + 0.2 for r in range(len(rates))], xticklabels=["abstention", "errors", "mean top-1"],
                ylim=(0, 1), title="Rates")
    axes[0].legend(fontsize=8)
    p99_limit = (stats["production"]["p99_seconds"] or 0) * checks["latency_ratio"]["limit"] * 1000
    axes[1].axhline(p99_limit, color="red", linestyle="--", label=f"limit (x{checks['latency_ratio']['limit']:g})")
    axes[1].set(xticks=[0, 1], xticklabels=[r[0] for r in roles], ylabel="ms per image", title="p99 latency")
    axes[1].legend(fontsize=8)
    if stats.get("shadow"):
        agreement = checks["agreement"]
        axes[2].bar(0, agreement["value"] or 0, 0.6, color="tab:orange")
        axes[2].axhline(agreement["limit"], color="red", linestyle="--", label=f"floor {agreement['limit']:g}")
        axes[2].set(xticks=[0], xticklabels=[f"{stats['shadow']['compared']:.0f} compared"], ylim=(0, 1),
                    title="Top-1 agreement with production")
        axes[2].legend(fontsize=8)
    verdict = "promoted" if report["decision"]["promote"] else "rolled back"
    fig.suptitle(f"{stats['mode']} rollout, weight {stats['weight']:g}: {verdict}", y=1.03)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
