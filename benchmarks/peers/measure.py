"""What one round measures: the in-process ceiling, and load phases with every side's CPU accounted.

A phase is a closed loop of the project's load generator (``benchmarks.loadgen``) after a short
warm-up loop. Around it: the server's CPU (psutil over its whole process tree), the load generator's
own (``getrusage``), and the machine's busy time, so what other processes took during the phase is
on record too (this host is shared).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from typing import Any

import psutil

from benchmarks.loadgen import Connection, closed_loop
from imgclf.devserver import tree_cpu_seconds

TAIL_LIMIT_S = 150.0  # longest wait for answers past a phase's end (TorchServe's own timeout is 120 s)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def ceiling(images: list[bytes], model_path: Any, spec: Any, n_cores: int) -> dict[str, Any]:
    """cores / (decode-and-preprocess + inference core-seconds per image), from bytes in memory.

    Decode is ``image_to_tensor`` over the images (after a warm pass); inference a single-threaded
    session at batch 1 and 8 (the best is used; larger batches gain nothing on this CPU, NOTES.md 3).
    """
    from benchmarks.batch_throughput import inference_core_seconds
    from service.preprocessing import DecodeLimits, image_to_tensor

    limits = DecodeLimits()
    tensors = [image_to_tensor(d, spec, limits) for d in images[:2]]
    start = time.process_time()
    tensors = [image_to_tensor(d, spec, limits) for d in images]
    decode = (time.process_time() - start) / len(images)
    per_batch = inference_core_seconds(model_path, tensors, (1, 8), images_per_size=48)
    best = min(per_batch, key=per_batch.__getitem__)
    work = decode + per_batch[best]
    return {"decode_core_ms": decode * 1000, "inference_core_ms": per_batch[best] * 1000, "best_batch": best,
            "work_core_ms": work * 1000, "ceiling_images_per_s": n_cores / work}


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def phase(url: str, payloads: list[bytes], concurrency: int, seconds: float, warmup_s: float,
          server_pid: int) -> dict[str, Any]:
    """Closed loop at ``concurrency`` for ``seconds`` (after ``warmup_s`` of the same, not counted).

    Throughput is answers over the whole window, the clients' last requests included (they end past
    ``seconds`` by about one latency: by Little's law that adds as many answers as time, so the rate
    stays unbiased where the generator's own ``ok / seconds`` is not for slow servers).
    """
    limit = seconds + TAIL_LIMIT_S  # a server that stops answering fails the phase instead of hanging it
    if warmup_s > 0:
        asyncio.run(asyncio.wait_for(closed_loop(url, payloads, concurrency, warmup_s, warmup_s=0), limit))
    load1 = os.getloadavg()[0]
    server0, client0, busy0, t0 = tree_cpu_seconds(server_pid), _self_cpu_s(), _busy_s(), time.perf_counter()
    result = asyncio.run(asyncio.wait_for(closed_loop(url, payloads, concurrency, seconds, warmup_s=0), limit))
    wall = time.perf_counter() - t0
    server_s, client_s = tree_cpu_seconds(server_pid) - server0, _self_cpu_s() - client0
    busy = _busy_s() - busy0
    answered = sum(result["statuses"].values()) + result["transport_errors"]
    ok = result["ok"]
    return {
        "concurrency": concurrency, "wall_s": wall, "ok": ok, "errors": result["errors"],
        "refused": result["refused"], "statuses": result["statuses"], "transport_errors": result["transport_errors"],
        "images_per_s": ok / wall, "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "p99_over_p50": (result["p99_ms"] / result["p50_ms"]) if result["p50_ms"] else None,
        "answered": answered, "server_cpu_s": server_s, "client_cpu_s": client_s,
        # per classified image: refusals (503 + Retry-After) and 4xx cost little, and are not what is compared
        "server_core_ms_per_image": 1000 * server_s / max(1, ok),
        "server_core_ms_per_request": 1000 * server_s / max(1, answered),
        "client_core_ms_per_request": 1000 * client_s / max(1, answered),
        "server_cores": server_s / wall, "client_cores": client_s / wall,
        "other_cores": max(0.0, busy - server_s - client_s) / wall, "load_average_1m": load1,
    }


async def _mixed(url: str, good: list[bytes], bad: list[bytes]) -> dict[str, list[int]]:
    async def one(raw: bytes) -> int:
        conn = Connection(url)
        try:
            status, _, _ = await conn.request(raw)
            return status
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            return 0
        finally:
            await conn.close()

    statuses = await asyncio.gather(*(one(r) for r in good + bad))
    return {"good": list(statuses[:len(good)]), "bad": list(statuses[len(good):])}


def sanity(url: str, good: list[bytes], bad: list[bytes]) -> dict[str, Any]:
    """Good and bad images at once (so a batching server batches them together): their statuses."""
    out = asyncio.run(asyncio.wait_for(_mixed(url, good, bad), TAIL_LIMIT_S))
    out["good_ok"] = all(s == 200 for s in out["good"])
    out["bad_4xx"] = all(400 <= s < 500 for s in out["bad"])
    return out
