"""The response cache (IMGCLF_CACHE_ENTRIES): throughput and p99 with it on and off, as traffic repeats itself.

One `imgclf serve` per setting (on: the defaults; off: IMGCLF_CACHE_ENTRIES=0), the settings alternating
in each round; on each server a closed loop at ``--concurrency`` per repeat share (0%, 50%, 90% of the
requests send one of ``--hot`` images already seen, the rest an image no request sent before). Images:
real photos (training.sample_images.real_photos) made into distinct JPEGs at ImageNet-like sizes; a
request's image is one of them with a JPEG comment segment naming the request, so every "new" image has
new bytes (a miss) while decoding and inference cost what the photo costs. Ratios are on/off within
the same round. The goal: at 0% repeats the cache costs under 2% of throughput (one sha256 per image).

    python -m benchmarks.response_cache [--repo DIR] [--seconds 10] [--rounds 2] [--concurrency 32]
                                       [--shares 0 0.5 0.9] [--name response_cache]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import struct
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.batch_throughput import write_jpegs
from benchmarks.loadgen import closed_loop, multipart_request
from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import running_server

SIZES = [(500, 375), (640, 480), (400, 300), (375, 500)]
SETTINGS = {"on": {}, "off": {"IMGCLF_CACHE_ENTRIES": "0"}}


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: new bytes (a new sha256), the same pixels."""
    note = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(note) + 2) + note + jpeg[2:]


class Traffic:
    """Request ``i``'s multipart body, made when sent: one of the hot images for ``share`` of the requests
    (spread evenly), else a photo with a comment no other request (of this phase) carries."""

    def __init__(self, host: str, photos: list[bytes], share: float, hot: int, phase: str) -> None:
        self.host, self.photos, self.share, self.phase = host, photos, share, phase
        self.hot = [self._body(with_comment(photos[i % len(photos)], f"hot {phase} {i}")) for i in range(hot)]

    def _body(self, jpeg: bytes) -> bytes:
        return multipart_request(self.host, "/classify", "image", "a.jpg", jpeg)

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> bytes:
        if (i * 37) % 100 < self.share * 100:  # an even spread of repeats through the sequence
            return self.hot[i % len(self.hot)]
        return self._body(with_comment(self.photos[i % len(self.photos)], f"new {self.phase} {i}"))


def cache_counts(url: str) -> dict[str, float]:
    """imgclf_cache_total by outcome, summed over the workers (the server's /metrics)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("imgclf_cache_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def run_server(repo: Path, home: Path, env: dict[str, str], photos: list[bytes], args: argparse.Namespace,
               round_no: int, setting: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with running_server(repo, home, env) as srv:
        host = srv.url.split("//", 1)[1]
        for share in args.shares:
            time.sleep(args.settle)
            traffic = Traffic(host, photos, share, args.hot, f"{round_no}-{setting}-{share:g}")
            result = asyncio.run(closed_loop(srv.url, traffic, args.concurrency, args.seconds))  # type: ignore[arg-type]
            out[f"{share:g}"] = result
            print(f"  round {round_no} cache {setting} repeats {share:.0%}: {result['throughput_rps']:.1f} img/s, "
                  f"p99 {result['p99_ms'] or 0:.0f} ms, {result['errors']} errors", flush=True)
        out["cache_total"] = cache_counts(srv.url)
    return out


def summarise(rounds: list[dict[str, Any]], shares: list[float]) -> dict[str, Any]:
    """Per repeat share: mean img/s and p99 per setting, and the on/off throughput ratio of each round."""
    out: dict[str, Any] = {}
    for share in shares:
        key = f"{share:g}"
        row: dict[str, Any] = {}
        for setting in SETTINGS:
            row[f"{setting}_img_s"] = statistics.mean(r[setting][key]["throughput_rps"] for r in rounds)
            row[f"{setting}_p99_ms"] = statistics.mean(r[setting][key]["p99_ms"] or 0 for r in rounds)
            row[f"{setting}_errors"] = sum(r[setting][key]["errors"] for r in rounds)
        row["ratios"] = [r["on"][key]["throughput_rps"] / r["off"][key]["throughput_rps"] for r in rounds]
        row["ratio"] = statistics.mean(row["ratios"])
        out[key] = row
    return out


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        "# Response cache: on vs off as traffic repeats itself",
        "",
        (f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}, bentoml "
         f"{m['versions']['bentoml']}, numpy {m['versions']['numpy']}, pillow {m['versions']['pillow']}; {m['date']}. "
         f"Model: imagenet-lite0 fp32, default workers. /classify, closed loop c={s['concurrency']}, "
         f"{s['seconds']:g} s per phase, {s['rounds']} rounds (cache on and off alternating, one server each); "
         f"repeats are {s['hot']} hot images, the rest new bytes each. The load generator shares the machine."),
        "",
        "| repeats | on img/s | off img/s | on/off (per round) | on p99 ms | off p99 ms | errors on/off |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, row in r["summary"].items():
        per_round = ", ".join(f"{x:.3f}" for x in row["ratios"])
        lines.append(f"| {float(key):.0%} | {row['on_img_s']:.1f} | {row['off_img_s']:.1f} | {row['ratio']:.3f} "
                     f"({per_round}) | {row['on_p99_ms']:.0f} | {row['off_p99_ms']:.0f} | "
                     f"{row['on_errors']}/{row['off_errors']} |")
    goal = r["summary"].get("0")
    if goal is not None:
        lines += ["", f"Goal: at 0% repeats on/off >= 0.98; measured {goal['ratio']:.3f}."]
    lines += ["", "imgclf_cache_total of each cache-on server (all its phases): " + "; ".join(
        f"round {i}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rd["on"]["cache_total"].items()))
        for i, rd in enumerate(r["rounds"], 1))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 0.9], help="shares of repeated images")
    parser.add_argument("--hot", type=int, default=16, help="distinct images the repeats are drawn from")
    parser.add_argument("--distinct", type=int, default=24, help="distinct photos the new images are made from")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before each phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="response_cache", help="results file name (NAME.md, NAME.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from training.sample_images import real_photos

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = imagenet_repository(args.repo, tmp)
        photos = real_photos()
        jpegs = [p.read_bytes() for i, size in enumerate(SIZES)
                 for p in write_jpegs(tmp / f"in{i}", photos, max(1, args.distinct // len(SIZES)), size)]
        for round_no in range(1, args.rounds + 1):
            order = list(SETTINGS) if round_no % 2 else list(reversed(SETTINGS))  # alternate who goes first
            rounds.append({setting: run_server(repo, tmp / f"home-{round_no}-{setting}", SETTINGS[setting], jpegs,
                                               args, round_no, setting) for setting in order})
    results: dict[str, Any] = {
        "machine": machine_info(("onnxruntime", "bentoml", "pillow", "numpy")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rounds": rounds,
        "summary": summarise(rounds, args.shares),
    }
    write_results(args.name, results, markdown(results), args.out)
    print(markdown(results))


if __name__ == "__main__":
    main()
