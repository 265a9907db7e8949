"""The catalog one worker serves now, and the one place it changes: reloads and watching the aliases."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from service.http.catalog import Catalog, Change, ReloadRefusedError
from service.http.served import ServedModel
from service.settings import Settings

log = logging.getLogger(__name__)

SwapHook = Callable[[list[ServedModel], list[ServedModel]], None]  # (added, retired), e.g. for metrics
PollHook = Callable[[Catalog], None]  # after each look at the repository (its store reachable or not)


class LiveCatalog:
    """The catalog one worker serves now, and the one place it changes.

    Everything here runs on the worker's event loop, like the requests: picking a
    model and taking its lease happen with no await between, and the swap plus
    the retirement of replaced models is one synchronous step, so no request can
    lease a model that is already retired.

    With several workers a reload request reaches only one of them; the others
    converge through :meth:`watch`, which every worker runs when polling is on
    (see ``Settings.watch_seconds``).
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None, on_swap: SwapHook | None = None,
                 on_poll: PollHook | None = None) -> None:
        self.settings = settings
        self._current = catalog
        self.on_swap = on_swap
        self.on_poll = on_poll
        self._lock = asyncio.Lock()  # one reload at a time per worker
        self._refused: list[str] | None = None  # what the watcher last failed on: not retried until it changes
        self._watcher: asyncio.Task[None] | None = None

    @property
    def current(self) -> Catalog:
        """What this worker serves now; a reload replaces it whole (read it once per request)."""
        if self._current is None:
            raise RuntimeError("the worker has not loaded its models yet")
        return self._current

    @current.setter
    def current(self, catalog: Catalog) -> None:
        self._current = catalog

    def serve(self, catalog: Catalog) -> None:
        """Start serving ``catalog`` (the worker's first load)."""
        self._current = catalog
        if self.on_swap is not None:
            self.on_swap(list(catalog.models.values()), [])
        if self.on_poll is not None:
            self.on_poll(catalog)

    def lease(self, requested: str | None) -> AbstractContextManager[ServedModel]:
        """The model a request names, held until the request ends (raises like :meth:`Catalog.select`)."""
        return self.current.select(requested).lease()

    async def reload(self) -> tuple[Catalog, list[Change]]:
        """Load what changed beside the old versions, then swap. Raises ReloadRefusedError.

        Shielded: a client that hangs up mid-reload does not leave a half-loaded catalog behind.
        """
        return await asyncio.shield(asyncio.get_running_loop().create_task(self._reload()))

    async def _reload(self) -> tuple[Catalog, list[Change]]:
        async with self._lock:
            old = self.current
            new, changes = await asyncio.to_thread(old.reloaded, self.settings)
            if new.models.keys() == old.models.keys() and new.default == old.default:
                if new.rollouts != old.rollouts or new.failed != old.failed:  # same models, other split
                    self.current = dataclasses.replace(old, rollouts=new.rollouts, failed=new.failed)
                    log.info("rollouts now: %s", {n: r.model_dump() for n, r in new.rollouts.items()} or "none")
                return self.current, changes
            self.current = new  # the swap: new requests pick from here on
            added = [m for k, m in new.models.items() if k not in old.models]
            retired = [m for k, m in old.models.items() if k not in new.models]
            for served in retired:
                served.retire()  # now, or when its last request in flight ends
            if self.on_swap is not None:
                self.on_swap(added, retired)
            if self.on_poll is not None:
                self.on_poll(new)
            log.info("reloaded: serving %s (was %s)", list(new.models), list(old.models))
            return new, changes

    async def watch(self, interval: float) -> None:
        """Every ``interval`` seconds, reload when the repository's aliases name other versions (or another
        rollout) than served. A store that cannot be reached changes nothing: the repository answers from
        its cache, and ``on_poll`` reports it."""
        while True:
            await asyncio.sleep(interval)
            try:
                wanted = await asyncio.to_thread(self.current.wanted, self.settings)
            except Exception as exc:  # noqa: BLE001 - a half-edited repository must not kill the watcher
                log.warning("watch: cannot read the repository: %s", exc)
                continue
            finally:
                if self.on_poll is not None:
                    self.on_poll(self.current)
            if wanted == self.current.wanted_now or wanted == self._refused:
                continue
            try:
                await self.reload()
                self._refused = None
            except ReloadRefusedError as exc:
                self._refused = wanted
                log.warning("watch: reload refused, still serving %s: %s", list(self.current.models), exc)

    def start_watching(self, interval: float) -> None:
        """Run :meth:`watch` on the running loop (interval <= 0: do nothing)."""
        if interval > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self.watch(interval))
            log.info("watching %s for new production versions every %.1fs", self.settings.model_repo, interval)

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
