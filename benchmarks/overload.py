"""Overload: `imgclf serve` offered several times its capacity, then left alone to recover.

Phases, on one server with admission control configured (IMGCLF_MAX_QUEUE, IMGCLF_LATENCY_BUDGET_MS):
1. baseline: one client at a time (closed loop), the latency of a quiet service;
2. capacity: a few clients at once (closed loop), the throughput the server sustains;
3. overload: requests arrive at ``--factor`` x capacity (open loop, Poisson), whether or not earlier
   ones were answered; meanwhile /livez, /readyz and /metrics are probed;
4. recovery: one client at a time again, right after the load stops.
Reported: answers by status, how fast refusals come and whether each has Retry-After and the JSON error
object, the accepted requests' p50/p99, health probes, and recovery latency against the baseline.
The load generator shares the machine with the server (raw asyncio sockets, bodies encoded once).

    python -m benchmarks.overload [--repo DIR] [--factor 4] [--seconds 10]
                                  [--max-queue 32] [--latency-budget-ms 1000] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import Connection, multipart_request
from benchmarks.machine import NO_CACHE, RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import running_server

ROOT = Path(__file__).resolve().parents[1]
HEALTH = ("/livez", "/readyz", "/metrics")


# --- a cheap HTTP client that keeps the headers -----------------------------------------------------------


def get_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


# --- load ---------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 0: transport error (no answer)
    latency_ms: float  # from when the request was due (open loop) or sent (closed loop)
    retry_after: str | None = None
    kind: str | None = None  # the "kind" of a JSON error object


@dataclass
class Record:
    answers: list[Answer] = field(default_factory=list)

    def add(self, status: int, headers: dict[str, str], body: bytes, latency_ms: float) -> None:
        kind = None
        if status >= 400:
            try:
                kind = json.loads(body).get("kind")
            except (ValueError, AttributeError):
                kind = None
        self.answers.append(Answer(status, latency_ms, headers.get("retry-after"), kind))


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summarize(record: Record, wall_s: float) -> dict[str, Any]:
    ok = [a.latency_ms for a in record.answers if a.status == 200]
    refused = [a for a in record.answers if a.status in (429, 503)]
    statuses: dict[str, int] = {}
    for a in record.answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    return {
        "requests": len(record.answers), "wall_s": wall_s, "statuses": dict(sorted(statuses.items())),
        "ok": len(ok), "ok_rps": len(ok) / wall_s if wall_s else 0.0,
        "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99), "ok_max_ms": max(ok, default=None),
        "refused": len(refused),
        "refused_p50_ms": pct([a.latency_ms for a in refused], 50),
        "refused_p99_ms": pct([a.latency_ms for a in refused], 99),
        "refused_with_retry_after": sum(1 for a in refused if a.retry_after and a.retry_after.isdigit()),
        "refused_as_json_overloaded": sum(1 for a in refused if a.kind == "overloaded"),
        "retry_after_values": sorted({a.retry_after for a in refused if a.retry_after}),
        "other_errors": sum(1 for a in record.answers if a.status != 200 and a.status not in (429, 503)),
    }


async def closed_loop(url: str, raw: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last was answered."""
    record = Record()
    stop = time.perf_counter() + seconds

    async def client() -> None:
        conn = Connection(url)
        while (sent := time.perf_counter()) < stop:
            try:
                status, headers, body = await conn.request(raw)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                await conn.close()
                record.answers.append(Answer(0, (time.perf_counter() - sent) * 1000))
                continue
            record.add(status, headers, body, (time.perf_counter() - sent) * 1000)
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summarize(record, time.perf_counter() - start) | {"concurrency": concurrency}


