"""The models one service process serves, loaded from the repository and looked up by request.

Hot reload keeps a worker serving while versions change underneath it:

- A :class:`Catalog` is never changed after it is built. A reload builds a new
  one beside it (changed versions loaded, verified and warmed up; unchanged
  ones carried over) and :class:`LiveCatalog` swaps it in with one assignment.
- Each request picks its engine once and holds a lease on it, so requests in
  flight finish on the version they started with; replaced engines are retired
  and release their session when their last lease ends.
- A version that fails to resolve, load or verify refuses the whole reload:
  the old catalog keeps serving, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from service.http.served import BatchHook, ServedModel
from service.repository import PRODUCTION, ModelRef, ModelRepository
from service.runtime import OnnxModel, check_device
from service.settings import Settings

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """The request names a model this service does not serve (a 404)."""


class ReloadRefusedError(RuntimeError):
    """A reload found a version it will not serve; the message says why. The old catalog keeps serving."""


@dataclass(frozen=True)
class Target:
    """One model version the settings and the repository's aliases say to serve."""

    name: str
    version: int
    pinned: bool  # NAME:VERSION in IMGCLF_MODELS: never changes on reload

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Change:
    """A model whose served version a reload changed (``old`` is None for a model new to the service)."""

    name: str
    old: int | None
    new: int


def plan(settings: Settings, repo: ModelRepository) -> tuple[list[Target], list[str]]:
    """What to serve now: pinned versions as given, else production; and the names skipped for having none.

    Cheap (directory listings and aliases.json only, nothing verified), so workers can call it every
    few seconds to notice a promotion.
    """
    refs = [ModelRef.parse(text) for text in settings.models] or [ModelRef(n) for n in repo.names()]
    targets: list[Target] = []
    skipped: list[str] = []
    for ref in refs:
        if ref.version is None and not settings.models and PRODUCTION not in repo.aliases(ref.name):
            skipped.append(ref.name)
            continue
        targets.append(Target(ref.name, repo.resolve(ref.name, ref.version), ref.version is not None))
    return targets, skipped


def _load_engine(repo: ModelRepository, target: Target, settings: Settings, on_batch: BatchHook | None) -> ServedModel:
    """Verified (schema, sha256 of every file) and warmed up, ready to take traffic."""
    version = repo.get(target.name, target.version)
    model = OnnxModel.load(version.model_path, version.manifest, settings.device, settings.threads_per_session)
    engine = ServedModel(model, settings.max_batch_size, settings.batch_wait_ms, on_batch)
    try:
        engine.warm_up()
    except BaseException:
        engine.close()
        raise
    log.info("loaded %s on %s (in %.2fs)", engine.key, engine.provider, engine.load_seconds)
    return engine


@dataclass(frozen=True)
class Catalog:
    engines: dict[str, ServedModel]  # "name:version" -> model; never mutated after construction
    default: str  # key of the default engine: the first one, as at startup
    following: dict[str, int] = field(default_factory=dict)  # unpinned name -> version its production was
    on_batch: BatchHook | None = field(default=None, repr=False)  # given to every model loaded (metrics)
    failed: dict[str, str] = field(default_factory=dict)  # "name:version" -> why it could not be loaded

    @classmethod
    def load(cls, settings: Settings, on_batch: BatchHook | None = None) -> Catalog:
        """The production version of every model (or the ones settings name), verified, warmed up.

        A version that fails to load is left out and recorded in ``failed`` (the worker stays up,
        reports not ready with the reason, and serves the others); a repository with no model to
        serve at all is an error.
        """
        repo = ModelRepository(settings.model_repo)
        if not settings.models and not repo.names():
            raise RuntimeError(f"no models in {repo.root}; run `imgclf bootstrap` or export one")
        targets, skipped = plan(settings, repo)
        for name in skipped:
            log.warning("skipping %s: it has no production version", name)
        if not targets:
            raise RuntimeError(f"no model in {repo.root} has a production version; promote one")
        check_device(settings.device)  # a device that cannot work stops the worker: it is no one model's fault
        engines: dict[str, ServedModel] = {}
        failed: dict[str, str] = {}
        for target in targets:
            if target.key in engines or target.key in failed:
                continue
            try:
                engines[target.key] = _load_engine(repo, target, settings, on_batch)
            except Exception as exc:  # noqa: BLE001 - one bad version must not take the others down
                failed[target.key] = f"{type(exc).__name__}: {exc}"
                log.error("NOT serving %s: it failed to load: %s", target.key, exc)
        following = {t.name: t.version for t in targets if not t.pinned and t.key in engines}
        return cls(engines, next(iter(engines), ""), following, on_batch, failed)

    def get(self, requested: str | None) -> ServedModel:
        """``None`` -> the default; ``name`` -> that model; ``name:version`` -> exactly that version.

        Raises ValueError for a malformed reference, UnknownModelError for one not served here.
        """
        if not self.engines:
            raise UnknownModelError(f"no model is served: {'; '.join(f'{k}: {v}' for k, v in self.failed.items())}")
        if requested is None or requested == "":
            return self.engines[self.default]
        ref = ModelRef.parse(requested)  # ValueError: not a valid name (a 400, not a 404)
        for engine in self.engines.values():
            if engine.manifest.name == ref.name and (ref.version is None or engine.manifest.version == ref.version):
                return engine
        raise UnknownModelError(f"model {str(ref)!r} is not served here; available: {sorted(self.engines)}")

    def wanted(self, settings: Settings) -> list[str]:
        """The keys a reload would serve now (cheap; see :func:`plan`)."""
        targets, _ = plan(settings, ModelRepository(settings.model_repo))
        return list(dict.fromkeys(t.key for t in targets))

    def reloaded(self, settings: Settings) -> tuple[Catalog, list[Change]]:
        """A new catalog for the repository's current aliases, built beside this one (blocking: run it off the loop).

        Engines whose version did not change are carried over; the others are loaded with the
        repository's verification and warmed up. Any failure closes what was loaded and raises
        ReloadRefusedError: a reload is all or nothing, and never stops serving a model.
        """
        repo = ModelRepository(settings.model_repo)
        try:
            targets, _ = plan(settings, repo)
        except Exception as exc:  # a broken alias file or a vanished model refuses the reload
            raise ReloadRefusedError(f"cannot resolve the models to serve: {exc}") from exc
        gone = sorted(set(self.following) - {t.name for t in targets if not t.pinned})
        if gone:
            raise ReloadRefusedError(f"{', '.join(gone)}: no production version any more; "
                                     "a reload never stops serving a model (restart to remove one)")
        engines: dict[str, ServedModel] = {}
        fresh: list[ServedModel] = []
        for target in targets:
            if target.key in engines:
                continue
            if target.key in self.engines:
                engines[target.key] = self.engines[target.key]
                continue
            try:
                engine = _load_engine(repo, target, settings, self.on_batch)
            except Exception as exc:  # verification, ONNX Runtime or I/O: refuse, keep the old
                for loaded in fresh:
                    loaded.close()
                raise ReloadRefusedError(f"{target.key} refused: {exc}") from exc
            fresh.append(engine)
            engines[target.key] = engine
        following = {t.name: t.version for t in targets if not t.pinned}
        changes = [Change(name, self.following.get(name), version)
                   for name, version in following.items() if self.following.get(name) != version]
        return Catalog(engines, next(iter(engines)), following, self.on_batch), changes


