"""What shadow scoring costs production: throughput and latency with a shadow at 10% and 100% vs off.

One `imgclf serve` (``--workers``, the response cache off, polling the aliases every 0.5 s) serves
imagenet-lite0 version 1 as production. Version 2 is a copy of version 1's files (same weights: the
candidate costs what production costs, and agrees with it). In each round the three configurations take
turns, the order rotating from round to round: no rollout ("off"), then ``start_rollout(..., "shadow", w)``
for each ``--weights`` w; each switch is made in the repository and measured only once the server's
``GET /models`` shows it. A closed loop at each ``--concurrency`` sends /classify requests with real photos
(distinct JPEGs at ImageNet-like sizes); the server's /metrics is read before and after each phase, so the
results say how many production answers, shadow scorings and drops (the per-worker queue,
IMGCLF_SHADOW_QUEUE, being full) each phase had. Figures are medians over the rounds, and ratios to "off"
are taken within each round (same server, minutes apart). The load generator shares the machine.

    python -m benchmarks.shadow_cost [--repo DIR] [--seconds 5] [--rounds 3] [--concurrency 8 1]
                                     [--weights 0.1 1] [--workers 0] [--intra-op-threads 0] [--name shadow_cost]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.batch_throughput import write_jpegs
from benchmarks.loadgen import closed_loop, multipart_request
from benchmarks.machine import NO_CACHE, RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import running_server, tree_cpu_seconds
from service.settings import usable_cores

NAME = "imagenet-lite0"
SIZES = [(500, 375), (640, 480), (400, 300), (375, 500), (800, 600), (300, 400)]
POLL_SECONDS = 0.5
# Counters read from /metrics (summed over their labels): production answers, and what the shadow did.
COUNTERS = {
    "production": ("imgclf_rollout_answers", {"role": "production"}),
    "shadow_answers": ("imgclf_rollout_answers", {"role": "shadow"}),
    "shadow_compared": ("imgclf_shadow_compared", {}),
    "shadow_agreed": ("imgclf_shadow_agreed", {}),
    "shadow_dropped": ("imgclf_shadow_dropped", {}),
    "shadow_errors": ("imgclf_rollout_errors", {"role": "shadow"}),
}


def add_copy(repo: Any, source: int = 1) -> int:
    """A new version of imagenet-lite0 with version ``source``'s files (its manifest's version changed)."""
    from service.repository import copy_writer

    return int(repo.add_version(NAME, copy_writer(repo.get(NAME, source).path)).manifest.version)


def counters(url: str) -> dict[str, float]:
    """The COUNTERS from the server's /metrics, each summed over the samples whose labels match."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    out = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for key, (name, labels) in COUNTERS.items():
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name == f"{name}_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                    out[key] += sample.value
    return out


def busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, ours and others')."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def shadow_idle(url: str, timeout_s: float = 20.0) -> float:
    """Wait until the shadow has scored what the last phase queued (its counter still for 0.3 s), so a
    phase's CPU is its own; returns the seconds waited."""
    started = time.perf_counter()
    last = counters(url)["shadow_compared"]
    while time.perf_counter() - started < timeout_s:
        time.sleep(0.3)
        now = counters(url)["shadow_compared"]
        if now == last:
            break
        last = now
    return time.perf_counter() - started


def served_rollouts(client: Any) -> dict[str, Any]:
    response = client.get("/models")
    response.raise_for_status()
    return dict(response.json().get("rollouts") or {})


def switch(repo: Any, client: Any, setting: str, version: int, weight: float | None, workers: int,
           timeout_s: float = 120) -> float:
    """Set the rollout (``weight`` None: none) and wait until /models shows it; returns the seconds waited."""
    if weight is None:
        repo.end_rollout(NAME)
    else:
        repo.start_rollout(NAME, version, "shadow", weight)
    started = time.perf_counter()
    while True:
        shown = served_rollouts(client).get(NAME)
        if weight is None:
            if shown is None:
                break
        elif shown is not None and (shown["mode"], shown["version"]) == ("shadow", version) and \
                abs(shown["weight"] - weight) < 1e-9:
            break
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"the server did not switch to {setting} within {timeout_s:.0f} s (shows {shown})")
        time.sleep(0.1)
    waited = time.perf_counter() - started
    if workers > 1:  # /models answered from one worker: give the others two more polls
        time.sleep(2 * POLL_SECONDS)
    return waited


def settings_of(weights: list[float]) -> dict[str, float | None]:
    return {"off": None, **{f"shadow {w:.0%}": w for w in weights}}