async def open_loop(url: str, raw: bytes, rate: float, seconds: float, max_connections: int = 512,
                    probe_every_s: float = 0.25, seed: int = 0) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``seconds``; /livez, /readyz, /metrics probed meanwhile."""
    record, health = Record(), Record()
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(max_connections):
        pool.put_nowait(Connection(url))
    rng = random.Random(seed)
    host = urlsplit(url).netloc

    async def one(due: float) -> None:
        conn = await pool.get()
        try:
            status, headers, body = await conn.request(raw)
            record.add(status, headers, body, (time.perf_counter() - due) * 1000)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            await conn.close()
            record.answers.append(Answer(0, (time.perf_counter() - due) * 1000))
        finally:
            pool.put_nowait(conn)

    async def probe(stop: float) -> None:
        conn = Connection(url)
        i = 0
        while time.perf_counter() < stop:
            path = HEALTH[i % len(HEALTH)]
            i += 1
            sent = time.perf_counter()
            try:
                status, headers, _ = await conn.request(get_request(host, path))
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                await conn.close()
                status, headers = 0, {}
            health.add(status, headers, b"", (time.perf_counter() - sent) * 1000)
            await asyncio.sleep(probe_every_s)
        await conn.close()

    start = time.perf_counter()
    prober = asyncio.create_task(probe(start + seconds))
    tasks = []
    due = start
    while True:
        due += rng.expovariate(rate)
        if due - start >= seconds:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    await prober
    wall = time.perf_counter() - start
    while not pool.empty():
        await pool.get_nowait().close()
    health_lat = [a.latency_ms for a in health.answers]
    return summarize(record, wall) | {
        "offered_rps": rate,
        "health": {"probes": len(health.answers), "ok": sum(a.status == 200 for a in health.answers),
                   "p99_ms": pct(health_lat, 99), "max_ms": max(health_lat, default=None)},
    }


def metric_total(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


DURATION = "bentoml_service_request_duration_seconds"


def duration_buckets(text: str, endpoint: str = "/classify") -> dict[str, dict[float, float]]:
    """status -> {bucket upper bound in s: cumulative count} of BentoML's request-duration histogram."""
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{DURATION}_bucket" and sample.labels.get("endpoint") == endpoint:
                per_status = out.setdefault(sample.labels["http_response_code"], {})
                bound = float(sample.labels["le"])
                per_status[bound] = per_status.get(bound, 0.0) + sample.value  # summed over workers
    return out


def server_side(before: str, after: str, endpoint: str = "/classify") -> dict[str, dict[str, float | None]]:
    """Per status, what the server itself measured between two /metrics scrapes: count and the bucket bounds
    below which half and 99% of the answers fell.

    The server's clock starts when the request reaches it, so a load generator starved of CPU (a busy
    machine, this same process) cannot inflate these as it inflates the client-side latencies.
    """
    old, new = duration_buckets(before, endpoint), duration_buckets(after, endpoint)
    out: dict[str, dict[str, float | None]] = {}
    for status, buckets in new.items():
        cumulative = sorted((bound, count - old.get(status, {}).get(bound, 0.0)) for bound, count in buckets.items())
        if cumulative[-1][1] > 0:
            out[status] = {"count": cumulative[-1][1], "p50_le_ms": _bound_for(cumulative, 0.5),
                           "p99_le_ms": _bound_for(cumulative, 0.99)}
    return out


def _bound_for(cumulative: list[tuple[float, float]], share: float) -> float | None:
    """The smallest bucket bound (ms) holding ``share`` of the answers; None when only +Inf does."""
    bound = next(b for b, c in cumulative if c >= share * cumulative[-1][1])
    return None if bound == float("inf") else bound * 1000


