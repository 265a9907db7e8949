"""Retrain and deploy: one call of :func:`run_pipeline` is one run, its steps in this order.

Every step is written to the run record as it finishes (``training.pipeline.record``), so a
crash leaves a record that says how far it got. The methods of ``_Run`` follow the same order.

1. validate: counts, unreadable files, train/held-out duplicates, label set vs production's
   (``training.pipeline.data``); the data and config fingerprints.
2. changes: a run whose data and config equal those of the run that produced the current
   production version stops here (skipped: no changes), unless forced.
3. train: ``training.train.train`` with the config's recipe, from the config's initial weights or
   warm-started from production's checkpoint (``init``; ``training.pipeline.record.warm_start``),
   in ``train.nproc`` processes (``training.launch``, as ``imgclf train --nproc``).
4. export_checks: ``training.export.prepare`` (ONNX export and every export check; parity images
   from the validation split, then the held-out set), nothing registered yet.
5. evaluate: candidate and production on the same held-out images through ONNX Runtime and
   ``image_to_tensor``: top-1, top-5, recall per class, ECE at each model's own temperature
   (``training.pipeline.metrics``).
6. gate: ``training.pipeline.gate.decide``.
7. register: the exact bytes that were checked and evaluated (sha256), else nothing.
8. rollout (with ``rollout`` in the config): canary or shadow beside production on the replicas until
   their metrics decide (``training.pipeline.rollout``); then promote: ``Repository.promote``
   (verifies, then switches the alias atomically; ends the rollout), or the run is rolled back.
9. deploy: reload each ``--service-url`` and verify the new version answers the smoke image as
   the evaluation did (``training.pipeline.deploy``); on any failure, rollback: the alias goes
   back, the services reload again, and the run fails.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.repository import (
    PRODUCTION,
    ModelVersion,
    Repository,
    RepositoryError,
    open_repository,
)
from training.config import ConfigError
from training.data import DataError
from training.export import Candidate, ExportError, from_run, prepare, register
from training.launch import LaunchError, run_training
from training.pipeline.config import PipelineConfig
from training.pipeline.data import ValidatedData, validate_data
from training.pipeline.deploy import ServiceCheck, SmokeCheck, reload_and_verify
from training.pipeline.gate import GateDecision, decide
from training.pipeline.metrics import candidate_metrics, production_metrics, selective_summary
from training.pipeline.record import (
    EXIT_CODES,
    Recorder,
    RunRecord,
    StepRecord,
    StopRun,
    in_repo,
    new_run_id,
    records_dir,
    run_lock,
    run_that_made,
    warm_start,
)
from training.pipeline.rollout import rollout_step, trial

log = logging.getLogger(__name__)


@dataclass
class PipelineHooks:
    """Seams for tests and operators; production runs set none."""

    before_register: Callable[[Path], None] | None = None  # the checked candidate file, about to be registered
    after_register: Callable[[ModelVersion], None] | None = None  # registered, not promoted yet


@dataclass
class PipelineResult:
    record: RunRecord
    path: Path

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.record.status, 1)


@dataclass
class _Run:
    cfg: PipelineConfig
    repo: Repository
    name: str
    data: Path
    holdout: Path
    admin_token: str | None
    hooks: PipelineHooks
    rec: Recorder

    @property
    def record(self) -> RunRecord:
        return self.rec.record

    def _rel(self, path: Path) -> str:
        return in_repo(self.repo.root, path)

    # --- the steps ---------------------------------------------------------------------------------
    def production(self) -> ModelVersion | None:
        if self.name not in self.repo.names() or PRODUCTION not in self.repo.aliases(self.name):
            return None
        try:
            return self.repo.get(self.name)
        except RepositoryError as exc:
            raise StopRun("failed", f"production {self.name} cannot be read: {exc}") from exc

    def validate(self, production: ModelVersion | None) -> ValidatedData:
        with self.rec.step("validate") as step:
            labels = production.manifest.labels if production else None
            validated = validate_data(self.data, self.holdout, self.cfg.validation, labels, self.cfg.allow_label_change,
                                      self.cfg.more_data)
            self.record.validation = validated.report
            self.record.fingerprints = {"data": validated.fingerprint("train"),
                                        "holdout": validated.fingerprint("holdout"), "config": self.cfg.fingerprint()}
            self.record.fingerprints["run"] = _combine(self.record.fingerprints)
            step.summary = validated.summary()
            if validated.problems:
                raise StopRun("failed", "data validation failed: " + "; ".join(validated.problems))
        return validated

    def check_changes(self, production: ModelVersion | None, force: bool) -> None:
        unchanged = False
        with self.rec.step("changes") as step:
            fp = self.record.fingerprints["run"]
            source = run_that_made(self.repo.root, self.name, production.manifest.version) if production else None
            if source is None:
                step.summary = "production was not made by this pipeline" if production else "no production yet"
            elif source.fingerprints.get("run") != fp:
                changed = [k for k in ("data", "holdout", "config")
                           if source.fingerprints.get(k) != self.record.fingerprints[k]]
                step.summary = f"changed since run {source.run_id} (production v{production.manifest.version}): " \
                               + ", ".join(changed)
            elif force:
                step.summary = f"no changes since run {source.run_id}; --force: running anyway"
            else:
                step.summary = (f"no changes: data and config fingerprints equal those of run {source.run_id}, which "
                                f"made production {self.name}:{production.manifest.version}")
                unchanged = True
        if unchanged:
            raise StopRun("skipped", step.summary)

    def train(self, validated: ValidatedData, production: ModelVersion | None, labels_changed: bool) -> Path:
        with self.rec.step("train") as step:
            work = Path(self.cfg.work_dir) if self.cfg.work_dir else records_dir(self.repo.root, self.name) / "runs"
            run_dir = (work / self.record.run_id).resolve()
            source = validated.write_manifest(run_dir / "pipeline-data.csv")
            tcfg = self.cfg.train_config(source)
            init, described = warm_start(self.repo.root, production, self.cfg.init, labels_changed)
            self.record.training = {"run_dir": self._rel(run_dir), "init": described, "nproc": self.cfg.nproc,
                                    "config": tcfg.model_dump(mode="json")}
            self.rec.save()
            report = run_training(tcfg, run_dir, nproc=self.cfg.nproc, init_weights=init)
            self.record.training |= {k: report[k] for k in ("top1", "top5", "best_epoch", "epochs_run", "train_seconds")}
            step.summary = (f"{tcfg.model.arch}, {report['epochs_run']} epochs from {described}: validation top-1 "
                            f"{report['top1']:.4f} (best epoch {report['best_epoch']})")
        return run_dir

    def export_checks(self, validated: ValidatedData, run_dir: Path) -> tuple[Candidate | None, str | None]:
        with self.rec.step("export_checks") as step:
            # Parity needs real images, not validation ones: a small validation split borrows held-out images.
            source = from_run(run_dir, more_check_images=[("held-out", validated.holdout_samples(validated.classes))])
            try:
                candidate = prepare(source, _fresh(run_dir / "candidate"), precision=self.cfg.export.precision,
                                    max_top1_drop=self.cfg.export.max_top1_drop,
                                    target_precision=self.cfg.export.target_precision)
            except ExportError as exc:
                step.status, step.summary = "failed", f"export checks failed: {exc}"
                return None, str(exc)
            parity = candidate.parity
            assert parity is not None  # prepare always measures it
            self.record.export = {"file": self._rel(candidate.path), "sha256": candidate.sha256,
                                  "exporter": candidate.exporter, "precision": candidate.precision,
                                  "parity": parity.model_dump(mode="json"), "quantization": candidate.quantization,
                                  "variants": [v.model_dump(mode="json") for v, _, _ in candidate.variants],
                                  "temperature": (candidate.report or {}).get("temperature", 1.0),
                                  "selective": candidate.measured.selective.model_dump(mode="json")
                                  if candidate.measured else None}
            images = ", ".join(f"{n} {name}" for name, n in parity.image_sources.items())
            step.summary = (f"{candidate.exporter} exporter, {candidate.precision}: every check passed (max |logit "
                            f"diff| vs PyTorch {max(parity.max_abs_logit_diff.values()):.1e}, limit "
                            f"{parity.tolerance:.1e}, on {parity.images} images: {images})")
        return candidate, None

    def evaluate(self, validated: ValidatedData, candidate: Candidate | None, production: ModelVersion | None,
                 labels_changed: bool) -> SmokeCheck | None:
        smoke = None
        with self.rec.step("evaluate") as step:
            parts = []
            if candidate is not None:
                self.record.metrics["candidate"], smoke = candidate_metrics(candidate, validated)
                self.record.metrics["smoke"] = smoke.describe() if smoke else None
                parts.append(f"candidate top-1 {self.record.metrics['candidate']['top1']:.4f}"
                             + selective_summary(self.record.metrics["candidate"]["selective"]))
            if production is not None and not labels_changed:
                self.record.metrics["production"] = production_metrics(production, validated)
                parts.append(f"production v{production.manifest.version} top-1 "
                             f"{self.record.metrics['production']['top1']:.4f}")
            step.summary = ", ".join(parts) + f" on {len(validated.holdout)} held-out images" if parts else "nothing"
        return smoke

    def gate(self, export_error: str | None, labels_changed: bool) -> GateDecision:
        with self.rec.step("gate") as step:
            decision = decide(self.cfg.gate, self.record.metrics.get("candidate"), self.record.metrics.get("production"),
                              export_error=export_error, label_set_changed=labels_changed)
            self.record.gate = decision.model_dump(mode="json")
            step.summary = decision.reason
            if not decision.passed:
                raise StopRun("rejected", decision.reason)
        return decision

    def register(self, candidate: Candidate) -> ModelVersion:
        with self.rec.step("register") as step:
            if self.hooks.before_register:
                self.hooks.before_register(candidate.path)
            try:
                version = register(self.repo, self.name, candidate)
            except (ExportError, RepositoryError) as exc:
                raise StopRun("failed", f"registration refused: {exc}") from exc
            self.record.versions["candidate"] = version.manifest.version
            if self.hooks.after_register:
                self.hooks.after_register(version)
            step.summary = f"{self.name}:{version.manifest.version} (sha256 {candidate.sha256[:12]}..., the checked file)"
        return version

    def promote(self, version: int) -> None:
        with self.rec.step("promote") as step:
            try:
                self.record.versions["after"] = self.repo.promote(self.name, version)
            except RepositoryError as exc:
                raise StopRun("failed", f"promotion refused: {exc}") from exc
            step.summary = f"production -> {self.name}:{version} (previous: " \
                           f"{self.record.versions['after'].get('previous', 'none')})"

    def deploy(self, version: int, smoke: SmokeCheck | None) -> None:
        urls = self.cfg.deploy.service_urls
        failure = None
        with self.rec.step("deploy") as step:
            if not urls:
                step.status = "skipped"
                step.summary = "no --service-url: services serve the new production on their next reload or restart"
                return
            try:
                checks = reload_and_verify(urls, self.admin_token, self.name, version, self.cfg.deploy, smoke)
                failure = "; ".join(f"{c.url}: {c.reason}" for c in checks if not c.ok) or None
            except Exception as exc:  # noqa: BLE001 - whatever broke, the alias must go back
                checks, failure = [], f"deploy crashed: {exc!r}"
            self.record.deploy = {"smoke": smoke.describe() if smoke else None, "services": _dump(checks)}
            if failure:
                step.status, step.summary = "failed", failure
            else:
                step.summary = "; ".join(f"{c.url}: {c.reason}" for c in checks)
        if failure:
            self.roll_back(version, failure)

    def roll_back(self, version: int, failure: str) -> None:
        before = self.record.versions["before"].get(PRODUCTION)
        with self.rec.step("rollback") as step:
            current = self.repo.aliases(self.name).get(PRODUCTION)
            if current != version:
                step.status = "failed"
                step.summary = f"production is {current} now, not {version}: someone else changed it; left alone"
            elif before is None:
                self.record.versions["after"] = self.repo.demote(self.name)
                step.summary = (f"{self.name} had no production version before this run: the production alias is "
                                f"removed again (a service that loaded {self.name}:{version} keeps it until restarted)")
            else:
                self.record.versions["after"] = self.repo.rollback(self.name)
                checks = reload_and_verify(self.cfg.deploy.service_urls, self.admin_token, self.name, before,
                                           self.cfg.deploy, None)
                (self.record.deploy or {})["after_rollback"] = _dump(checks)
                back = all(c.ok for c in checks)
                step.summary = f"production -> {self.name}:{before} again; services " + (
                    "serve it again" if back else "NOT all back: " + "; ".join(c.reason for c in checks if not c.ok))
                if not back:
                    step.status = "failed"
        raise StopRun("rolled_back", f"deploy failed ({failure}); {step.summary}")

    # --- the run -------------------------------------------------------------------------------------
    def execute(self, force: bool) -> None:
        production = self.production()
        validated = self.validate(production)
        self.check_changes(production, force)
        labels_changed = bool(production) and not validated.report["labels"].get("same_as_production", True)
        run_dir = self.train(validated, production, labels_changed)
        candidate, export_error = self.export_checks(validated, run_dir)
        smoke = self.evaluate(validated, candidate, production, labels_changed)
        decision = self.gate(export_error, labels_changed)
        assert candidate is not None  # the gate refuses a candidate that failed its export checks
        version = self.register(candidate).manifest.version
        rolled = ""
        if self.cfg.rollout is None:
            self.promote(version)
        else:
            with trial(self.repo, self.name, version):  # whatever happens, no candidate is left on trial
                rolled = rollout_step(self.rec, self.repo, self.cfg.rollout, version, production, run_dir)
                self.promote(version)
        self.deploy(version, smoke)
        self.record.reason = decision.reason + rolled + (f"; {self.name}:{version} is production" + (
            " and every service serves it" if self.cfg.deploy.service_urls else ""))
        self.record.status = "promoted"


def _combine(fingerprints: dict[str, str]) -> str:
    return hashlib.sha256("|".join(fingerprints[k] for k in ("data", "holdout", "config")).encode()).hexdigest()


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dump(checks: list[ServiceCheck]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json") for c in checks]


def run_pipeline(
    cfg: PipelineConfig,
    repo_root: Path | str | Repository,
    *,
    admin_token: str | None = None,
    config_file: Path | None = None,
    force: bool = False,
    hooks: PipelineHooks | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> PipelineResult:
    """One run; the outcome is in ``result.record.status`` (never raises for a refused candidate or
    bad data; raises ConfigError for a config that cannot run and PipelineBusyError when another
    run holds the model's lock)."""
    name, data, holdout = cfg.require()
    if cfg.deploy.service_urls and not admin_token:
        raise ConfigError("deploying to --service-url needs the services' admin token: --admin-token or "
                          "IMGCLF_ADMIN_TOKEN")
    repo = repo_root if isinstance(repo_root, Repository) else open_repository(repo_root)
    before = repo.aliases(name) if name in repo.names() else {}
    record = RunRecord(
        run_id=new_run_id(), name=name, started_at=datetime.now(UTC),
        inputs={"data": str(Path(data).resolve()), "holdout": str(Path(holdout).resolve()),
                "more_data": [str(Path(p).resolve()) for p in cfg.more_data],
                "config_file": str(config_file) if config_file else None, "repo": repo.location if "://" in repo.location else str(Path(repo.location).resolve()),
                "config": cfg.model_dump(mode="json"), "admin_token": "given" if admin_token else "none",
                "force": force},
        versions={"before": before, "after": before, "candidate": None},
    )
    with run_lock(repo.root, name):
        rec = Recorder(repo.root, record, on_step)
        rec.save()
        run = _Run(cfg, repo, name, Path(data), Path(holdout), admin_token, hooks or PipelineHooks(), rec)
        try:
            run.execute(force)
        except StopRun as stop:
            record.status, record.reason = stop.status, stop.reason
        except (ConfigError, DataError, ExportError, RepositoryError, FileNotFoundError, ValueError, LaunchError) as exc:
            record.status, record.reason, record.error = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
        except BaseException as exc:
            record.status, record.reason, record.error = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
            raise
        finally:
            path = rec.finish()
            log.info("pipeline %s: %s (%s)", record.run_id, record.status, record.reason)
    return PipelineResult(record, path)