def run(repo_root: Path, home: Path, jpegs: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    from service.repository import ModelRepository

    repo = ModelRepository(repo_root)
    version = add_copy(repo)
    configs = settings_of(args.weights)
    names = list(configs)
    env = {**NO_CACHE, "IMGCLF_WORKERS": str(args.workers), "IMGCLF_POLL_SECONDS": str(POLL_SECONDS)}
    if args.intra_op_threads:
        env["IMGCLF_INTRA_OP_THREADS"] = str(args.intra_op_threads)
    rounds: list[dict[str, Any]] = []
    with running_server(repo_root, home, env) as srv:
        host = srv.url.split("//", 1)[1]
        payloads = [multipart_request(host, "/classify", "image", f"{i}.jpg", data) for i, data in enumerate(jpegs)]
        for round_no in range(args.rounds):
            order = names[round_no % len(names):] + names[:round_no % len(names)]  # rotate who goes first
            this_round: dict[str, Any] = {"order": order}
            for setting in order:
                waited = switch(repo, srv.client, setting, version, configs[setting], args.workers)
                phases: dict[str, Any] = {"switch_s": waited}
                for c in args.concurrency:
                    time.sleep(args.settle)
                    drained_s = shadow_idle(srv.url)  # the previous phase's shadow queue is scored first
                    before = counters(srv.url)
                    server0, own0, busy0, t0 = tree_cpu_seconds(srv.proc.pid), own_cpu_s(), busy_s(), time.perf_counter()
                    result = asyncio.run(closed_loop(srv.url, payloads, c, args.seconds))
                    wall = time.perf_counter() - t0
                    server_s, own_s = tree_cpu_seconds(srv.proc.pid) - server0, own_cpu_s() - own0
                    other_s = max(0.0, busy_s() - busy0 - server_s - own_s)
                    after = counters(srv.url)
                    result["metrics"] = {k: after[k] - before[k] for k in COUNTERS}
                    # CPU and counters both cover the whole phase, warm-up second included
                    result |= {"drained_s": drained_s, "phase_wall_s": wall, "server_cpu_s": server_s,
                               "loadgen_cpu_s": own_s, "server_cores": server_s / wall,
                               "other_cores": other_s / wall, "server_core_ms_per_answer":
                               1000 * server_s / max(1.0, result["metrics"]["production"])}
                    phases[str(c)] = result
                    m = result["metrics"]
                    print(f"  round {round_no + 1} {setting} c={c}: {result['throughput_rps']:.1f} req/s, "
                          f"p50 {result['p50_ms'] or 0:.0f} p99 {result['p99_ms'] or 0:.0f} ms, "
                          f"server {result['server_core_ms_per_answer']:.1f} core-ms/answer, others "
                          f"{result['other_cores']:.2f} cores, "
                          f"{result['errors']} errors, {result['refused']} refused; production {m['production']:.0f}, "
                          f"shadow compared {m['shadow_compared']:.0f}, dropped {m['shadow_dropped']:.0f}", flush=True)
                this_round[setting] = phases
            rounds.append(this_round)
        repo.end_rollout(NAME)
    return {"rounds": rounds, "candidate_version": version, "env": env}


def summarise(rounds: list[dict[str, Any]], names: list[str], concurrencies: list[int]) -> dict[str, Any]:
    """Per concurrency and setting: medians over the rounds, and the per-round ratios to "off"."""
    out: dict[str, Any] = {}
    for c in map(str, concurrencies):
        rows: dict[str, Any] = {}
        for setting in names:
            phases = [r[setting][c] for r in rounds]
            row: dict[str, Any] = {
                "rps": statistics.median(p["throughput_rps"] for p in phases),
                "p50_ms": statistics.median(p["p50_ms"] or 0 for p in phases),
                "p99_ms": statistics.median(p["p99_ms"] or 0 for p in phases),
                "errors": sum(p["errors"] for p in phases),
                "refused": sum(p["refused"] for p in phases),
                "server_core_ms": statistics.median(p["server_core_ms_per_answer"] for p in phases),
                "server_cores": statistics.median(p["server_cores"] for p in phases),
                "other_cores": statistics.median(p["other_cores"] for p in phases),
                "metrics": {k: sum(p["metrics"][k] for p in phases) for k in COUNTERS},
            }
            if setting != "off":
                offs = [r["off"][c] for r in rounds]
                row["rps_ratios"] = [p["throughput_rps"] / o["throughput_rps"] for p, o in zip(phases, offs)]
                row["p99_ratios"] = [(p["p99_ms"] or 0) / o["p99_ms"] for p, o in zip(phases, offs) if o["p99_ms"]]
                row["p50_ratios"] = [(p["p50_ms"] or 0) / o["p50_ms"] for p, o in zip(phases, offs) if o["p50_ms"]]
                row["cpu_ratios"] = [p["server_core_ms_per_answer"] / o["server_core_ms_per_answer"]
                                     for p, o in zip(phases, offs)]
                row["cpu_ratio"] = statistics.median(row["cpu_ratios"])
                # the server CPU each shadow scoring added: (core-ms per answer - off's) x answers / scorings
                per_scoring = [(p["server_core_ms_per_answer"] - o["server_core_ms_per_answer"])
                               * p["metrics"]["production"] / p["metrics"]["shadow_compared"]
                               for p, o in zip(phases, offs) if p["metrics"]["shadow_compared"]]
                row["core_ms_per_scoring"] = statistics.median(per_scoring) if per_scoring else None
                row["rps_ratio"] = statistics.median(row["rps_ratios"])
                row["p99_ratio"] = statistics.median(row["p99_ratios"]) if row["p99_ratios"] else None
                row["p50_ratio"] = statistics.median(row["p50_ratios"]) if row["p50_ratios"] else None
            rows[setting] = row
        out[c] = rows
    return out


def meaning(r: dict[str, Any]) -> str:
    """A paragraph of what the run says, from its own numbers."""
    parts = []
    for c, rows in r["summary"].items():
        off = rows["off"]
        said = [(f"at c={c}, off served {off['rps']:.1f} req/s (p99 {off['p99_ms']:.0f} ms, "
                f"{off['server_core_ms']:.1f} server core-ms per answer, HTTP included)")]
        for setting, row in rows.items():
            if setting == "off":
                continue
            x = row["metrics"]
            prod = x["production"] or 1
            p99 = f"{row['p99_ratio']:.2f}x" if row["p99_ratio"] is not None else "-"
            added = row.get("core_ms_per_scoring")
            cost = (f"; each shadow scoring added {added:.0f} core-ms, {added / off['server_core_ms']:.1f}x a whole "
                    f"production answer" if added else "")
            said.append(f"{setting} kept {row['rps_ratio']:.0%} of that throughput with {p99} the p99 and "
                        f"{row['cpu_ratio']:.2f}x the server CPU per answer; the shadow scored "
                        f"{x['shadow_compared'] / prod:.0%} of the production answers and dropped "
                        f"{x['shadow_dropped'] / prod:.0%}{cost}")
        parts.append("; ".join(said) + ".")
    text = " ".join(p[0].upper() + p[1:] for p in parts)
    return (text + " No request waits for the shadow, but it scores in the same worker process on the same "
            "cores, so on a server whose cores production keeps busy (the server cores column) the shadow's CPU "
            "comes out of production's throughput and latency. The queue bounds the backlog and the memory "
            "(drops when requests come faster than the one scoring task per worker takes them), not the CPU: "
            "that task scores whenever it has work. The candidate has production's own weights (agreement is "
            "100% by construction), so the gap between a shadow scoring's added CPU and a production answer's "
            "is how the shadow runs the model (one image at a time, its own session beside production's), not "
            "the model.")


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    threads = s.get("intra_op_threads") or f"{max(1, m['cores'] // s['workers'])} (the default: cores / workers)"
    lines = [
        "# What shadow scoring costs production",
        "",
        (f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}, bentoml "
         f"{m['versions']['bentoml']}, numpy {m['versions']['numpy']}, pillow {m['versions']['pillow']}, "
         f"python {m['python']}; {m['date']}. Model: imagenet-lite0 fp32 (production version 1; the shadow "
         f"candidate version {r['candidate_version']} has the same files). One server, IMGCLF_WORKERS="
         f"{s['workers']}, IMGCLF_INTRA_OP_THREADS={threads}, "
         f"response cache off, IMGCLF_SHADOW_QUEUE default (64 per worker). /classify with "
         f"{r['images']} distinct real-photo JPEGs at ImageNet-like sizes, closed loop, {s['seconds']:g} s per "
         f"phase (after 1 s of warm-up), {s['rounds']} rounds, the configurations switched on the running server "
         f"in rotating order and each switch confirmed by GET /models. Medians over rounds; ratios to off are "
         f"taken within each round, their median shown (per-round values in brackets). The load generator "
         f"shares the machine."),
        "",
        "| concurrency | shadow | req/s | vs off | p50 ms | vs off | p99 ms | vs off | errors | refused (503) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(row: dict[str, Any], key: str) -> str:
        if key not in row or row[key] is None:
            return "-"
        per_round = ", ".join(f"{x:.2f}" for x in row[f"{key}s"])
        return f"{row[key]:.3f} ({per_round})"

    for c, rows in r["summary"].items():
        for setting, row in rows.items():
            lines.append(f"| {c} | {setting} | {row['rps']:.1f} | {ratio(row, 'rps_ratio')} | {row['p50_ms']:.0f} | "
                         f"{ratio(row, 'p50_ratio')} | {row['p99_ms']:.0f} | {ratio(row, 'p99_ratio')} | "
                         f"{row['errors']} | {row['refused']} |")
    lines += ["", ("Server CPU (psutil over the server's process tree) per production answer, and what the machine's "
              "other processes took during the phases (this host is shared; the load generator's own CPU excluded). "
               "Added core-ms per shadow scoring: (core-ms per answer - off's in the same round) x answers / "
               "scorings, so everything the shadow added, any loss of production's own efficiency included:"),
              "", ("| concurrency | shadow | server core-ms / answer | vs off | added core-ms per shadow scoring | "
              "server cores | other processes' cores |"),
              "|---|---|---|---|---|---|---|"]
    for c, rows in r["summary"].items():
        for setting, row in rows.items():
            added = row.get("core_ms_per_scoring")
            lines.append(f"| {c} | {setting} | {row['server_core_ms']:.1f} | {ratio(row, 'cpu_ratio')} | "
                         f"{'-' if added is None else f'{added:.1f}'} | {row['server_cores']:.2f} | "
                         f"{row['other_cores']:.2f} |")
    lines += ["", "Shadow work, summed over the rounds (from /metrics, whole phases including warm-up):", "",
              ("| concurrency | shadow | production answers | shadow scored (compared) | agreed | dropped (queue full) "
              "| shadow errors | scored / production | dropped / production |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for c, rows in r["summary"].items():
        for setting, row in rows.items():
            x = row["metrics"]
            prod = x["production"] or 1
            lines.append(f"| {c} | {setting} | {x['production']:.0f} | {x['shadow_compared']:.0f} | "
                         f"{x['shadow_agreed']:.0f} | {x['shadow_dropped']:.0f} | {x['shadow_errors']:.0f} | "
                         f"{x['shadow_compared'] / prod:.1%} | {x['shadow_dropped'] / prod:.1%} |")
    switches = [p["switch_s"] for rd in r["rounds"] for k, p in rd.items() if k != "order"]
    lines += ["", (f"Seconds from the repository change to /models showing it: median {statistics.median(switches):.1f}, "
              f"max {max(switches):.1f} (poll every {POLL_SECONDS:g} s; turning the shadow on loads the candidate)."),
              "", "## What it means", "", meaning(r)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (copied; default: bootstrap one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 1.0], help="shadow shares compared with off")
    parser.add_argument("--workers", type=int, default=0, help="IMGCLF_WORKERS (0: the server's default, one per core)")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="IMGCLF_INTRA_OP_THREADS (0: the server's default, cores / workers)")
    parser.add_argument("--distinct", type=int, default=24, help="distinct JPEGs")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before each phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="shadow_cost", help="results file name (NAME.md, NAME.json)")
    args = parser.parse_args()
    args.workers = args.workers or usable_cores()  # what the server starts with IMGCLF_WORKERS=0
    logging.basicConfig(level=logging.WARNING)
    from training.sample_images import real_photos

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.repo is not None:  # the benchmark adds a version and rollouts: never to the caller's repository
            shutil.copytree(args.repo, tmp / "models")
            repo_root = tmp / "models"
        else:
            repo_root = imagenet_repository(None, tmp)
        photos = real_photos()
        jpegs = [p.read_bytes() for i, size in enumerate(SIZES)
                 for p in write_jpegs(tmp / f"in{i}", photos, max(1, args.distinct // len(SIZES)), size)]
        measured = run(repo_root, tmp / "home", jpegs, args)
    names = list(settings_of(args.weights))
    results: dict[str, Any] = {
        "machine": machine_info(("onnxruntime", "bentoml", "pillow", "numpy", "prometheus-client")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": len(jpegs),
        **measured,
        "summary": summarise(measured["rounds"], names, args.concurrency),
        "wall_s": time.perf_counter() - started,
    }
    write_results(args.name, results, markdown(results), args.out)
    print(markdown(results))


if __name__ == "__main__":
    main()
