"""End to end over HTTP: the service under a closed and an open loop, against its ceiling and a naive baseline.

In one run, on the same JPEGs (real photos at mixed ImageNet-like sizes, and 12-megapixel photos):
- the in-process ceiling: cores / (decode-and-preprocess core-s + inference core-s per image at the
  best batch size, single-threaded session), measured here;
- `imgclf serve` in each server configuration (``--variant``), closed loop at each concurrency and open
  loop at fixed fractions of its measured capacity;
- the naive baseline (benchmarks/naive_server.py: PyTorch eager, full-size decode, one request at a
  time), closed loop.
The load generator (benchmarks/loadgen.py) runs on the same machine and takes some of its CPU.

    python -m benchmarks.http_e2e [--repo DIR] [--seconds 10] [--concurrency 1 8 32 64]
                                  [--variant NAME:ENV=VALUE,...] [--open-fractions 0.5 0.8]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.batch_throughput import ceiling, write_jpegs
from benchmarks.loadgen import closed_loop, multipart_request, open_loop
from benchmarks.machine import NO_CACHE, RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import free_port, running_server

MIXED_SIZES = [(500, 375), (640, 480), (400, 300), (375, 500), (800, 600), (300, 400)]
DEFAULT_VARIANTS = ["1 worker:IMGCLF_WORKERS=1", "2 workers x 1 thread:IMGCLF_WORKERS=2,IMGCLF_INTRA_OP_THREADS=1"]


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    return name, dict(a.split("=", 1) for a in assignments.split(",") if a)


def load(url: str, payloads: list[bytes], concurrencies: list[int], seconds: float,
         open_fractions: list[float], settle_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"closed": {}, "open": {}}
    for c in concurrencies:
        time.sleep(settle_s)  # let the previous phase's backlog drain before measuring the next
        out["closed"][str(c)] = asyncio.run(closed_loop(url, payloads, c, seconds))
        print(f"  closed c={c}: {fmt(out['closed'][str(c)])}", flush=True)
    if open_fractions and out["closed"]:
        capacity = max(r["throughput_rps"] for r in out["closed"].values())
        for fraction in open_fractions:
            rate = fraction * capacity
            time.sleep(settle_s)
            out["open"][f"{fraction:g}"] = asyncio.run(open_loop(url, payloads, rate, seconds))
            print(f"  open {rate:.0f}/s: {fmt(out['open'][f'{fraction:g}'])}", flush=True)
    return out


def fmt(r: dict[str, Any]) -> str:
    p = lambda v: f"{v:.0f}" if v is not None else "-"
    return (f"{r['throughput_rps']:.1f} req/s, p50 {p(r['p50_ms'])} p95 {p(r['p95_ms'])} p99 {p(r['p99_ms'])} ms, "
            f"{r['errors']} errors, {r['refused']} refused (503 + Retry-After)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--photo-concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--open-fractions", type=float, nargs="*", default=[0.5, 0.8])
    parser.add_argument("--variant", action="append", help="NAME:IMGCLF_X=V,... (repeatable)")
    parser.add_argument("--distinct", type=int, default=24, help="distinct JPEGs of each kind")
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before each phase (backlogs drain)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from service.batch.runner import usable_cores
    from service.repository import ModelRepository
    from training.sample_images import real_photos

    cores = usable_cores()
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    results: dict[str, Any] = {"cores": cores, "ceiling": {}, "imgclf": {}, "naive": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = imagenet_repository(args.repo, tmp)
        version = ModelRepository(repo).get("imagenet-lite0")
        photos = real_photos()
        files = {"imagenet": [p for i, size in enumerate(MIXED_SIZES)
                              for p in write_jpegs(tmp / f"in{i}", photos, max(1, args.distinct // len(MIXED_SIZES)),
                                                   size)],
                 "photo12mp": write_jpegs(tmp / "photos", photos, max(2, args.distinct // 3), None, args.megapixels)}
        for kind, paths in files.items():
            results["ceiling"][kind] = ceiling(paths, version.model_path, version.manifest.preprocessing, cores)
            print(f"ceiling {kind}: {results['ceiling'][kind]['ceiling_images_per_s']:.1f} img/s", flush=True)

        def payloads(kind: str, port: int) -> list[bytes]:
            return [multipart_request(f"127.0.0.1:{port}", "/classify", "image", p.name, p.read_bytes())
                    for p in files[kind]]

        for name, env in variants:
            print(f"imgclf serve ({name})", flush=True)
            with running_server(repo, tmp / "home", {**env, **NO_CACHE}) as srv:
                url, port = srv.url, int(srv.url.rsplit(":", 1)[1])
                results["imgclf"][name] = {
                    "env": env, "ready_s": srv.ready_s,
                    "imagenet": load(url, payloads("imagenet", port), args.concurrency, args.seconds,
                                     args.open_fractions, args.settle),
                    "photo12mp": load(url, payloads("photo12mp", port), args.photo_concurrency, args.seconds, [], args.settle),
                }
        if args.naive:
            port = free_port()
            print("naive baseline", flush=True)
            naive = [sys.executable, "-m", "benchmarks.naive_server", "--port", str(port)]
            with running_server(None, tmp / "naive", command=naive, port=port) as srv:
                url = srv.url
                results["naive"] = {
                    "ready_s": srv.ready_s,
                    "imagenet": load(url, payloads("imagenet", port), args.photo_concurrency, args.seconds, [], args.settle),
                    "photo12mp": load(url, payloads("photo12mp", port), args.photo_concurrency, args.seconds, [], args.settle),
                }
    results["machine"] = machine_info(("onnxruntime", "torch", "bentoml", "pillow", "numpy"))
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["targets"] = targets(results)
    write_results("http_e2e", results, markdown(results), args.out)


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from the best server configuration."""
    out: dict[str, Any] = {}
    best = max(r["imgclf"].items(), key=lambda kv: kv[1]["imagenet"]["closed"].get("32", {}).get("throughput_rps", 0),
               default=None)
    if best is None:
        return out
    name, b = best
    c32 = b["imagenet"]["closed"].get("32")
    if c32:
        out["c32_fraction_of_ceiling"] = {"variant": name, "value": c32["throughput_rps"] / r["ceiling"]["imagenet"][
            "ceiling_images_per_s"], "target": 0.8}
    c8 = b["imagenet"]["closed"].get("8")
    if c8 and c8["p50_ms"]:
        out["c8_p99_over_p50"] = {"variant": name, "value": c8["p99_ms"] / c8["p50_ms"], "errors": c8["errors"],
                                  "target": 3.0}
    naive32 = r.get("naive", {}).get("photo12mp", {}).get("closed", {}).get("32")
    ours32 = b["photo12mp"]["closed"].get("32")
    if naive32 and ours32 and naive32["throughput_rps"]:
        out["photo12mp_c32_over_naive"] = {"variant": name, "value": ours32["throughput_rps"] / naive32["throughput_rps"],
                                           "target": 3.0}
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# End to end over HTTP: imgclf serve vs its in-process ceiling and a naive baseline",
        "",
        (f"{m['cpu']}, {r['cores']} usable cores; onnxruntime {m['versions']['onnxruntime']}, bentoml "
        f"{m['versions']['bentoml']}, torch {m['versions']['torch']}; {m['date']}. Model: imagenet-lite0 fp32. "
        f"{r['settings']['seconds']:g} s per load phase; the load generator shares the machine."),
        "",
        "| input | in-process ceiling img/s | decode core-ms | inference core-ms |",
        "|---|---|---|---|",
    ]
    for kind, c in r["ceiling"].items():
        lines.append(f"| {kind} | {c['ceiling_images_per_s']:.1f} | {c['decode_core_ms']:.2f} | "
                     f"{c['inference_core_ms'][c['best_batch']]:.2f} (batch {c['best_batch']}) |")
    lines += ["", "| server | input | load | req/s | p50 ms | p95 ms | p99 ms | errors | refused (503) |",
              "|---|---|---|---|---|---|---|---|---|"]
    servers = [(f"imgclf ({n})", v) for n, v in r["imgclf"].items()] + ([("naive", r["naive"])] if r["naive"] else [])
    for server, v in servers:
        for kind in ("imagenet", "photo12mp"):
            for mode in ("closed", "open"):
                for key, x in v[kind][mode].items():
                    load_text = f"c={key}" if mode == "closed" else f"open {x['rate_rps']:.0f}/s"
                    p = lambda val: f"{val:.0f}" if val is not None else "-"
                    lines.append(f"| {server} | {kind} | {load_text} | {x['throughput_rps']:.1f} | {p(x['p50_ms'])} | "
                                 f"{p(x['p95_ms'])} | {p(x['p99_ms'])} | {x['errors']} | {x['refused']} |")
    lines += ["", "Ready after start: " + ", ".join(f"{s} {v['ready_s']:.1f} s" for s, v in servers), "",
              "| target | measured | goal |", "|---|---|---|"]
    for key, t in r["targets"].items():
        lines.append(f"| {key} ({t['variant']}) | {t['value']:.2f} | {'>=' if 'p99' not in key else '<='} {t['target']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
