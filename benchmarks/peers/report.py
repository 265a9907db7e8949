"""The issue's table and goal ratios from the rounds: medians across rounds, ratios taken within a round."""

from __future__ import annotations

import statistics
from typing import Any

DEFAULT, TUNED, BASELINE = "imgclf-default", "imgclf-tuned", "imgclf-baseline"
VS_BASELINE = [  # phase, figure, text: this tree / the baseline checkout, within each round
    ("small", "images_per_s", "c=32 img/s (higher is better)"),
    ("large", "images_per_s", "12 MP c=8 img/s (higher is better)"),
    ("small", "server_core_ms_per_image", "server core-ms per image, small JPEG (lower is better)"),
    ("large", "server_core_ms_per_image", "server core-ms per image, 12 MP (lower is better)"),
]
GOALS = [  # key, text, direction, target (issue 28's parity goals first, then issue 18's)
    ("c32_vs_triton", "c=32 img/s, imgclf default / Triton", ">=", 0.95),
    ("mp12_c8_vs_triton", "12 MP c=8 img/s, imgclf default / Triton", ">=", 0.95),
    ("c1_p50_vs_triton", "one client (c=1) p50 latency, imgclf default / Triton", "<=", 1.10),
    ("c1_p99_vs_triton", "one client (c=1) p99 latency, imgclf default / Triton (information)", "<=", None),
    ("c32_vs_ceiling", "c=32 img/s, imgclf default / in-process ceiling", ">=", 0.95),
    ("c8_p99_over_p50", "p99 / p50 at c=8 (12 MP), imgclf default", "<=", 2.0),
    ("cpu_vs_work", ("server core-ms per classified image (small JPEG, c=32) / in-process core-ms per image, "
                    "imgclf default"),
     "<=", 1.10),
]


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def round_ratios(rnd: dict[str, Any], server: str = DEFAULT) -> dict[str, float | None]:
    """The goal's ratios from one round's figures (None where a server or phase is missing)."""
    runs, ceil = rnd["servers"], rnd["ceiling_median"]
    ours, triton = runs.get(server, {}), runs.get("triton", {})

    def get(run: dict[str, Any], kind: str, key: str) -> float | None:
        return run.get(kind, {}).get(key) if run.get("ok") and run.get(kind) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "c32_vs_triton": ratio(get(ours, "small", "images_per_s"), get(triton, "small", "images_per_s")),
        "c32_vs_ceiling": ratio(get(ours, "small", "images_per_s"), ceil["small"]["ceiling_images_per_s"]),
        "mp12_c8_vs_triton": ratio(get(ours, "large", "images_per_s"), get(triton, "large", "images_per_s")),
        "c1_p50_vs_triton": ratio(get(ours, "single", "p50_ms"), get(triton, "single", "p50_ms")),
        "c1_p99_vs_triton": ratio(get(ours, "single", "p99_ms"), get(triton, "single", "p99_ms")),
        "c8_p99_over_p50": get(ours, "large", "p99_over_p50"),
        "cpu_vs_work": ratio(get(ours, "small", "server_core_ms_per_image"), ceil["small"]["work_core_ms"]),
        "c32_vs_free_ceiling": ratio(get(ours, "small", "images_per_s"), free_ceiling(ours, ceil, rnd["cores"])),
    }


