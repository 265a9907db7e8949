"""The models one service process serves, loaded from the repository and looked up by request.

Hot reload keeps a worker serving while versions change underneath it:

- A :class:`Catalog` is never changed after it is built. A reload builds a new
  one beside it (changed versions loaded, verified and warmed up; unchanged
  ones carried over) and :class:`~service.http.live.LiveCatalog` swaps it in
  with one assignment.
- Each request picks its model once (:meth:`Catalog.pick`, the one rule every
  protocol uses) and holds a lease on it, so requests in flight finish on the
  version they started with; replaced models are retired and release their
  session when their last lease ends.
- A version that fails to resolve, load or verify refuses the whole reload:
  the old catalog keeps serving, untouched.
- A model's rollout (``service.aliases.Rollout``) loads its candidate beside production: a canary
  answers its share of the requests that name no version (:meth:`Catalog.pick`); a shadow candidate
  answers none, ``service.http.rollout`` scores a sample with it after production answered.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from service import aliases
from service.http.errors import ServiceError
from service.http.served import BatchHook, ServedModel
from service.precision import served_file
from service.repository import PRODUCTION, ModelRef, Repository, Rollout
from service.runtime import OnnxModel, check_device
from service.settings import Settings

log = logging.getLogger(__name__)


class UnknownModelError(ServiceError):
    """404: the request names a model (or version) this service does not serve; says what is served."""

    def __init__(self, requested: str, catalog: Catalog) -> None:
        super().__init__(404, "unknown_model",
                         f"model {requested!r} is not served here; available: {sorted(catalog.models)}")
        self.requested = requested


class ModelRequiredError(ServiceError):
    """400: several models are served, none is the default, and the request named none."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(400, "model_required",
                         f"this server serves several models and none is the default: name one with `model` "
                         f"(one of {names}), or set IMGCLF_DEFAULT_MODEL")


class ReloadRefusedError(RuntimeError):
    """A reload found a version it will not serve; the message says why. The old catalog keeps serving."""


@dataclass(frozen=True)
class Target:
    """One model version the settings and the repository's aliases say to serve."""

    name: str
    version: int
    pinned: bool  # NAME:VERSION in IMGCLF_MODELS: never changes on reload
    candidate: bool = False  # a rollout's candidate, served beside production

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Change:
    """A model whose served version a reload changed (``old`` is None for a model new to the service)."""

    name: str
    old: int | None
    new: int


@dataclass(frozen=True)
class Plan:
    """What to serve now: pinned versions as given, else production, plus rollout candidates."""

    targets: list[Target]
    skipped: list[str]  # models without a production version (not served)
    rollouts: dict[str, Rollout]  # name -> its rollout, for unpinned models

    @property
    def wanted(self) -> list[str]:
        """What the watcher compares with :attr:`Catalog.wanted_now`: the keys, and each rollout's split."""
        return sorted({t.key for t in self.targets}) + trials(self.rollouts)


def trials(rollouts: dict[str, Rollout]) -> list[str]:
    """Each rollout in one comparable string: a change of mode or weight is a change to reload for."""
    return sorted(f"{name}~{r.mode}:{r.version}@{r.weight:g}" for name, r in rollouts.items())


def plan(settings: Settings, repo: Repository) -> Plan:
    """Cheap (listings and aliases.json only, nothing verified), so workers can call it every few seconds
    to notice a promotion or a rollout."""
    refs = [ModelRef.parse(text) for text in settings.models] or [ModelRef(n) for n in repo.names()]
    result = Plan([], [], {})
    for ref in refs:
        if ref.version is not None:
            result.targets.append(Target(ref.name, repo.resolve(ref.name, ref.version), True))
            continue
        document = repo.alias_document(ref.name)
        if PRODUCTION not in document and not settings.models:
            result.skipped.append(ref.name)
            continue
        result.targets.append(Target(ref.name, repo.resolve(ref.name, document.get(PRODUCTION)), False))
        trial = aliases.rollout(document)
        if trial is not None:
            result.targets.append(Target(ref.name, repo.resolve(ref.name, trial.version), False, candidate=True))
            result.rollouts[ref.name] = trial
    return result


def _load(repo: Repository, target: Target, settings: Settings, on_batch: BatchHook | None) -> ServedModel:
    """Verified (schema, sha256 of every file) and warmed up, ready to take traffic."""
    version = repo.get(target.name, target.version)
    model_file, manifest = served_file(version, settings.device, settings.precision)
    model = OnnxModel.load(model_file, manifest, settings.device, settings.threads_per_session)
    served = ServedModel(model, settings.max_batch_size, settings.batch_wait_ms, on_batch)
    try:
        served.warm_up()
    except BaseException:
        served.close()
        raise
    log.info("loaded %s on %s (in %.2fs)", served.key, served.provider, served.load_seconds)
    return served


