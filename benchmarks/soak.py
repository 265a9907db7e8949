"""Soak: many mixed requests and hot reloads against one `imgclf serve`; errors and memory over time.

A private copy of the repository gets a second version of imagenet-lite0 (the same weights), and the
server (admin token on, default admission settings) takes ``--requests`` requests from
``--concurrency`` clients: valid photos in several formats and sizes to /classify, /classify_batch with
a bad image among good ones, and invalid inputs (truncated, random bytes, text, empty, a
decompression bomb, a 1-pixel image, bad top_k, unknown model, not multipart). Meanwhile production is
switched between the two versions ``--reloads`` times (promote, then POST /admin/reload).

Passes when: every valid input gets 200 with the same top-1 as the first time it was seen (reloads
included), every invalid one gets its expected 4xx, every reload answers 200, and the resident memory
of the server (arbiter and workers) after the run is within ``--max-growth-mb`` of what it was after
warm-up (``--warmup`` requests and two reloads).

    python -m benchmarks.soak [--repo DIR] [--requests 20000] [--reloads 20] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import logging
import shutil
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.loadgen import BOUNDARY, Connection
from benchmarks.machine import RESULTS, machine_info, write_results
from benchmarks.overload import pct
from imgclf.devserver import running_server

log = logging.getLogger("soak")
NAME = "imagenet-lite0"
TOKEN = "soak-admin-token"


# --- inputs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One kind of request: its raw bytes and what a correct server answers."""

    name: str
    raw: bytes
    expect: int  # HTTP status
    valid: bool  # a valid input: errors on it are failures of the service
    batch_ok: int = 0  # /classify_batch: entries that must have predictions