def free_ceiling(run: dict[str, Any], ceil: dict[str, Any], cores: int) -> float | None:
    """The small-JPEG ceiling on the cores other processes left free during the c=32 phase (information only)."""
    small = run.get("small") if run.get("ok") else None
    if not small:
        return None
    return max(0.0, cores - small["other_cores"]) * 1000 / ceil["small"]["work_core_ms"]


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per server, per figure: median and range across rounds; per goal: each round's ratio and the median."""
    rounds = results["rounds"]
    servers: dict[str, Any] = {}
    for key in results["servers"]:
        runs = [r["servers"][key] for r in rounds if r["servers"].get(key, {}).get("ok")]
        figures = {}
        for kind, name in (("small", "images_per_s"), ("large", "images_per_s"), ("small", "server_core_ms_per_image"),
                           ("large", "server_core_ms_per_image"), ("small", "refused"), ("large", "refused"),
                           ("small", "server_core_ms_per_request"),
                           ("small", "client_core_ms_per_request"), ("small", "p50_ms"), ("small", "p99_ms"),
                           ("large", "p50_ms"), ("large", "p99_ms"), ("large", "p99_over_p50"),
                           ("large", "server_core_ms_per_request"), ("small", "errors"), ("large", "errors"),
                           ("single", "p50_ms"), ("single", "p99_ms"), ("single", "images_per_s")):
            values = [r[kind][name] for r in runs if r.get(kind, {}).get(name) is not None]
            figures[f"{kind}.{name}"] = {"median": _median(values), "min": min(values, default=None),
                                         "max": max(values, default=None), "values": values}
        servers[key] = {"rounds_ok": len(runs), "figures": figures}
    ceiling = {kind: {k: _median([r["ceiling_median"][kind][k] for r in rounds])
                      for k in ("ceiling_images_per_s", "decode_core_ms", "inference_core_ms", "work_core_ms")}
               for kind in ("small", "large")}
    ceiling_range = {kind: [c[kind]["ceiling_images_per_s"] for r in rounds for c in r["ceilings"]]
                     for kind in ("small", "large")}
    goals = {}
    for server in (DEFAULT, TUNED, BASELINE):
        per_round = [round_ratios(r, server) for r in rounds]
        goals[server] = {key: {"values": [p[key] for p in per_round], "median": _median([p[key] for p in per_round]),
                               "direction": d, "target": t, "text": text} for key, text, d, t in GOALS}
        for g in goals[server].values():
            m = g["median"]
            g["met"] = None if m is None or g["target"] is None else (m >= g["target"] if g["direction"] == ">=" else m <= g["target"])
        free = [p["c32_vs_free_ceiling"] for p in per_round]
        goals[server]["c32_vs_free_ceiling"] = {"values": free, "median": _median(free), "information": True}
    return {"servers": servers, "ceiling": ceiling, "ceiling_range": ceiling_range, "goals": goals}


def _range(fig: dict[str, Any], digits: int = 0) -> str:
    if fig["median"] is None:
        return "-"
    f = f"{{:.{digits}f}}"
    if len(fig["values"]) < 2:
        return f.format(fig["median"])
    return f"{f.format(fig['median'])} ({f.format(fig['min'])}-{f.format(fig['max'])})"


def _code_line(results: dict[str, Any]) -> str:
    code = results.get("code") or {}
    workers = {k: r["servers"][k]["details"]["worker_processes"] for r in results["rounds"][:1]
               for k in (DEFAULT, TUNED) if r["servers"].get(k, {}).get("details", {}).get("worker_processes")}
    text = (f"Code: commit {code.get('commit')}, with {code.get('uncommitted_paths')} paths changed in the working tree "
            "(what was measured)." if code else "Code: not recorded.")
    if workers:
        text += " BentoML worker processes: " + ", ".join(f"{k} {v}" for k, v in workers.items()) + "."
    return text


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _info(info: dict[str, Any]) -> str:
    parts = []
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" if k in ("venv", "stack") else f"{a}={b}" for a, b in v.items()) or "none"
        parts.append(f"{k}: {v}")
    return "; ".join(parts)