def _seen_by_server(url: str, phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``phase()``'s client-side figures plus ``server_side``: the same requests by the server's histogram."""
    scraped = httpx.get(f"{url}/metrics", timeout=10).text
    figures = phase()
    return figures | {"server_side": server_side(scraped, httpx.get(f"{url}/metrics", timeout=10).text)}


def overload_run(url: str, image: bytes, *, factor: float = 4.0, seconds: float = 10.0, baseline_s: float = 4.0,
                 capacity_concurrency: int = 4, settle_s: float = 1.0) -> dict[str, Any]:
    """The four phases against a running server; the figures of each, and the refusals the metrics counted."""
    raw = multipart_request(urlsplit(url).netloc, "/classify", "image", "image.jpg", image)
    overloaded = 'imgclf_errors_total{kind="overloaded"'
    before = metric_total(httpx.get(f"{url}/metrics", timeout=10).text, overloaded)
    asyncio.run(closed_loop(url, raw, 1, 1.0))  # warm: connections, caches, the service-time estimate
    baseline = _seen_by_server(url, lambda: asyncio.run(closed_loop(url, raw, 1, baseline_s)))
    capacity = asyncio.run(closed_loop(url, raw, capacity_concurrency, baseline_s))
    rate = factor * capacity["ok_rps"]
    overload = _seen_by_server(url, lambda: asyncio.run(open_loop(url, raw, rate, seconds)))
    time.sleep(settle_s)
    recovery = _seen_by_server(url, lambda: asyncio.run(closed_loop(url, raw, 1, baseline_s)))
    counted = metric_total(httpx.get(f"{url}/metrics", timeout=10).text, overloaded) - before
    phases = {"baseline": baseline, "capacity": capacity, "overload": overload, "recovery": recovery}
    return phases | {"factor": factor, "refusals_counted_in_metrics": counted,
                     "refusals_in_all_phases": sum(phase["refused"] for phase in phases.values())}


# --- the benchmark ---------------------------------------------------------------------------------------------


def jpeg_photo(size: tuple[int, int] = (500, 375)) -> bytes:
    """A real photo (scikit-image's chelsea) at an ImageNet-like size, as JPEG."""
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def server_line(seen: dict[str, dict[str, float | None]]) -> str:
    def within(status: str) -> str:
        figures = seen.get(status)
        if not figures:
            return "none"
        return " and ".join(f"{share} within {'-' if figures[key] is None else f'{figures[key]:g}'} ms"
                            for share, key in (("half", "p50_le_ms"), ("99%", "p99_le_ms")))

    return (f"- As the server measured them (BentoML's request-duration histogram, overload phase): refusals "
            f"{within('503')}; accepted {within('200')}.")


def markdown(payload: dict[str, Any]) -> str:
    m, s, r = payload["machine"], payload["settings"], payload["result"]
    b, c, o, rec = r["baseline"], r["capacity"], r["overload"], r["recovery"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return "\n".join([
        "# Overload: several times capacity, then recovery",
        "",
        (f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}, bentoml "
         f"{m['versions']['bentoml']}; {m['date']}. imagenet-lite0 fp32, one {s['image_bytes']}-byte JPEG "
         f"({s['image_size'][0]}x{s['image_size'][1]}) per request to /classify. "
         + (f"Server: {s['url']}, with its own settings. " if s.get("url") else
            f"Server: {s['workers']} worker(s), IMGCLF_MAX_QUEUE={s['max_queue']}, "
            f"IMGCLF_LATENCY_BUDGET_MS={s['latency_budget_ms']:g}. ")
         + "The load generator runs on the same machine."),
        "",
        "| phase | offered | answered 200 | 200/s | p50 ms | p99 ms | refused (503) | refused p99 ms | other errors |",
        "|---|---|---|---|---|---|---|---|---|",
        (f"| baseline | 1 client | {b['ok']} | {b['ok_rps']:.1f} | {ms(b['ok_p50_ms'])} | {ms(b['ok_p99_ms'])} | "
        f"{b['refused']} | - | {b['other_errors']} |"),
        (f"| capacity | {c['concurrency']} clients | {c['ok']} | {c['ok_rps']:.1f} | {ms(c['ok_p50_ms'])} | "
        f"{ms(c['ok_p99_ms'])} | {c['refused']} | - | {c['other_errors']} |"),
        (f"| overload | {o['offered_rps']:.0f}/s ({r['factor']:g}x) | {o['ok']} | {o['ok_rps']:.1f} | "
        f"{ms(o['ok_p50_ms'])} | {ms(o['ok_p99_ms'])} | {o['refused']} | {ms(o['refused_p99_ms'])} | "
        f"{o['other_errors']} |"),
        (f"| recovery | 1 client | {rec['ok']} | {rec['ok_rps']:.1f} | {ms(rec['ok_p50_ms'])} | "
        f"{ms(rec['ok_p99_ms'])} | {rec['refused']} | - | {rec['other_errors']} |"),
        "",
        (f"- Refusals: {o['refused']} of {o['requests']} requests in the overload phase, all 503: "
        f"{o['refused_with_retry_after']} with Retry-After (values {', '.join(o['retry_after_values']) or '-'} s), "
        f"{o['refused_as_json_overloaded']} with the JSON error object (kind `overloaded`); "
        f"`imgclf_errors_total{{kind=\"overloaded\"}}` counted {r['refusals_counted_in_metrics']:.0f}."),
        server_line(o["server_side"]),
        (f"- Health during overload: {o['health']['ok']} of {o['health']['probes']} probes of /livez, /readyz, "
        f"/metrics answered 200, slowest {ms(o['health']['max_ms'])} ms."),
        f"- Server process and worker after the run: {payload['alive']}.",
        "",
        ("Latencies of the overload phase are measured from when each request was due (open loop), so they "
        "include any wait in the client's connection pool."),
        "",
    ])


def measure_own_server(args: argparse.Namespace, image: bytes) -> tuple[dict[str, Any], str]:
    """Start `imgclf serve` with the admission settings asked for, run the phases, and check no process changed."""
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        repo = imagenet_repository(args.repo, Path(tmp))
        env = {"IMGCLF_MAX_QUEUE": str(args.max_queue), "IMGCLF_LATENCY_BUDGET_MS": str(args.latency_budget_ms),
               "IMGCLF_WORKERS": str(args.workers)}
        with running_server(repo, Path(tmp) / "home", {**env, **NO_CACHE}) as server:
            before = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
            result = overload_run(server.url, image, factor=args.factor, seconds=args.seconds,
                                  baseline_s=args.baseline_seconds)
            after = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
            alive = "same processes, none restarted" if server.proc.poll() is None and before == after else (
                f"CHANGED: {sorted(before)} -> {sorted(after)}")
    return result, alive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository holding imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--url", help="measure this running server instead of starting one (its own settings apply)")
    parser.add_argument("--factor", type=float, default=4.0, help="offered load, in multiples of measured capacity")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the overload phase")
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--latency-budget-ms", type=float, default=1000.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--image-size", type=int, nargs=2, default=(500, 375))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    image = jpeg_photo(tuple(args.image_size))
    if args.url:
        result = overload_run(args.url, image, factor=args.factor, seconds=args.seconds, baseline_s=args.baseline_seconds)
        alive = "not checked (a server this script did not start)"
    else:
        result, alive = measure_own_server(args, image)
    payload = {
        "benchmark": "overload",
        "machine": machine_info(("onnxruntime", "bentoml", "numpy", "pillow")),
        "settings": {"url": args.url, "max_queue": args.max_queue, "latency_budget_ms": args.latency_budget_ms,
                     "workers": args.workers, "factor": args.factor, "seconds": args.seconds,
                     "image_size": list(args.image_size), "image_bytes": len(image)},
        "result": result,
        "alive": alive,
    }
    json_path, md_path = write_results("overload", payload, markdown(payload), args.out)
    o = result["overload"]
    print(f"overload at {o['offered_rps']:.0f}/s: {o['ok']} ok (p99 {o['ok_p99_ms'] or 0:.0f} ms), {o['refused']} "
          f"refused (p50 {o['refused_p50_ms'] or 0:.0f} ms); recovery p50 {result['recovery']['ok_p50_ms'] or 0:.0f} ms "
          f"vs baseline {result['baseline']['ok_p50_ms'] or 0:.0f} ms -> {json_path}, {md_path}")


if __name__ == "__main__":
    main()
