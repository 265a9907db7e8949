"""The models one service process serves, loaded from the repository and looked up by request."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.engine import ModelEngine
from service.repository import ModelRef, ModelRepository
from service.settings import Settings

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """The request names a model this service does not serve (a 404)."""


@dataclass
class Catalog:
    engines: dict[str, ModelEngine]  # "name:version" -> engine
    default: str  # key of the default engine

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        """The production version of every model (or the ones settings name), verified, warmed up."""
        repo = ModelRepository(settings.model_repo)
        refs = [ModelRef.parse(text) for text in settings.models] or [ModelRef(n) for n in repo.names()]
        if not refs:
            raise RuntimeError(f"no models in {repo.root}; run `imgclf bootstrap` or export one")
        engines: dict[str, ModelEngine] = {}
        for ref in refs:
            if ref.version is None and "production" not in repo.aliases(ref.name) and not settings.models:
                log.warning("skipping %s: it has no production version", ref.name)
                continue
            engine = ModelEngine.load(
                repo.get(ref.name, ref.version), settings.device, settings.threads_per_session,
                settings.max_batch_size, settings.batch_wait_ms,
            )
            engine.warm_up()
            engines[engine.key] = engine
            log.info("serving %s on %s (loaded in %.2fs)", engine.key, engine.provider, engine.load_seconds)
        if not engines:
            raise RuntimeError(f"no model in {repo.root} has a production version; promote one")
        return cls(engines, next(iter(engines)))

    def get(self, requested: str | None) -> ModelEngine:
        """``None`` -> the default; ``name`` -> that model; ``name:version`` -> exactly that version.

        Raises ValueError for a malformed reference, UnknownModelError for one not served here.
        """
        if requested is None or requested == "":
            return self.engines[self.default]
        ref = ModelRef.parse(requested)  # ValueError: not a valid name (a 400, not a 404)
        for engine in self.engines.values():
            if engine.manifest.name == ref.name and (ref.version is None or engine.manifest.version == ref.version):
                return engine
        raise UnknownModelError(f"model {str(ref)!r} is not served here; available: {sorted(self.engines)}")
