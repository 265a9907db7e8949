"""The rollout stage: a registered candidate on trial beside production, promoted only if live traffic agrees.

:func:`roll_out` reads every replica's ``/metrics`` (the baseline), starts the rollout in the repository
(``start_rollout``: each replica sends ``weight`` of the requests that name no version to the canary, or
shadow-scores that share off the request path), reads again every ``poll_s`` until the candidate has
``min_answers`` answers over all replicas or ``timeout_s`` passes, and :func:`decide` s on the deltas
(``training.pipeline.rollout_stats``). The caller then promotes (which ends the rollout) or ends it and
rolls back, inside :func:`trial`, which ends the rollout whatever happened in between: no candidate is
ever left half rolled out. Like the gate, the decision keeps every check with the numbers that decided it.
:func:`rollout_step` is the pipeline's step: the report and its plot go into the run record.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel

from service.repository import ModelVersion, RepositoryError, Rollout
from training.pipeline.config import RolloutConfig
from training.pipeline.record import Recorder, StopRun, in_repo, rollout_plot
from training.pipeline.rollout_stats import RoleStats, RolloutStats, ShadowStats, Watcher

__all__ = ["Check", "RoleStats", "RolloutDecision", "RolloutError", "RolloutReport", "RolloutStats", "ShadowStats",
           "decide", "end_trial", "roll_out", "rollout_step", "trial"]

log = logging.getLogger(__name__)

EPS = 1e-9  # a rate equal to its limit passes, whatever the float rounding
PROGRESS_EVERY_S = 30.0


class RolloutError(Exception):
    """The rollout could not start: no replica's /metrics answered. Nothing was changed."""


class RolloutRepository(Protocol):
    """What the stage needs of a model repository (the local folder and the object store alike)."""

    def start_rollout(self, name: str, version: int, mode: Literal["canary", "shadow"], weight: float) -> object: ...

    def end_rollout(self, name: str) -> object: ...

    def rollout(self, name: str) -> Rollout | None: ...


class Check(BaseModel):
    name: str
    value: float | None  # None: could not be measured (and so the check fails)
    limit: float
    ok: bool
    detail: str  # the sentence the reason quotes


class RolloutDecision(BaseModel):
    promote: bool
    reason: str  # "promoted: ..." or "rolled back: ...", with the numbers
    checks: list[Check]


class RolloutReport(BaseModel):
    """What the run record keeps of a rollout (``record.rollout``)."""

    production_version: int
    candidate_version: int
    stats: RolloutStats
    decision: RolloutDecision


# --- the decision ------------------------------------------------------------------------------------------
def _cmp(ok: bool, op: str) -> str:
    return op if ok else {">=": "<", "<=": ">"}[op]


def _at_least(name: str, value: float | None, limit: float, what: str, unmeasured: str) -> Check:
    ok = value is not None and value + EPS >= limit
    detail = unmeasured if value is None else f"{what} {value:.3f} {_cmp(ok, '>=')} {limit:g}"
    return Check(name=name, value=value, limit=limit, ok=ok, detail=detail)


def _at_most(name: str, value: float | None, limit: float, what: str, unmeasured: str) -> Check:
    ok = value is not None and value <= limit + EPS
    detail = unmeasured if value is None else f"{what} {value:.3f} {_cmp(ok, '<=')} {limit:g}"
    return Check(name=name, value=value, limit=limit, ok=ok, detail=detail)