SwapHook = Callable[[list[ServedModel], list[ServedModel]], None]  # (added, retired), e.g. for metrics


class LiveCatalog:
    """The catalog one worker serves now, and the one place it changes.

    Everything here runs on the worker's event loop, like the requests: picking an
    engine and taking its lease happen with no await between, and the swap plus
    the retirement of replaced engines is one synchronous step, so no request can
    lease an engine that is already retired.

    With several workers a reload request reaches only one of them; the others
    converge through :meth:`watch`, which every worker runs when polling is on
    (see ``Settings.watch_seconds``).
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None, on_swap: SwapHook | None = None) -> None:
        self.settings = settings
        self._current = catalog
        self.on_swap = on_swap
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
        """Start serving ``catalog`` (the worker's first load); middleware built before it see it from now on."""
        self._current = catalog
        if self.on_swap is not None:
            self.on_swap(list(catalog.engines.values()), [])

    def lease(self, requested: str | None) -> AbstractContextManager[ServedModel]:
        """The engine for a request, held until the request ends (raises like ``Catalog.get``)."""
        return self.current.get(requested).lease()

    async def reload(self) -> tuple[Catalog, list[Change]]:
        """Load what changed beside the old versions, then swap. Raises ReloadRefusedError.

        Shielded: a client that hangs up mid-reload does not leave a half-loaded catalog behind.
        """
        return await asyncio.shield(asyncio.get_running_loop().create_task(self._reload()))

    async def _reload(self) -> tuple[Catalog, list[Change]]:
        async with self._lock:
            old = self.current
            new, changes = await asyncio.to_thread(old.reloaded, self.settings)
            if new.engines.keys() == old.engines.keys() and new.default == old.default:
                return old, changes
            self.current = new  # the swap: new requests pick from here on
            added = [e for k, e in new.engines.items() if k not in old.engines]
            retired = [e for k, e in old.engines.items() if k not in new.engines]
            for engine in retired:
                engine.retire()  # now, or when its last request in flight ends
            if self.on_swap is not None:
                self.on_swap(added, retired)
            log.info("reloaded: serving %s (was %s)", list(new.engines), list(old.engines))
            return new, changes

    async def watch(self, interval: float) -> None:
        """Every ``interval`` seconds, reload when the repository's aliases name other versions than served."""
        while True:
            await asyncio.sleep(interval)
            try:
                wanted = await asyncio.to_thread(self.current.wanted, self.settings)
            except Exception as exc:  # noqa: BLE001 - a half-edited repository must not kill the watcher
                log.warning("watch: cannot read the repository: %s", exc)
                continue
            if wanted == list(self.current.engines) or wanted == self._refused:
                continue
            try:
                await self.reload()
                self._refused = None
            except ReloadRefusedError as exc:
                self._refused = wanted
                log.warning("watch: reload refused, still serving %s: %s", list(self.current.engines), exc)

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
