"""The response cache: one model version's logits for image bytes it has already answered.

Real traffic repeats itself (retries, catalog images). The cache keeps the model's LOGITS row per
(model version key ``name:version``, sha256 of the image bytes), not answers: every answer is still
made by :func:`service.answer.answer` from those logits, so ``top_k``, ``min_score`` and abstaining give
the same answer cached or not by construction, and the monitor (metrics, drift, sampling) still sees
every answer. A hit skips decoding and inference.

One per worker (``service.http.edge.build_worker``), shared by /classify, /classify_batch and V2's
``image`` input; bounded by entries (``IMGCLF_CACHE_ENTRIES``, 0: off) and by the bytes of the rows it
keeps (``IMGCLF_CACHE_MAX_BYTES``), least recently used first out. A version a reload retires is
forgotten (a new version has a new key anyway). Single event loop: no lock; two concurrent misses of the
same bytes both infer and store the same row.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.http.served import ServedModel
    from service.settings import Settings

Key = tuple[str, bytes]  # (model version key, sha256 of the image bytes)
OUTCOMES = ("hit", "miss", "eviction")


class LogitsCache:
    """Logits rows by (model version, image digest), LRU, bounded by entries and bytes."""

    def __init__(self, max_entries: int, max_bytes: int, on_outcome: Callable[[str], None] | None = None) -> None:
        self.max_entries, self.max_bytes, self.on_outcome = max_entries, max_bytes, on_outcome
        self._rows: OrderedDict[Key, np.ndarray] = OrderedDict()
        self.bytes = 0  # the rows' bytes (numpy's nbytes) kept now
        self.counts: Counter[str] = Counter()  # this cache's outcomes (hit, miss, eviction), as in the metric

    @classmethod
    def from_settings(cls, settings: Settings, on_outcome: Callable[[str], None] | None = None) -> LogitsCache:
        return cls(settings.cache_entries, settings.cache_max_bytes, on_outcome)

    @classmethod
    def off(cls) -> LogitsCache:
        return cls(0, 0)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._rows)

    def key(self, model: str, data: bytes) -> Key | None:
        """The key of ``data`` for model version ``model`` (None when the cache is off: nothing is hashed)."""
        return (model, hashlib.sha256(data).digest()) if self.enabled else None

    def get(self, key: Key | None) -> np.ndarray | None:
        """The logits row kept for ``key`` (read-only), now the most recently used; None: a miss."""
        if key is None:
            return None
        row = self._rows.get(key)
        if row is None:
            self._count("miss")
            return None
        self._rows.move_to_end(key)
        self._count("hit")
        return row

    def lookup(self, model: str, data: bytes) -> tuple[Key | None, np.ndarray | None]:
        """:meth:`key` and :meth:`get` in one: the key to :meth:`put` the row under after a miss."""
        key = self.key(model, data)
        return key, self.get(key)

    def put(self, key: Key | None, row: np.ndarray) -> None:
        """Keep a copy of ``row`` (a batch's row is a view of the whole batch), evicting the least recently
        used entries past either bound; a row larger than the byte bound is not kept."""
        if key is None or row.nbytes > self.max_bytes:
            return
        kept = np.array(row, copy=True)
        kept.flags.writeable = False
        old = self._rows.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._rows[key] = kept
        self.bytes += kept.nbytes
        while len(self._rows) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self._rows.popitem(last=False)
            self.bytes -= evicted.nbytes
            self._count("eviction")

    def forget(self, retired: Iterable[ServedModel]) -> None:
        """Drop the rows of model versions a reload retired (not counted as evictions)."""
        gone = {served.key for served in retired}
        if not gone:
            return
        for key in [k for k in self._rows if k[0] in gone]:
            self.bytes -= self._rows.pop(key).nbytes

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)
