"""A small, cheap HTTP load generator: closed loop at a concurrency, or open loop at a request rate.

It runs on the machine it measures, so it must cost little: requests are multipart bodies encoded once,
sent over keep-alive connections with asyncio streams, and responses are parsed only as far as the
status line and Content-Length. Latency is measured from when a request was due (open loop) or sent
(closed loop) to the last byte of the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

BOUNDARY = "imgclf-load-boundary"


def multipart_request(host: str, path: str, field_name: str, filename: str, data: bytes) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)  # successful requests
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    def record(self, status: int, latency_ms: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.latencies_ms.append(latency_ms)

    def summary(self, wall_s: float) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] if lat else None

        refused = self.statuses.get(503, 0) + self.statuses.get(429, 0)  # overload answers, by design
        errors = sum(n for s, n in self.statuses.items() if not 200 <= s < 300) + self.transport_errors - refused
        return {"ok": len(lat), "errors": errors, "refused": refused,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "transport_errors": self.transport_errors, "wall_s": wall_s, "throughput_rps": len(lat) / wall_s,
                "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "mean_ms": statistics.fmean(lat) if lat else None}


class Connection:
    """One keep-alive connection; reopened after the server closes it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        reused = self.writer is not None and not self.writer.is_closing()
        if not reused:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(raw)
            await self.writer.drain()
            line = await self.reader.readline()
        except (ConnectionError, OSError):
            line = b""
        if not line:
            await self.close()
            if reused:  # the server closed an idle keep-alive connection: reconnect once, like HTTP clients do
                return await self.request(raw)
            raise ConnectionError("server closed the connection")
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while (size := int((await self.reader.readline()).strip(), 16)) > 0:
                body += await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if "close" in headers.get("connection", "").lower():
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.writer = None


async def closed_loop(url: str, payloads: list[bytes], concurrency: int, seconds: float,
                      warmup_s: float = 1.0) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last answered, or after the
    ``Retry-After`` of a 503/429 (as a well-behaved client does)."""
    outcome = Outcome()
    rotation = itertools.cycle(range(len(payloads)))
    measuring_from = time.perf_counter() + warmup_s
    stop_at = measuring_from + seconds

    async def client() -> None:
        conn = Connection(url)
        while (now := time.perf_counter()) < stop_at:
            payload = payloads[next(rotation)]
            try:
                status, headers, _ = await conn.request(payload)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                await conn.close()
                if now >= measuring_from:
                    outcome.transport_errors += 1
                continue
            if now >= measuring_from:
                outcome.record(status, (time.perf_counter() - now) * 1000)
            if status in (429, 503):
                retry_after = float(headers.get("retry-after", "1") or 1)
                await asyncio.sleep(min(retry_after, max(0.0, stop_at - time.perf_counter())))
        await conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcome.summary(seconds) | {"mode": "closed", "concurrency": concurrency}


async def open_loop(url: str, payloads: list[bytes], rate: float, seconds: float, max_connections: int = 256,
                    seed: int = 0) -> dict[str, Any]:
    """Requests arrive at ``rate`` per second (Poisson), whether or not earlier ones were answered."""
    outcome = Outcome()
    pool: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()  # reuse the warmest connections first
    for _ in range(max_connections):
        pool.put_nowait(Connection(url))
    rng = random.Random(seed)
    tasks = []

    async def one(due: float, payload: bytes) -> None:
        conn = await pool.get()
        try:
            status, _, _ = await conn.request(payload)
            outcome.record(status, (time.perf_counter() - due) * 1000)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            await conn.close()
            outcome.transport_errors += 1
        finally:
            pool.put_nowait(conn)

    start = time.perf_counter()
    due = start
    for i in itertools.count():
        due += rng.expovariate(rate)
        if due - start >= seconds:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due, payloads[i % len(payloads)])))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    while not pool.empty():
        await pool.get_nowait().close()
    return outcome.summary(wall) | {"mode": "open", "rate_rps": rate}
