"""What a rollout measured: every replica's ``/metrics``, summed, as deltas from a baseline read.

Counters are cumulative since each replica started, so every figure is the latest reading less the
first one (taken before the rollout starts; for a replica that did not answer then, its first good
read). A series below its baseline was reset (its replica restarted): all of its value is new. A
replica that stops answering is reported and its last reading kept. No torch here: HTTP and arithmetic.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, computed_field

from training.pipeline.config import RolloutConfig

log = logging.getLogger(__name__)

ANSWERS, ABSTAINED, ERRORS = "imgclf_rollout_answers_total", "imgclf_rollout_abstained_total", \
    "imgclf_rollout_errors_total"
SCORE, SECONDS = "imgclf_rollout_top1_score", "imgclf_rollout_seconds"
COMPARED, AGREED, DROPPED = "imgclf_shadow_compared_total", "imgclf_shadow_agreed_total", \
    "imgclf_shadow_dropped_total"
WANTED = {ANSWERS, ABSTAINED, ERRORS, f"{SCORE}_sum", f"{SCORE}_count", f"{SECONDS}_bucket", COMPARED, AGREED,
          DROPPED}
QUANTILE = 0.99

Series = tuple[str, str, str, str]  # sample name, role ("" for the shadow series), version, le ("" but buckets)
Snapshot = dict[Series, float]


# --- what was measured ------------------------------------------------------------------------------------
def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class RoleStats(BaseModel):
    """One version in one role (production, canary or shadow), summed over the replicas since the baseline."""

    role: str
    version: int
    answers: float = 0
    abstained: float = 0
    errors: float = 0
    score_sum: float = 0
    score_count: float = 0
    seconds_buckets: dict[str, float] = {}  # le -> cumulative count, as Prometheus writes it

    @computed_field  # type: ignore[prop-decorator]
    @property
    def abstention_rate(self) -> float | None:
        return _ratio(self.abstained, self.answers)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def error_rate(self) -> float | None:
        return _ratio(self.errors, self.answers + self.errors)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean_top1_score(self) -> float | None:
        return _ratio(self.score_sum, self.score_count)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def p99_seconds(self) -> float | None:
        return quantile(self.seconds_buckets, QUANTILE)


class ShadowStats(BaseModel):
    compared: float = 0
    agreed: float = 0
    dropped: float = 0  # sampled, but the replica's shadow queue was full

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement(self) -> float | None:
        return _ratio(self.agreed, self.compared)


class ReplicaState(BaseModel):
    url: str
    reachable: bool = False
    error: str | None = None  # why the last read failed
    failed_reads: int = 0
    baseline: bool = False  # False: never read, so nothing of it is counted


class RolloutStats(BaseModel):
    mode: Literal["canary", "shadow"]
    weight: float
    seconds: float = 0  # watched for
    production: RoleStats
    candidate: RoleStats
    shadow: ShadowStats | None = None
    replicas: list[ReplicaState]

    @property
    def candidate_answers(self) -> float:
        """What min_answers counts: shadowed answers compared with production's, or canary answers."""
        return self.shadow.compared if self.shadow is not None else self.candidate.answers

    @property
    def unit(self) -> str:
        return "shadowed answers" if self.mode == "shadow" else "canary answers"


def quantile(buckets: dict[str, float], q: float) -> float | None:
    """``histogram_quantile`` as Prometheus computes it: linear within the bucket that holds the rank; in the
    +Inf bucket, the highest finite bound. None without observations."""
    bounds = sorted((float(le), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower


# --- reading the replicas ------------------------------------------------------------------------------
def parse_metrics(text: str, name: str) -> Snapshot:
    """The rollout series of model ``name`` in Prometheus text; ValueError when it is not Prometheus text."""
    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WANTED and sample.labels.get("model") == name:
                labels = sample.labels
                key = (sample.name, labels.get("role", ""), labels.get("version", ""), labels.get("le", ""))
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def delta(now: Snapshot, base: Snapshot) -> Snapshot:
    """Since the baseline (a series born since has a baseline of 0); a series below its baseline was reset
    (its replica restarted): all of its value is new."""
    out = {}
    for key, value in now.items():
        before = base.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


class Watcher:
    """Reads the replicas' /metrics: the first good read of each is its baseline, the latest its state."""

    def __init__(self, urls: list[str], name: str, timeout_s: float) -> None:
        self.name = name
        self.states = {url: ReplicaState(url=url) for url in urls}
        self.base: dict[str, Snapshot] = {}
        self.last: dict[str, Snapshot] = {}
        self.client = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def poll(self) -> bool:
        """Read every replica once; whether any answered."""
        for url, state in self.states.items():
            try:
                response = self.client.get(f"{url}/metrics")
                response.raise_for_status()
                snapshot = parse_metrics(response.text, self.name)
            except (httpx.HTTPError, ValueError) as exc:
                state.reachable, state.error = False, f"{type(exc).__name__}: {exc}"
                state.failed_reads += 1
                log.warning("rollout: %s/metrics unreadable: %s", url, state.error)
                continue
            state.reachable, state.error, state.baseline = True, None, True
            self.base.setdefault(url, snapshot)
            self.last[url] = snapshot
        return any(s.reachable for s in self.states.values())

    def stats(self, cfg: RolloutConfig, production: int, candidate: int, seconds: float) -> RolloutStats:
        """Every replica's latest reading less its baseline, summed."""
        total: Snapshot = {}
        for url, snapshot in self.last.items():
            for key, value in delta(snapshot, self.base[url]).items():
                total[key] = total.get(key, 0.0) + value
        shadow = None
        if cfg.mode == "shadow":
            shadow = ShadowStats(**{field: total.get((metric, "", str(candidate), ""), 0.0) for field, metric in
                                    (("compared", COMPARED), ("agreed", AGREED), ("dropped", DROPPED))})
        return RolloutStats(mode=cfg.mode, weight=cfg.weight, seconds=seconds, shadow=shadow,
                            production=_role(total, "production", production),
                            candidate=_role(total, cfg.mode, candidate),
                            replicas=[s.model_copy() for s in self.states.values()])


def _role(total: Snapshot, role: str, version: int) -> RoleStats:
    v = str(version)

    def get(metric: str) -> float:
        return total.get((metric, role, v, ""), 0.0)

    buckets = {le: n for (metric, r, ver, le), n in total.items()
               if metric == f"{SECONDS}_bucket" and (r, ver) == (role, v)}
    return RoleStats(role=role, version=version, answers=get(ANSWERS), abstained=get(ABSTAINED), errors=get(ERRORS),
                     score_sum=get(f"{SCORE}_sum"), score_count=get(f"{SCORE}_count"), seconds_buckets=buckets)