def _quality_checks(stats: RolloutStats, cfg: RolloutConfig) -> list[Check]:
    """Agreement (shadow), abstention increase, p99 latency ratio, error rate: candidate against production."""
    prod, cand = stats.production, stats.candidate
    silent = "the candidate answered nothing" if cand.answers <= 0 else "production answered nothing to compare with"
    checks = []
    if stats.shadow is not None:
        checks.append(_at_least("agreement", stats.shadow.agreement, cfg.min_agreement,
                                "top-1 agreement with production", "no shadowed answer was compared with production"))
    rates = (cand.abstention_rate, prod.abstention_rate)
    increase = None if None in rates else rates[0] - rates[1]  # type: ignore[operator]
    checks.append(_at_most("abstention_increase", increase, cfg.max_abstention_increase,
                           f"abstention rate {_pct(rates[0])} vs production {_pct(rates[1])}: increase",
                           f"abstention not measured: {silent}"))
    p99s = (cand.p99_seconds, prod.p99_seconds)
    ratio = None if None in p99s or not p99s[1] else p99s[0] / p99s[1]  # type: ignore[operator]
    checks.append(_at_most("latency_ratio", ratio, cfg.max_latency_ratio,
                           f"p99 {_ms(p99s[0])} vs production {_ms(p99s[1])}: ratio",
                           f"p99 latency ratio not measured: {silent}"))
    checks.append(_at_most("error_rate", cand.error_rate, cfg.max_error_rate, "candidate error rate",
                           "error rate not measured: the candidate scored no image"))
    return checks


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3f}"


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def decide(stats: RolloutStats, cfg: RolloutConfig) -> RolloutDecision:
    """Promote when enough candidate answers arrived and every threshold holds; else roll back, saying why."""
    reachable = [r for r in stats.replicas if r.reachable]
    replicas = Check(name="replicas", value=len(reachable), limit=1, ok=bool(reachable),
                     detail=f"{len(reachable)} of {len(stats.replicas)} replicas' /metrics read" if reachable else
                     "no replica's /metrics answered (" + "; ".join(f"{r.url}: {r.error}" for r in stats.replicas)
                     + "): check that the replicas are up and rollout.replicas lists them")
    n = stats.candidate_answers
    answers = Check(name="answers", value=n, limit=cfg.min_answers, ok=n >= cfg.min_answers,
                    detail=f"{n:.0f} {stats.unit}" if n >= cfg.min_answers else
                    f"only {n:.0f} of the {cfg.min_answers} {stats.unit} needed arrived in {_secs(stats.seconds)} "
                    f"(rollout.timeout_s {cfg.timeout_s:g}): raise rollout.weight or rollout.timeout_s, or check "
                    "that the replicas poll the repository and get requests that name no version")
    quality = _quality_checks(stats, cfg)
    checks = [replicas, answers, *quality]
    over = f" over {n:.0f} {stats.unit} in {_secs(stats.seconds)}"
    if not replicas.ok or not answers.ok:  # too few answers: the rates say nothing yet
        return RolloutDecision(promote=False, checks=checks, reason="rolled back: " + (
            replicas.detail if not replicas.ok else answers.detail))
    failed = [c for c in quality if not c.ok]
    down = [f"{r.url} ({r.error})" for r in stats.replicas if not r.reachable]
    partial = f" (unreadable at the end, counted to its last reading: {', '.join(down)})" if down else ""
    if failed:
        return RolloutDecision(promote=False, checks=checks,
                               reason="rolled back: " + "; ".join(c.detail for c in failed) + over + partial)
    return RolloutDecision(promote=True, checks=checks,
                           reason="promoted: " + "; ".join(c.detail for c in quality) + over + partial)