def default_name(settings: Settings, names: list[str]) -> str | None:
    """The model a request without ``model`` gets: IMGCLF_DEFAULT_MODEL, else the only one served.

    Never "the first one": with several models served and no setting there is no default (a 400 that
    lists them), so promoting a second model cannot silently change what unnamed requests get.
    """
    if settings.default_model is not None:
        if settings.default_model not in names:
            raise RuntimeError(f"IMGCLF_DEFAULT_MODEL={settings.default_model} is not served here; served: {names}")
        return settings.default_model
    return names[0] if len(names) == 1 else None


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ServedModel]  # "name:version" -> model; never mutated after construction
    default: str | None  # the model name a request without ``model`` gets (see default_name)
    production: dict[str, int] = field(default_factory=dict)  # unpinned name -> its production version
    on_batch: BatchHook | None = field(default=None, repr=False)  # given to every model loaded (metrics)
    failed: dict[str, str] = field(default_factory=dict)  # "name:version" -> why it could not be loaded
    rollouts: dict[str, Rollout] = field(default_factory=dict)  # name -> its candidate on trial
    repo: Repository | None = field(default=None, repr=False)  # the worker's, carried from catalog to catalog

    @property
    def names(self) -> list[str]:
        return sorted({m.manifest.name for m in self.models.values()})

    @property
    def wanted_now(self) -> list[str]:
        """What this catalog serves (and failed to), as :attr:`Plan.wanted` says it: equal, nothing to reload."""
        return sorted({*self.models, *self.failed}) + trials(self.rollouts)

    @property
    def not_ready(self) -> str | None:
        """Why this worker is not ready (None: ready), as /readyz and V2's health answer it."""
        if not self.failed:
            return None
        return "not ready: could not load " + "; ".join(f"{key}: {why}" for key, why in self.failed.items())

    def versions(self, name: str) -> list[int]:
        """The versions of ``name`` served here (several when IMGCLF_MODELS pins them)."""
        return sorted(m.manifest.version for m in self.models.values() if m.manifest.name == name)

    def role(self, served: ServedModel) -> str:
        """``canary`` or ``shadow`` for a rollout's candidate, else ``production`` (metrics of rollouts)."""
        trial = self.rollouts.get(served.manifest.name)
        return trial.mode if trial is not None and trial.version == served.manifest.version else "production"

    def candidate(self, name: str) -> tuple[Rollout, ServedModel] | None:
        """A model's rollout and its loaded candidate, if it has one."""
        trial = self.rollouts.get(name)
        served = self.models.get(f"{name}:{trial.version}") if trial is not None else None
        return (trial, served) if trial is not None and served is not None else None

    @classmethod
    def load(cls, settings: Settings, on_batch: BatchHook | None = None, repo: Repository | None = None) -> Catalog:
        """The production version of every model (or the ones settings name), verified, warmed up.

        A version that fails to load is left out and recorded in ``failed`` (the worker stays up,
        reports not ready with the reason, and serves the others); a repository with no model to
        serve at all is an error.
        """
        repo = repo or settings.repository()
        if not settings.models and not repo.names():
            raise RuntimeError(f"no models in {repo.location}; run `imgclf bootstrap` or export one")
        planned = plan(settings, repo)
        for name in planned.skipped:
            log.warning("skipping %s: it has no production version", name)
        if not planned.targets:
            raise RuntimeError(f"no model in {repo.location} has a production version; promote one")
        check_device(settings.device)  # a device that cannot work stops the worker: it is no one model's fault
        models: dict[str, ServedModel] = {}
        failed: dict[str, str] = {}
        for target in planned.targets:
            if target.key in models or target.key in failed:
                continue
            try:
                models[target.key] = _load(repo, target, settings, on_batch)
            except Exception as exc:  # noqa: BLE001 - one bad version must not take the others down
                if target.candidate:  # a rollout's candidate: production serves alone, the worker is ready
                    log.error("NOT rolling out %s: it failed to load: %s", target.key, exc)
                    continue
                failed[target.key] = f"{type(exc).__name__}: {exc}"
                log.error("NOT serving %s: it failed to load: %s", target.key, exc)
        targets = [t for t in planned.targets if not t.candidate]
        production = {t.name: t.version for t in targets if not t.pinned and t.key in models}
        rollouts = {n: r for n, r in planned.rollouts.items() if f"{n}:{r.version}" in models}
        names = sorted({m.manifest.name for m in models.values()})
        return cls(models, default_name(settings, names) if names else None, production, on_batch, failed,
                   rollouts, repo)

    def pick(self, name: str | None, version: int | None = None, *, split: bool = False) -> ServedModel:
        """The one rule every protocol uses. ``name`` None: the default model. ``version`` None: the
        model's production version (or the one version served, when IMGCLF_MODELS pins it), or, with
        ``split`` (an inference, not a question about the model), for a canary's share of such
        requests, the canary.

        Raises UnknownModelError (404) or ModelRequiredError (400).
        """
        if not self.models:
            raise ServiceError(404, "unknown_model",
                               f"no model is served: {'; '.join(f'{k}: {v}' for k, v in self.failed.items())}")
        if not name:
            if self.default is None:
                raise ModelRequiredError(self.names)
            name = self.default
        if split and version is None and (trial := self.candidate(name)) is not None:
            rollout, candidate = trial
            if rollout.mode == "canary" and random.random() < rollout.weight:
                return candidate
        wanted = version if version is not None else self.production.get(name) or next(iter(self.versions(name)), 0)
        served = self.models.get(f"{name}:{wanted}")
        if served is None:
            raise UnknownModelError(name if version is None else f"{name}:{version}", self)
        return served

    def select(self, requested: str | None, top_k: int | None = None) -> ServedModel:
        """The model a multipart request's ``model`` field names (``NAME`` or ``NAME:VERSION``) to answer
        it (a canary takes its share), with
        ``top_k`` checked against its labels: ServiceError 404 unknown_model, 400 invalid_model,
        400 model_required or 400 invalid_top_k."""
        try:
            ref = ModelRef.parse(requested) if requested else None
        except ValueError as exc:  # not a valid name: a 400, not a 404
            raise ServiceError(400, "invalid_model", str(exc)) from exc
        served = self.pick(ref.name, ref.version, split=True) if ref is not None else self.pick(None, split=True)
        labels = len(served.manifest.labels)
        if top_k is not None and not 1 <= top_k <= labels:
            raise ServiceError(400, "invalid_top_k", f"top_k must be between 1 and {labels}, got {top_k}")
        return served

    def wanted(self, settings: Settings) -> list[str]:
        """What a reload would serve now (cheap; see :func:`plan`); compare with :attr:`wanted_now`."""
        return plan(settings, self._repo(settings)).wanted

    def _repo(self, settings: Settings) -> Repository:
        return self.repo if self.repo is not None else settings.repository()

    def reloaded(self, settings: Settings) -> tuple[Catalog, list[Change]]:
        """A new catalog for the repository's current aliases, built beside this one (blocking: run it off the loop).

        Models whose version did not change are carried over; the others are loaded with the
        repository's verification and warmed up. Any failure closes what was loaded and raises
        ReloadRefusedError: a reload is all or nothing, and never stops serving a model.
        """
        repo = self._repo(settings)
        try:
            planned = plan(settings, repo)
        except Exception as exc:  # a broken alias file or a vanished model refuses the reload
            raise ReloadRefusedError(f"cannot resolve the models to serve: {exc}") from exc
        targets = [t for t in planned.targets if not t.candidate]
        gone = sorted(set(self.production) - {t.name for t in targets if not t.pinned})
        if gone:
            raise ReloadRefusedError(f"{', '.join(gone)}: no production version any more; "
                                     "a reload never stops serving a model (restart to remove one)")
        models: dict[str, ServedModel] = {}
        fresh: list[ServedModel] = []
        for target in planned.targets:
            if target.key in models:
                continue
            if target.key in self.models:
                models[target.key] = self.models[target.key]
                continue
            try:
                served = _load(repo, target, settings, self.on_batch)
            except Exception as exc:  # verification, ONNX Runtime or I/O: refuse, keep the old
                for loaded in fresh:
                    loaded.close()
                raise ReloadRefusedError(f"{target.key} refused: {exc}") from exc
            fresh.append(served)
            models[target.key] = served
        production = {t.name: t.version for t in targets if not t.pinned}
        changes = [Change(name, self.production.get(name), version)
                   for name, version in production.items() if self.production.get(name) != version]
        names = sorted({m.manifest.name for m in models.values()})
        return Catalog(models, default_name(settings, names), production, self.on_batch, rollouts=planned.rollouts,
                       repo=repo), changes