def markdown(results: dict[str, Any]) -> str:
    s, m = results["summary"], results["machine"]
    quick = " **Quick smoke run (--quick): one short round, not a measurement.**" if results["settings"]["quick"] else ""
    lines = [
        "# Side by side: imgclf, Triton and TorchServe on the same machine",
        "",
        (f"{m['cpu']}, {results['cores']} usable cores, {m['platform']}; Python {m['python']}; onnxruntime "
         f"{m['versions'].get('onnxruntime')}, bentoml {m['versions'].get('bentoml')}, Pillow "
         f"{m['versions'].get('pillow')}, numpy {m['versions'].get('numpy')}; {m['date']}. Model: imagenet-lite0 "
         f"(EfficientNet-Lite0 fp32). {len(results['rounds'])} round(s), order alternating; "
         f"{results['settings']['seconds']:g} s per phase after {results['settings']['warmup']:g} s of warm-up."
         + quick),
        "",
        _code_line(results),
        "",
        (f"**How busy the machine was**: load average (1 min) {results['load']['start'][0]:.1f} at the start and "
         f"{results['load']['end'][0]:.1f} at the end; other processes took {results['load']['other_cores_median']:.2f} "
         f"cores (median over the phases, max {results['load']['other_cores_max']:.2f}) of {results['cores']} while "
         "servers were measured"
         + (" (so the ceiling, which assumes every core, was not on offer)"
            if results['load']['other_cores_median'] > 0.1 else "")
         + ". Only ratios within a round mean much on a shared host."),
        "",
        ("Median (min-max) over the rounds. Small = ImageNet-sized real-photo JPEGs (500x375 and 375x500), "
         "12 MP = 12-megapixel JPEGs of the same photos; one image per request; the same load generator "
         "(`benchmarks/loadgen.py`) for every server."),
        "",
        ("| server | c=32 img/s | 12 MP c=8 img/s | server core-ms per image (small JPEG) | c=32 p50 / p99 ms "
         "| 12 MP c=8 p50 / p99 ms | c=1 p50 / p99 ms | refused (503) c=32 / 12 MP | client core-ms per request |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, server in results["servers"].items():
        if server.get("unavailable"):
            lines.append(f"| {server['label']} | not run: {server['unavailable']} | | | | | | | |")
            continue
        f = s["servers"][key]["figures"]
        if not s["servers"][key]["rounds_ok"]:
            lines.append(f"| {server['label']} | failed in every round (see JSON) | | | | | | | |")
            continue
        lines.append(
            f"| {server['label']} | {_range(f['small.images_per_s'], 1)} | {_range(f['large.images_per_s'], 1)} | "
            f"{_range(f['small.server_core_ms_per_image'], 1)} | {_range(f['small.p50_ms'])} / "
            f"{_range(f['small.p99_ms'])} | {_range(f['large.p50_ms'])} / {_range(f['large.p99_ms'])} | "
            f"{_range(f['single.p50_ms'], 1)} / {_range(f['single.p99_ms'], 1)} | "
            f"{_range(f['small.refused'])} / {_range(f['large.refused'])} | "
            f"{_range(f['small.client_core_ms_per_request'], 2)} |")
    refusing = []
    for key, server in results["servers"].items():
        smalls = [r["servers"][key]["small"] for r in results["rounds"] if r["servers"].get(key, {}).get("ok")]
        shares = [x["refused"] / max(1, sum(x["statuses"].values()) + x["transport_errors"]) for x in smalls]
        if shares and max(shares) > 0:
            refusing.append(f"{key} {100 * min(shares):.0f}-{100 * max(shares):.0f}%")
    if refusing:
        lines += ["", (f"Refusals at c=32: {'; '.join(refusing)} of the answers were 503 + `Retry-After` (imgclf's "
                       "admission control: a request whose estimated latency exceeds its budget is refused at once). "
                       "The load generator honours `Retry-After`, as real clients do, so img/s counts 200s only and "
                       "latencies are those of the accepted requests; servers that queue everything show it in "
                       "their p99 instead.")]
    c = s["ceiling"]
    lines += [
        "",
        (f"In-process ceiling (cores / (decode + inference core-seconds per image), measured between the servers): "
         f"small {c['small']['ceiling_images_per_s']:.1f} img/s (all measurements "
         f"{min(s['ceiling_range']['small']):.0f}-{max(s['ceiling_range']['small']):.0f}; decode "
         f"{c['small']['decode_core_ms']:.1f} + inference {c['small']['inference_core_ms']:.1f} core-ms), 12 MP "
         f"{c['large']['ceiling_images_per_s']:.1f} img/s ({min(s['ceiling_range']['large']):.0f}-"
         f"{max(s['ceiling_range']['large']):.0f}; decode {c['large']['decode_core_ms']:.1f} core-ms, draft decoding)."),
        "",
        "## Against the goal (ratios within each round, then the median)",
        "",
        "| ratio | goal | imgclf default: per round | median | met | 2 workers x 1 thread: median |",
        "|---|---|---|---|---|---|",
    ]
    for key, text, d, t in GOALS:
        g, tuned = s["goals"][DEFAULT][key], s["goals"][TUNED][key]
        per = ", ".join("-" if v is None else f"{v:.2f}" for v in g["values"])
        med = "-" if g["median"] is None else f"{g['median']:.2f}"
        met = {None: "-", True: "yes", False: "**no**"}[g["met"]]
        tmed = "-" if tuned["median"] is None else f"{tuned['median']:.2f}"
        goal = "-" if t is None else f"{d} {t}"
        lines.append(f"| {text} | {goal} | {per} | {med} | {met} | {tmed} |")
    free, tfree = s["goals"][DEFAULT]["c32_vs_free_ceiling"], s["goals"][TUNED]["c32_vs_free_ceiling"]
    lines.append(f"| (information) c=32 img/s / the ceiling on the cores other processes left free | - | "
                 f"{', '.join(_fmt(v) for v in free['values'])} | {_fmt(free['median'])} | - | "
                 f"{_fmt(tfree['median'])} |")
    lines += _baseline_lines(results)
    lines += ["", "## Answers to bad images (sent together with good ones, so batching servers batch them)", ""]
    for key, server in results["servers"].items():
        checks = [r["servers"][key].get("sanity") for r in results["rounds"] if r["servers"].get(key, {}).get("sanity")]
        if checks:
            statuses = sorted({st for chk in checks for st in chk["bad"]})
            good = all(chk["good_ok"] for chk in checks)
            goods = sorted({st for chk in checks for st in chk["good"]})
            lines.append(f"- {server['label']}: good images {'all 200' if good else f'answered {goods}'}; "
                         f"bad images answered {statuses}"
                         + ("" if good else " (one bad image fails every request of its batch)"))
    lines += ["", "## Set-up", ""]
    for key, server in results["servers"].items():
        ready = [r["servers"][key]["ready_s"] for r in results["rounds"] if r["servers"].get(key, {}).get("ready_s")]
        info = dict(server.get("info", {}))
        details = [r["servers"][key]["details"] for r in results["rounds"] if r["servers"].get(key, {}).get("details")]
        if details:
            info.update(details[0])
        ready_text = f"ready in {statistics.median(ready):.1f} s (median); " if ready else ""
        lines.append(f"- {server['label']}: {ready_text}{_info(info)}"
                     + (f" **not run: {server['unavailable']}**" if server.get("unavailable") else ""))
    failures = [(r["index"], k, v["error"]) for r in results["rounds"] for k, v in r["servers"].items()
                if v.get("error")]
    if failures:
        lines += ["", "## Failures", ""] + [f"- round {i + 1}, {k}: {e}" for i, k, e in failures]
    return "\n".join(lines) + "\n"


def _baseline_lines(results: dict[str, Any]) -> list[str]:
    """This tree against ``--baseline``'s checkout, as ratios within each round (only when one was served)."""
    if BASELINE not in results["servers"]:
        return []
    lines = ["", f"## Against the baseline ({results['servers'][BASELINE]['label']}; ratios within each round)", "",
             "| this tree / baseline | per round | median |", "|---|---|---|"]
    for kind, name, text in VS_BASELINE:
        ratios = []
        for rnd in results["rounds"]:
            ours, base = rnd["servers"].get(DEFAULT, {}), rnd["servers"].get(BASELINE, {})
            a = ours.get(kind, {}).get(name) if ours.get("ok") else None
            b = base.get(kind, {}).get(name) if base.get("ok") else None
            ratios.append(a / b if a is not None and b else None)
        lines.append(f"| {text} | {', '.join(_fmt(v) for v in ratios)} | {_fmt(_median(ratios))} |")
    base = results["summary"]["goals"][BASELINE]
    for key in ("c32_vs_triton", "mp12_c8_vs_triton"):
        lines.append(f"| (the baseline's own) {base[key]['text'].replace('imgclf default', 'baseline')} | "
                     f"{', '.join(_fmt(v) for v in base[key]['values'])} | {_fmt(base[key]['median'])} |")
    return lines
