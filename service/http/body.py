"""Reading a request body at the boundary: size limit, minimum pace, and a cap on bodies in progress.

A slow client must not hold the service hostage. Admission counts a request only once its body is
here (``service.http.admission`` sits behind this), so trickling uploads cannot occupy its slots;
instead, here:

- at most ``max_receiving`` bodies are received at once per worker, so memory stays below that cap
  times the upload limit;
- a body must arrive at ``min_rate`` bytes/s on average once ``grace_s`` have passed, else 408 and
  the connection closes;
- when the cap is reached, a new upload takes the place of the one furthest behind that pace among
  those older than a second (408 for it), grace period or not. Only when none qualifies is the new
  one refused, with 503 and ``Retry-After``. The cap (128 by default) is far above what a worker
  decodes at once, so a hundred trickling connections leave room for normal clients;
- a body over ``max_body`` is 413 as soon as its declared or received length says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.http.errors import CLOSE, ClientGone, Overloaded, Receive, Scope, ServiceError

PROBATION_S = 1.0  # an upload younger than this keeps its place: a normal one is done by then


@dataclass(frozen=True)
class UploadPace:
    grace_s: float = 5.0
    min_rate: float = 10 * 1024  # bytes/s averaged from the start, checked after grace_s; 0: off


@dataclass(eq=False)
class _Upload:
    started: float
    received: int = 0
    evicted: asyncio.Event = field(default_factory=asyncio.Event)


class BodyReader:
    """One per worker, shared by every front door: reads bodies within the limits above, or raises the
    refusal as a :class:`~service.http.errors.ServiceError`."""

    def __init__(self, pace: UploadPace, max_receiving: int, clock: Callable[[], float] = time.monotonic,
                 on_receiving: Callable[[int], None] | None = None) -> None:
        self.pace = pace
        self.max_receiving = max_receiving
        self.on_receiving = on_receiving  # told the number of bodies in progress whenever it changes (a gauge)
        self._clock = clock
        self._uploads: set[_Upload] = set()

    @property
    def receiving(self) -> int:
        return len(self._uploads)

    async def read(self, scope: Scope, receive: Receive, max_body: int) -> bytes:
        """The whole body; raises ServiceError 413, 408 or 503 (or ClientGone) instead."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise _too_big(max_body)
        if len(self._uploads) >= self.max_receiving and not self._evict_slowest():
            busy = Overloaded(f"server busy: {len(self._uploads)} uploads already in progress on this worker "
                              f"(limit {self.max_receiving}); retry after 1 s", 1)
            busy.headers += CLOSE
            raise busy
        upload = _Upload(self._clock())
        self._uploads.add(upload)
        self._counted()
        try:
            return await self._receive(upload, receive, max_body)
        finally:
            self._uploads.discard(upload)
            self._counted()

    def _counted(self) -> None:
        if self.on_receiving is not None:
            self.on_receiving(len(self._uploads))

    def _behind(self, upload: _Upload, now: float) -> float:
        """How many bytes ``upload`` is behind the pace (<= 0: keeping it), grace period ignored."""
        return self.pace.min_rate * (now - upload.started) - upload.received

    def _evict_slowest(self) -> bool:
        """Make room by dropping the upload furthest behind the pace; False when all keep it."""
        if self.pace.min_rate <= 0:
            return False
        now = self._clock()
        candidates = [u for u in self._uploads if now - u.started >= PROBATION_S]
        slowest = max(candidates, key=lambda u: self._behind(u, now), default=None)  # furthest behind first
        if slowest is None or self._behind(slowest, now) <= 0:
            return False
        slowest.evicted.set()
        self._uploads.discard(slowest)  # its place is the newcomer's from now on
        return True

    def _deadline(self, upload: _Upload) -> float | None:
        """When more bytes must have arrived to keep the pace after the grace period (None: no limit)."""
        if self.pace.min_rate <= 0:
            return None
        return upload.started + self.pace.grace_s + upload.received / self.pace.min_rate

    async def _next(self, upload: _Upload, receive: Receive) -> dict | None:
        """The next ASGI message, or None when the upload fell behind or lost its place."""
        if upload.evicted.is_set():
            return None
        deadline = self._deadline(upload)
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        message = asyncio.ensure_future(receive())
        evicted = asyncio.ensure_future(upload.evicted.wait())
        done, _ = await asyncio.wait({message, evicted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        evicted.cancel()
        if message in done and not upload.evicted.is_set():
            return message.result()
        message.cancel()
        return None

    async def _receive(self, upload: _Upload, receive: Receive, max_body: int) -> bytes:
        chunks: list[bytes] = []
        while True:
            message = await self._next(upload, receive)
            if message is None:
                elapsed = self._clock() - upload.started
                why = "the server needed its place for a faster upload" if upload.evicted.is_set() else (
                    f"after the first {self.pace.grace_s:g} s a body must arrive at {self.pace.min_rate:g} bytes/s")
                raise ServiceError(408, "timeout", f"upload too slow: {upload.received} bytes in {elapsed:.1f} s; "
                                   f"{why}", CLOSE)
            if message["type"] == "http.disconnect":
                raise ClientGone(upload.received)
            chunk = message.get("body", b"")
            upload.received += len(chunk)
            if upload.received > max_body:
                raise _too_big(max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_big(max_body: int) -> ServiceError:
    return ServiceError(413, "request_too_large", f"request body is larger than {max_body} bytes", CLOSE)
