"""The rollout stage's analysis: real Prometheus text (prometheus_client) served over real HTTP by stand-in
replicas, read, summed as deltas from a baseline, and decided; the stage's start/end in a real repository.

No imgclf server here (the fleet tests run real replicas): a stand-in replica is a registry of the
series a replica exposes, behind http.server, whose traffic the test writes between reads.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError

from service.repository import ModelRepository
from tests.test_repository import writer
from training.config import ConfigError
from training.pipeline.config import RolloutConfig, load_pipeline_config
from training.pipeline.record import Recorder, RunRecord, StopRun
from training.pipeline.rollout import (
    RoleStats,
    RolloutError,
    RolloutStats,
    ShadowStats,
    decide,
    roll_out,
    rollout_step,
    trial,
)
from training.pipeline.rollout_stats import ReplicaState, Watcher, quantile

NAME = "tiny"
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Replica:
    """One stand-in serving replica: the rollout series of a real registry at GET /metrics."""

    def __init__(self) -> None:
        self.before_read: Callable[[Replica], None] | None = None  # traffic between two reads
        self.reads = 0
        self.restart()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                replica.reads += 1
                if replica.before_read is not None:
                    replica.before_read(replica)
                body = generate_latest(replica.registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def restart(self) -> None:
        """A fresh registry: every counter back to zero, as after a process restart."""
        self.registry = r = CollectorRegistry()
        labels = ["model", "version", "role"]
        self.answers = Counter("imgclf_rollout_answers", "images answered", labels, registry=r)
        self.abstained = Counter("imgclf_rollout_abstained", "answers under threshold", labels, registry=r)
        self.errors = Counter("imgclf_rollout_errors", "images not scored", labels, registry=r)
        self.score = Histogram("imgclf_rollout_top1_score", "top-1 score", labels, registry=r,
                               buckets=(0.5, 0.9, 1.0))
        self.seconds = Histogram("imgclf_rollout_seconds", "seconds per image", labels, registry=r,
                                 buckets=SECONDS_BUCKETS)
        self.compared = Counter("imgclf_shadow_compared", "compared", ["model", "version"], registry=r)
        self.agreed = Counter("imgclf_shadow_agreed", "agreed", ["model", "version"], registry=r)
        self.dropped = Counter("imgclf_shadow_dropped", "dropped", ["model", "version"], registry=r)

    def answer(self, role: str, version: int, n: int, *, abstained: int = 0, errors: int = 0, score: float = 0.95,
               seconds: float = 0.02, model: str = NAME) -> None:
        key = (model, str(version), role)
        self.answers.labels(*key).inc(n)
        self.abstained.labels(*key).inc(abstained)
        self.errors.labels(*key).inc(errors)
        for _ in range(n):
            self.score.labels(*key).observe(score)
            self.seconds.labels(*key).observe(seconds)

    def shadow(self, version: int, compared: int, agreed: int, dropped: int = 0, model: str = NAME) -> None:
        self.compared.labels(model, str(version)).inc(compared)
        self.agreed.labels(model, str(version)).inc(agreed)
        self.dropped.labels(model, str(version)).inc(dropped)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    pair = [Replica(), Replica()]
    yield pair
    for replica in pair:
        replica.stop()


def dead_url() -> str:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    """Production 1 and a registered candidate 2 (real, verified versions)."""
    repo = ModelRepository(tmp_path / "models")
    repo.add_version(NAME, writer(NAME))
    repo.add_version(NAME, writer(NAME))
    repo.promote(NAME, 1)
    return repo


def config(urls: list[str], **kw: object) -> RolloutConfig:
    return RolloutConfig.model_validate({"replicas": urls, "poll_s": 0.02, "timeout_s": 5, "min_answers": 100} | kw)


# --- reading and summing -------------------------------------------------------------------------------------
def test_deltas_from_the_baseline_are_summed_over_replicas(replicas: list[Replica]) -> None:
    a, b = replicas
    a.answer("production", 1, 500, abstained=50, errors=5)  # before the rollout: not counted
    a.shadow(2, 30, 1)  # an earlier rollout of the same version: not counted either
    watcher = Watcher([a.url, b.url], NAME, 5)
    assert watcher.poll()
    a.answer("production", 1, 60, abstained=3, seconds=0.02)
    b.answer("production", 1, 40, abstained=2, errors=1, seconds=0.04)
    a.answer("shadow", 2, 30, abstained=3, score=0.7, seconds=0.03)
    b.answer("shadow", 2, 20, abstained=2, errors=1, score=0.7, seconds=0.03)
    a.shadow(2, 30, 27, dropped=4)
    b.shadow(2, 20, 19)
    a.answer("production", 1, 1000, model="other")  # another model on the same replica
    assert watcher.poll()
    stats = watcher.stats(config([a.url, b.url]), production=1, candidate=2, seconds=3)
    watcher.close()
    prod, cand = stats.production, stats.candidate
    assert (prod.answers, prod.abstained, prod.errors) == (100, 5, 1)
    assert (cand.role, cand.answers, cand.abstained, cand.errors) == ("shadow", 50, 5, 1)
    assert prod.abstention_rate == pytest.approx(0.05) and cand.abstention_rate == pytest.approx(0.1)
    assert cand.error_rate == pytest.approx(1 / 51) and cand.mean_top1_score == pytest.approx(0.7)
    assert stats.shadow == ShadowStats(compared=50, agreed=46, dropped=4)
    assert stats.shadow.agreement == pytest.approx(0.92) and stats.candidate_answers == 50
    # production: 60 at 20 ms and 40 at 40 ms; the 99th answer is in (25, 50] ms: Prometheus interpolates
    assert prod.p99_seconds == pytest.approx(0.025 + 0.025 * (99 - 60) / 40)
    assert 0.025 < cand.p99_seconds <= 0.05
    assert all(r.reachable and r.error is None for r in stats.replicas)


def test_a_restarted_replica_counts_from_zero_and_a_late_one_from_its_first_read(replicas: list[Replica]) -> None:
    a, b = replicas
    a.answer("production", 1, 300)
    late = b.url
    b.stop()  # not up at the baseline
    watcher = Watcher([a.url, late], NAME, 2)
    assert watcher.poll()
    assert [s.reachable for s in watcher.states.values()] == [True, False]
    a.restart()  # counters back to zero, then 7 answers
    a.answer("production", 1, 7)
    assert watcher.poll()
    stats = watcher.stats(config([a.url, late]), 1, 2, 1)
    watcher.close()
    assert stats.production.answers == 7
    assert stats.replicas[1].failed_reads == 2 and "ConnectError" in (stats.replicas[1].error or "")


def test_quantile_as_prometheus_computes_it() -> None:
    assert quantile({}, 0.99) is None and quantile({"+Inf": 0}, 0.99) is None
    assert quantile({"0.1": 50, "0.2": 100, "+Inf": 100}, 0.5) == pytest.approx(0.1)
    assert quantile({"0.1": 0, "0.2": 100, "+Inf": 100}, 0.5) == pytest.approx(0.15)
    assert quantile({"0.1": 10, "+Inf": 100}, 0.99) == 0.1  # in the +Inf bucket: the highest finite bound


# --- the decision ----------------------------------------------------------------------------------------------
def stats_of(mode: str = "shadow", *, answers: float = 400, agreed: float = 392, cand_abstained: float = 20,
             cand_errors: float = 0, cand_seconds: float = 0.02, reachable: tuple[bool, ...] = (True, True),
             seconds: float = 12) -> RolloutStats:
    """400 answers from each role; production abstains on 5 %, answers in 20 ms at p99."""
    buckets = {str(le): (0 if le < 0.02 else 400) for le in (*SECONDS_BUCKETS, float("inf"))}
    buckets["+Inf"] = buckets.pop("inf")
    cand_buckets = {le: (0 if float(le) < cand_seconds else 400) for le in buckets}
    return RolloutStats(
        mode=mode, weight=0.1, seconds=seconds,
        production=RoleStats(role="production", version=1, answers=answers, abstained=20, score_sum=0.9 * answers,
                             score_count=answers, seconds_buckets=buckets),
        candidate=RoleStats(role=mode, version=2, answers=answers, abstained=cand_abstained, errors=cand_errors,
                            score_sum=0.8 * answers, score_count=answers, seconds_buckets=cand_buckets),
        shadow=ShadowStats(compared=answers, agreed=agreed) if mode == "shadow" else None,
        replicas=[ReplicaState(url=f"http://r{i}", reachable=ok, baseline=True, error=None if ok else "ConnectError")
                  for i, ok in enumerate(reachable)])


CFG = RolloutConfig(replicas=["http://r0", "http://r1"])


def test_a_candidate_within_every_threshold_is_promoted_and_the_reason_says_why() -> None:
    decision = decide(stats_of(), CFG)
    assert decision.promote and all(c.ok for c in decision.checks)
    assert [c.name for c in decision.checks] == ["replicas", "answers", "agreement", "abstention_increase",
                                                 "latency_ratio", "error_rate"]
    assert decision.reason.startswith("promoted: top-1 agreement with production 0.980 >= 0.95; ")
    assert decision.reason.endswith("over 400 shadowed answers in 12 s")
    canary = decide(stats_of("canary"), RolloutConfig(mode="canary", replicas=["http://r0"]))
    assert canary.promote and "agreement" not in [c.name for c in canary.checks] and "canary answers" in canary.reason


@pytest.mark.parametrize(("change", "check", "said"), [
    ({"agreed": 44}, "agreement", "top-1 agreement with production 0.110 < 0.95 over 400 shadowed answers"),
    ({"cand_abstained": 60}, "abstention_increase", "abstention rate 0.150 vs production 0.050: increase 0.100 > 0.05"),
    ({"cand_seconds": 0.09}, "latency_ratio", "p99 99.5 ms vs production 24.9 ms: ratio 4.004 > 2"),
    ({"cand_errors": 10}, "error_rate", "candidate error rate 0.024 > 0.01"),
])
def test_each_threshold_rolls_back_with_its_numbers(change: dict, check: str, said: str) -> None:
    decision = decide(stats_of(**change), CFG)
    assert not decision.promote and decision.reason.startswith("rolled back: ")
    assert said in decision.reason, decision.reason
    assert [c.name for c in decision.checks if not c.ok] == [check]


def test_too_few_answers_or_no_replica_roll_back_and_say_what_to_do() -> None:
    few = decide(stats_of(answers=37, agreed=37, cand_abstained=0, seconds=600), CFG)
    assert not few.promote
    assert few.reason.startswith("rolled back: only 37 of the 200 shadowed answers needed arrived in 600 s "
                                 "(rollout.timeout_s 600): raise rollout.weight or rollout.timeout_s")
    gone = decide(stats_of(reachable=(False, False)), CFG)
    assert not gone.promote and gone.reason.startswith("rolled back: no replica's /metrics answered (http://r0: "
                                                       "ConnectError; http://r1: ConnectError)")
    one_down = decide(stats_of(reachable=(True, False)), CFG)
    assert one_down.promote and "unreadable at the end, counted to its last reading: http://r1" in one_down.reason


# --- the stage, against real replicas and a real repository --------------------------------------------------
def shadow_traffic(repo: ModelRepository, agreed_per_read: int) -> Callable[[Replica], None]:
    """Each read, a replica has answered 20 requests; with a shadow on trial it compared 10 of them."""

    def traffic(replica: Replica) -> None:
        replica.answer("production", 1, 20, abstained=1)
        if (on_trial := repo.rollout(NAME)) is not None:
            replica.answer(on_trial.mode, on_trial.version, 10, abstained=1)
            replica.shadow(on_trial.version, 10, agreed_per_read)

    return traffic


@pytest.mark.parametrize(("agreed", "promoted"), [(10, True), (3, False)])
def test_roll_out_watches_until_enough_answers_then_decides(repo: ModelRepository, replicas: list[Replica],
                                                           agreed: int, promoted: bool) -> None:
    for replica in replicas:
        replica.answer("production", 1, 1000, abstained=500)  # history before the baseline
        replica.before_read = shadow_traffic(repo, agreed)
    report = roll_out(repo, NAME, 2, 1, config([r.url for r in replicas]))
    assert repo.rollout(NAME) is not None  # roll_out ends nothing: trial() does
    stats = report.stats
    assert 100 <= stats.candidate_answers < 100 + 2 * 10 * 2  # stopped at min_answers, not long after
    assert stats.production.abstention_rate == pytest.approx(0.05)
    assert report.decision.promote is promoted
    if not promoted:
        assert report.decision.reason.startswith("rolled back: top-1 agreement with production 0.300 < 0.95 over ")
    json.dumps(report.model_dump(mode="json"))  # the run record's rollout report


def test_no_answers_by_the_timeout_rolls_back(repo: ModelRepository, replicas: list[Replica]) -> None:
    report = roll_out(repo, NAME, 2, 1, config([r.url for r in replicas], timeout_s=0.3))
    assert not report.decision.promote and 0.3 <= report.stats.seconds < 2
    assert report.decision.reason.startswith("rolled back: only 0 of the 100 shadowed answers needed arrived in 0.")


def test_an_unreachable_replica_is_reported_and_all_unreachable_starts_nothing(
        repo: ModelRepository, replicas: list[Replica]) -> None:
    live, dead = replicas[0], dead_url()
    live.before_read = shadow_traffic(repo, 10)
    report = roll_out(repo, NAME, 2, 1, config([live.url, dead], min_answers=30))
    assert report.decision.promote, report.decision.reason
    assert "unreadable at the end, counted to its last reading: " + dead in report.decision.reason
    repo.end_rollout(NAME)
    with pytest.raises(RolloutError, match="no replica's /metrics answered, so no rollout was started"):
        roll_out(repo, NAME, 2, 1, config([dead, dead_url()]))
    assert repo.rollout(NAME) is None


def test_replicas_gone_during_the_rollout_roll_back(repo: ModelRepository, replicas: list[Replica]) -> None:
    def vanish(replica: Replica) -> None:
        if replica.reads > 1:
            threading.Thread(target=replica.stop).start()  # after this answer, nothing listens

    for replica in replicas:
        replica.before_read = vanish
    report = roll_out(repo, NAME, 2, 1, config([r.url for r in replicas]))
    assert not report.decision.promote and report.decision.reason.startswith("rolled back: no replica's /metrics")


def test_trial_ends_the_rollout_whatever_happens(repo: ModelRepository) -> None:
    with pytest.raises(KeyError), trial(repo, NAME, 2):
        repo.start_rollout(NAME, 2, "canary", 0.2)
        raise KeyError("a crash half way")
    assert repo.rollout(NAME) is None and repo.aliases(NAME)["production"] == 1
    with trial(repo, NAME, 2):  # a promotion inside ends it already
        repo.start_rollout(NAME, 2, "shadow", 0.2)
        repo.promote(NAME, 2)
    assert repo.rollout(NAME) is None and repo.aliases(NAME)["production"] == 2
    repo.add_version(NAME, writer(NAME))
    repo.start_rollout(NAME, 3, "shadow", 0.5)
    with trial(repo, NAME, 2):  # another candidate's rollout is left alone
        pass
    assert repo.rollout(NAME).version == 3


def test_the_rollout_step_records_the_report_and_plot_and_rolls_back(repo: ModelRepository, replicas: list[Replica],
                                                                    tmp_path: Path) -> None:
    for replica in replicas:
        replica.before_read = shadow_traffic(repo, 2)
    rec = Recorder(repo.root, RunRecord(run_id="r1", name=NAME, started_at=datetime.now(UTC)))
    with pytest.raises(StopRun) as stop, trial(repo, NAME, 2):
        rollout_step(rec, repo, config([r.url for r in replicas]), 2, repo.get(NAME, 1), tmp_path / "run")
    assert stop.value.status == "rolled_back" and "top-1 agreement with production 0.200 < 0.95" in stop.value.reason
    assert "the rollout of tiny:2 is ended" in stop.value.reason and stop.value.reason.endswith("stays tiny:1")
    assert repo.rollout(NAME) is None and repo.aliases(NAME)["production"] == 1
    saved = json.loads(rec.path.read_text())
    assert saved["steps"][-1]["name"] == "rollout" and saved["steps"][-1]["status"] == "failed"
    rollout = saved["rollout"]
    assert rollout["decision"]["promote"] is False and rollout["stats"]["shadow"]["compared"] >= 100
    assert {c["name"]: c["ok"] for c in rollout["decision"]["checks"]}["agreement"] is False
    assert (tmp_path / "run" / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    skipped = rollout_step(rec, repo, config([replicas[0].url]), 2, None, tmp_path / "run")
    assert skipped == "" and rec.record.steps[-1].status == "skipped"


# --- the configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bad", "said"), [
    ({"weight": 0}, "rollout.weight: Input should be greater than 0"),
    ({"weight": 1.5}, "rollout.weight: Input should be less than or equal to 1"),
    ({"mode": "blue-green"}, "rollout.mode: Input should be 'canary' or 'shadow'"),
    ({"replicas": []}, "list the base URL of every serving replica"),
    ({"replicas": ["10.0.0.5:3000"]}, "replica URL '10.0.0.5:3000' must start with http:// or https://"),
    ({"mode": "canary", "weight": 1}, "a canary at weight 1 leaves production no answers to compare with"),
    ({"min_answers": 0}, "rollout.min_answers: Input should be greater than or equal to 1"),
    ({"min_agreement": 1.2}, "rollout.min_agreement: Input should be less than or equal to 1"),
    ({"max_latency_ratio": 0}, "rollout.max_latency_ratio: Input should be greater than 0"),
    ({"wieght": 0.2}, "rollout.wieght: unknown key"),
])
def test_bad_rollout_settings_are_refused_by_name(bad: dict, said: str) -> None:
    with pytest.raises(ConfigError, match="invalid pipeline config") as err:
        load_pipeline_config(None, {"rollout": {"replicas": ["http://r0:3000"]} | bad})
    assert said in str(err.value), str(err.value)


def test_rollout_defaults() -> None:
    cfg = RolloutConfig(replicas=["http://r0:3000/"])
    assert cfg.model_dump() == {
        "mode": "shadow", "weight": 0.1, "replicas": ["http://r0:3000"], "min_answers": 200, "timeout_s": 600.0,
        "poll_s": 1.0, "request_timeout_s": 5.0, "min_agreement": 0.95, "max_abstention_increase": 0.05,
        "max_latency_ratio": 2.0, "max_error_rate": 0.01}
    with pytest.raises(ValidationError):
        RolloutConfig()


def test_a_rollout_does_not_change_the_config_fingerprint_and_flags_set_it() -> None:
    from typer.testing import CliRunner

    from imgclf.cli import app

    cfg = load_pipeline_config(None, {"rollout": {"replicas": ["http://r0:3000"], "mode": "canary"}})
    assert cfg.rollout is not None and cfg.rollout.mode == "canary"
    # like the gate and deploy settings, it decides what happens to a model, not which model it is
    assert cfg.fingerprint() == load_pipeline_config(None, {}).fingerprint()
    args = ["pipeline", "--name", NAME, "--data", "d", "--holdout", "h", "--rollout", "canary",
            "--replica", "http://r0:3000", "--rollout-weight", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "a canary at weight 1 leaves production no answers" in result.stderr