def form(host: str, path: str, fields: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart POST; ``(name, filename, data)``, filename None for a plain field."""
    parts = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def png_bomb(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def photos() -> dict[str, bytes]:
    """Real photos (scikit-image) in several formats and sizes."""
    from PIL import Image
    from skimage import data

    def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    chelsea, coffee = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())
    rocket, astronaut = Image.fromarray(data.rocket()), Image.fromarray(data.astronaut())
    return {
        "chelsea.jpg": encode(chelsea, "JPEG", quality=90),
        "coffee.png": encode(coffee.resize((300, 200)), "PNG"),
        "rocket.webp": encode(rocket, "WEBP"),
        "astronaut_small.jpg": encode(astronaut.resize((160, 160)), "JPEG", quality=85),
        "chelsea_big.jpg": encode(chelsea.resize((1600, 1200)), "JPEG", quality=90),
    }


def cases(host: str) -> list[Case]:
    good = photos()
    jpeg = good["chelsea.jpg"]
    one = [Case(f"classify {n}", form(host, "/classify", [("image", n, d), ("top_k", None, b"3")]), 200, True)
           for n, d in good.items()]
    from PIL import Image

    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    batch = Case("classify_batch 3 good + 1 bad", form(host, "/classify_batch", [
        ("images", "a.jpg", jpeg), ("images", "b.txt", b"not an image"), ("images", "c.png", good["coffee.png"]),
        ("images", "d.webp", good["rocket.webp"]), ("top_k", None, b"1")]), 200, True, batch_ok=3)
    bad = [
        Case("truncated jpeg", form(host, "/classify", [("image", "t.jpg", jpeg[: len(jpeg) // 2])]), 400, False),
        Case("random bytes", form(host, "/classify", [("image", "r.jpg", bytes(range(256)) * 20)]), 415, False),
        Case("text as jpg", form(host, "/classify", [("image", "n.jpg", b"just some notes")]), 415, False),
        Case("empty file", form(host, "/classify", [("image", "e.jpg", b"")]), 415, False),
        Case("png bomb", form(host, "/classify", [("image", "b.png", png_bomb(100_000, 100_000))]), 413, False),
        Case("1 pixel", form(host, "/classify", [("image", "p.png", tiny.getvalue())]), 400, False),
        Case("top_k 0", form(host, "/classify", [("image", "a.jpg", jpeg), ("top_k", None, b"0")]), 400, False),
        Case("unknown model", form(host, "/classify", [("image", "a.jpg", jpeg), ("model", None, b"nope")]), 404, False),
        Case("url in file field", form(host, "/classify", [("image", None, b"http://127.0.0.1:9/x.jpg")]), 400, False),
        Case("not multipart", f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
             "Content-Length: 2\r\n\r\n{}".encode(), 400, False),
    ]
    return one + [batch] + bad


def mix(all_cases: list[Case]) -> list[Case]:
    """Valid single images about 60%, batches about 10%, invalid about 30%, interleaved."""
    valid = [c for c in all_cases if c.valid and not c.batch_ok]
    batch = [c for c in all_cases if c.batch_ok]
    bad = [c for c in all_cases if not c.valid]
    out: list[Case] = []
    for i in range(10):
        out += [valid[(i * 6 + j) % len(valid)] for j in range(6)]
        out.append(batch[0])
        out += [bad[(i * 3 + j) % len(bad)] for j in range(3)]
    return out


# --- running --------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    valid: int = 0
    valid_errors: list[str] = field(default_factory=list)
    invalid: int = 0
    invalid_unexpected: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # valid requests
    top1: dict[str, str] = field(default_factory=dict)  # case -> first top-1 seen
    versions: dict[int, int] = field(default_factory=dict)


def check(case: Case, status: int, body: bytes, tally: Tally) -> None:
    if not case.valid:
        tally.invalid += 1
        kind = None
        try:
            data = json.loads(body)
            kind = data.get("kind") if data.get("status") == status else None
        except (ValueError, AttributeError):
            pass
        if status != case.expect or not kind:
            tally.invalid_unexpected.append(f"{case.name}: {status} {body[:200]!r}")
        return
    tally.valid += 1
    if status != 200:
        tally.valid_errors.append(f"{case.name}: {status} {body[:200]!r}")
        return
    data = json.loads(body)
    tally.versions[data["version"]] = tally.versions.get(data["version"], 0) + 1
    if case.batch_ok:
        results = data["results"]
        labels = [r["predictions"][0]["label"] if r["predictions"] else None for r in results]
        if sum(label is not None for label in labels) != case.batch_ok or results[1]["error"] is None:
            tally.valid_errors.append(f"{case.name}: entries {labels}")
            return
        top1 = ",".join(str(label) for label in labels)
    else:
        top1 = data["predictions"][0]["label"]
    first = tally.top1.setdefault(case.name, top1)
    if top1 != first:
        tally.valid_errors.append(f"{case.name}: top-1 {top1!r}, before {first!r}")


async def run_requests(url: str, plan: list[Case], count: int, concurrency: int, tally: Tally,
                       on_progress: Any = None) -> float:
    """Send ``count`` requests cycling through ``plan``; returns the wall time."""
    order = itertools.islice(itertools.cycle(plan), count)
    done = 0

    async def client() -> None:
        nonlocal done
        conn = Connection(url)
        for case in order:  # shared iterator: each case is taken once
            sent = time.perf_counter()
            try:
                status, _headers, body = await conn.request(case.raw)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                await conn.close()
                status, body = 0, repr(exc).encode()
            if case.valid and status == 200:
                tally.latencies_ms.append((time.perf_counter() - sent) * 1000)
            check(case, status, body, tally)
            done += 1
            if on_progress is not None:
                await on_progress(done)
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start


def add_copy(repo: Any, name: str) -> int:
    """A second version with the same files: a stand-in for a retrained model, answers unchanged."""
    from service.repository import copy_writer

    return repo.add_version(name, copy_writer(repo.get(name, 1).path)).manifest.version


def soak(repo_root: Path, home: Path, requests: int, reloads: int, warmup: int, concurrency: int) -> dict[str, Any]:
    from service.repository import ModelRepository

    repo = ModelRepository(repo_root)
    other = add_copy(repo, NAME)
    versions = [other, 1]
    reload_results: list[dict[str, Any]] = []
    rss: list[tuple[int, float]] = []  # (requests done, MB)
    # One worker: the admin reload reaches it at once, and its RSS is what the recorded figures compare
    # (the default, one worker per core, would double the tree's memory and race a second worker's poll).
    with running_server(repo_root, home, {"IMGCLF_ADMIN_TOKEN": TOKEN, "IMGCLF_WORKERS": "1"}) as server:
        host = urlsplit(server.url).netloc
        plan = mix(cases(host))
        admin = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})

        switching = threading.Lock()  # one switch at a time: fast answers can start the next before one ends

        def switch(version: int) -> None:
            with switching:
                _switch(version)

        def _switch(version: int) -> None:
            repo.promote(NAME, version)
            start = time.perf_counter()
            response = admin.post("/admin/reload")
            ok = response.status_code == 200 and response.json()["models"] == [{"name": NAME, "version": version}]
            reload_results.append({"to": version, "status": response.status_code, "ok": ok,
                                   "seconds": time.perf_counter() - start})
            if not ok:
                log.error("reload to %d failed: %s %s", version, response.status_code, response.text[:300])

        # warm-up: allocators, caches, both versions loaded once
        warm = Tally()
        asyncio.run(run_requests(server.url, plan, warmup, concurrency, warm))
        switch(versions[0])
        switch(versions[1])
        asyncio.run(run_requests(server.url, plan, warmup, concurrency, warm))
        warm_reloads = len(reload_results)
        baseline = server.rss()
        rss.append((0, baseline / 2**20))

        tally = Tally()
        every = max(1, requests // (reloads + 1)) if reloads else requests + 1
        sample_every = max(1, requests // 40)
        state = {"reloads": 0}

        async def progress(done: int) -> None:
            if done % sample_every == 0:
                rss.append((done, server.rss() / 2**20))
            if done % every == 0 and state["reloads"] < reloads:
                state["reloads"] += 1
                version = versions[(state["reloads"] - 1) % 2]  # the other version, then back to 1
                await asyncio.to_thread(switch, version)  # the other clients keep sending meanwhile
            if done % 1000 == 0:
                log.info("%d/%d requests, %d reloads, rss %.1f MB", done, requests, state["reloads"], rss[-1][1])

        wall = asyncio.run(run_requests(server.url, plan, requests, concurrency, tally, progress))
        time.sleep(1.0)  # let retired engines drain
        final = server.rss()
        rss.append((requests, final / 2**20))
        alive = server.proc.poll() is None
        errors_metric = httpx.get(f"{server.url}/metrics", timeout=10).text
        admin.close()
    main_reloads = reload_results[warm_reloads:]
    counted = {}
    for line in errors_metric.splitlines():
        if line.startswith("imgclf_errors_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            counted[kind] = counted.get(kind, 0) + float(line.rsplit(" ", 1)[1])
    return {
        "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
        "valid": tally.valid, "valid_errors": len(tally.valid_errors), "valid_error_examples": tally.valid_errors[:10],
        "invalid": tally.invalid, "invalid_unexpected": len(tally.invalid_unexpected),
        "invalid_unexpected_examples": tally.invalid_unexpected[:10],
        "valid_p50_ms": pct(tally.latencies_ms, 50), "valid_p99_ms": pct(tally.latencies_ms, 99),
        "answers_by_version": {str(k): v for k, v in sorted(tally.versions.items())},
        "top1": tally.top1,
        "reloads": len(main_reloads), "reloads_ok": sum(r["ok"] for r in main_reloads),
        "reload_failures": sum(not r["ok"] for r in main_reloads),
        "reload_seconds_max": max((r["seconds"] for r in main_reloads), default=None),
        "warmup_requests": 2 * warmup, "warmup_reloads": warm_reloads,
        "rss_after_warmup_mb": baseline / 2**20, "rss_final_mb": final / 2**20,
        "rss_growth_mb": (final - baseline) / 2**20, "rss_max_mb": max(mb for _, mb in rss),
        "rss_samples": rss, "server_alive": alive, "errors_total_by_kind": counted,
    }


def markdown(payload: dict[str, Any]) -> str:
    m, s, r = payload["machine"], payload["settings"], payload["result"]
    return "\n".join([
        "# Soak: mixed traffic and hot reloads",
        "",
        (f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}, bentoml "
         f"{m['versions']['bentoml']}; {m['date']}. imagenet-lite0 fp32, one worker, default admission settings; "
         f"{s['concurrency']} clients on the same machine; warm-up {r['warmup_requests']} requests and "
         f"{r['warmup_reloads']} reloads before the memory baseline."),
        "",
        (f"**{'PASSED' if payload['passed'] else 'FAILED'}** (valid inputs without error, invalid inputs with their "
        f"expected 4xx, every reload 200, memory growth under {s['max_growth_mb']} MB)."),
        "",
        ("| requests | wall s | req/s | valid (errors) | invalid (unexpected answers) | reloads (failed) | "
        "valid p50 / p99 ms | RSS after warm-up MB | RSS final MB | growth MB | max MB |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        (f"| {r['requests']} | {r['wall_s']:.0f} | {r['requests_per_s']:.1f} | {r['valid']} ({r['valid_errors']}) | "
         f"{r['invalid']} ({r['invalid_unexpected']}) | {r['reloads']} ({r['reload_failures']}) | "
         f"{r['valid_p50_ms'] or 0:.0f} / {r['valid_p99_ms'] or 0:.0f} | {r['rss_after_warmup_mb']:.1f} | "
         f"{r['rss_final_mb']:.1f} | {r['rss_growth_mb']:+.1f} | {r['rss_max_mb']:.1f} |"),
        "",
        f"- Answers by model version: {r['answers_by_version']}; slowest reload {r['reload_seconds_max'] or 0:.2f} s.",
        f"- `imgclf_errors_total` by kind at the end: {r['errors_total_by_kind']}.",
        f"- Top-1 per valid input (the same on every answer): {r['top1']}.",
        "- Resident memory (MB) after N requests of the measured phase: "
        + ", ".join(f"{n}: {mb:.0f}" for n, mb in r["rss_samples"][:: max(1, len(r["rss_samples"]) // 10)]) + ".",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository holding imagenet-lite0 (copied; default: bootstrap)")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1000, help="requests before and after the two warm-up reloads")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        if args.repo is not None:
            shutil.copytree(args.repo, root)
        else:
            from service.repository import ModelRepository
            from training.bootstrap import bootstrap

            bootstrap(ModelRepository(root))
        result = soak(root, Path(tmp) / "home", args.requests, args.reloads, args.warmup, args.concurrency)
    passed = (result["valid_errors"] == 0 and result["invalid_unexpected"] == 0 and result["reload_failures"] == 0
              and result["reloads_ok"] == args.reloads and result["rss_growth_mb"] < args.max_growth_mb
              and result["server_alive"])
    payload = {
        "benchmark": "soak",
        "machine": machine_info(("onnxruntime", "bentoml", "numpy", "pillow")),
        "settings": {"requests": args.requests, "reloads": args.reloads, "warmup": args.warmup,
                     "concurrency": args.concurrency, "max_growth_mb": args.max_growth_mb},
        "result": result,
        "passed": passed,
    }
    json_path, md_path = write_results("soak", payload, markdown(payload), args.out)
    print(f"{'PASSED' if passed else 'FAILED'}: {result['requests']} requests in {result['wall_s']:.0f}s, "
          f"{result['valid_errors']} errors on {result['valid']} valid, {result['invalid_unexpected']} unexpected on "
          f"{result['invalid']} invalid, {result['reloads_ok']}/{args.reloads} reloads, RSS "
          f"{result['rss_growth_mb']:+.1f} MB after warm-up -> {json_path}, {md_path}")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
