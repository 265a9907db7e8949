"""What explains each served model, built once per worker and model version, forgotten at retirement.

An :class:`Explainer` reads and checks the version's head file, which is file I/O and numpy work: it
is built off the event loop, on the first ``/explain`` for that version, and kept. It lives here rather
than on :class:`ServedModel` so that the served model stays a model plus its batching queue and
lifecycle: one :class:`Explainers` per worker, beside its :class:`~service.http.monitor.Monitor`, and
like the monitor it drops what it kept for the versions a reload retired (:meth:`Explainers.forget`).

An entry belongs to one :class:`ServedModel` object, not only to its key: a rollback brings back a key
with a new model object, which gets an explainer of its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.explainer import Explainer
from service.http.served import ServedModel


@dataclass(frozen=True)
class _Entry:
    served: ServedModel
    building: asyncio.Future[Explainer]  # done once built; shared by the requests that asked meanwhile


class Explainers:
    """One worker's explainers, keyed by served model ("name:version"); all on that worker's event loop."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    async def get(self, served: ServedModel) -> Explainer:
        """How to explain ``served`` (built once, off the loop); ExplainError if its head is unreadable.

        A failed build is not kept: the next request tries again, as the file may be fixed meanwhile.
        """
        entry = self._entries.get(served.key)
        if entry is None or entry.served is not served:
            building = asyncio.ensure_future(asyncio.to_thread(Explainer, served.model))
            entry = self._entries[served.key] = _Entry(served, building)
        try:  # shielded: a cancelled request does not cancel the build the others wait on
            return await asyncio.shield(entry.building)
        except Exception:
            if self._entries.get(served.key) is entry:
                del self._entries[served.key]
            raise

    def forget(self, retired: list[ServedModel]) -> None:
        """Drop the explainers of versions a reload retired."""
        for served in retired:
            entry = self._entries.get(served.key)
            if entry is not None and entry.served is served:
                del self._entries[served.key]