# --- the stage -------------------------------------------------------------------------------------------
def roll_out(repo: RolloutRepository, name: str, version: int, production: int, cfg: RolloutConfig, *,
             sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> RolloutReport:
    """Baseline, start the rollout, watch, decide. Ends nothing: call it inside :func:`trial`.

    Raises RolloutError (before anything changed) when no replica answers the baseline read.
    """
    watcher = Watcher(cfg.replicas, name, cfg.request_timeout_s)
    try:
        if not watcher.poll():
            raise RolloutError("no replica's /metrics answered, so no rollout was started (" + "; ".join(
                f"{s.url}: {s.error}" for s in watcher.states.values()) + "): check that the replicas are up "
                "and that rollout.replicas lists their base URLs")
        repo.start_rollout(name, version, cfg.mode, cfg.weight)
        log.info("rollout: %s of %s:%d at weight %g beside production %d; waiting for %d answers (at most %g s)",
                 cfg.mode, name, version, cfg.weight, production, cfg.min_answers, cfg.timeout_s)
        stats = _watch(watcher, cfg, production, version, sleep, clock)
    finally:
        watcher.close()
    decision = decide(stats, cfg)
    log.info("rollout of %s:%d: %s", name, version, decision.reason)
    return RolloutReport(production_version=production, candidate_version=version, stats=stats, decision=decision)


def _watch(watcher: Watcher, cfg: RolloutConfig, production: int, version: int,
           sleep: Callable[[float], None], clock: Callable[[], float]) -> RolloutStats:
    """Read every poll_s until min_answers, the timeout, or no replica answering."""
    started = last_said = clock()
    while True:
        sleep(max(0.0, min(cfg.poll_s, started + cfg.timeout_s - clock())))
        reachable = watcher.poll()
        stats = watcher.stats(cfg, production, version, clock() - started)
        if not reachable or stats.candidate_answers >= cfg.min_answers or stats.seconds >= cfg.timeout_s:
            return stats
        if clock() - last_said >= PROGRESS_EVERY_S:
            last_said = clock()
            log.info("rollout: %.0f of %d %s after %.0f s", stats.candidate_answers, cfg.min_answers, stats.unit,
                     stats.seconds)


def end_trial(repo: RolloutRepository, name: str, version: int) -> str:
    """End the rollout of ``version``, if it is still the one on trial; what was done, in words."""
    current = repo.rollout(name)
    if current is None:
        return f"no rollout of {name} is left"
    if current.version != version:
        return f"the rollout of {name} is of version {current.version} now, not {version}: not ours, left alone"
    repo.end_rollout(name)
    return f"the rollout of {name}:{version} is ended: replicas stop it on their next poll"


@contextlib.contextmanager
def trial(repo: RolloutRepository, name: str, version: int) -> Iterator[None]:
    """Whatever happens inside (a decision, a crash, an interrupt), the rollout of ``version`` ends.

    A promotion inside ends it already (``promote`` clears a rollout of its version); failing to end it
    is logged, not raised, so the original error is what the run reports.
    """
    try:
        yield
    finally:
        try:
            log.info("rollout: %s", end_trial(repo, name, version))
        except Exception as exc:  # noqa: BLE001 - the run's own outcome must not be masked
            log.error("the rollout of %s:%d could NOT be ended (%s): replicas keep giving it traffic; end it by "
                      "hand (remove \"rollout\" from %s/aliases.json in the repository)", name, version, exc, name)


def rollout_step(rec: Recorder, repo: RolloutRepository, cfg: RolloutConfig, version: int,
                 production: ModelVersion | None, run_dir: Path) -> str:
    """The pipeline's rollout step (call it inside :func:`trial`): what the run's reason adds, or StopRun
    ``rolled_back`` with the decision's reason (the rollout ended), or ``failed`` when it could not start."""
    name = rec.record.name
    with rec.step("rollout") as step:
        if production is None:
            step.status = "skipped"
            step.summary = "no production version to roll out beside: promoted on the gate alone"
            return ""
        try:
            report = roll_out(repo, name, version, production.manifest.version, cfg)
        except RolloutError as exc:
            raise StopRun("failed", f"rollout not started: {exc}") from exc
        except RepositoryError as exc:
            raise StopRun("failed", f"rollout refused: {exc}") from exc
        rec.record.rollout = record = report.model_dump(mode="json")
        try:
            record["plot"] = in_repo(rec.repo_root, rollout_plot(record, run_dir / "rollout.png"))
        except Exception as exc:  # noqa: BLE001 - a plot is no reason to overturn the decision
            log.warning("rollout plot not drawn: %r", exc)
            record["plot"] = None
        step.summary = report.decision.reason
        if not report.decision.promote:
            record["ended"] = end_trial(repo, name, version)
            raise StopRun("rolled_back", f"{report.decision.reason}; {record['ended']}; production stays "
                                         f"{name}:{production.manifest.version}")
    return "; rollout " + report.decision.reason
