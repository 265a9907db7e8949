"""Triton's model repository extension, mapped onto imgclf's repository and hot reload.

- ``POST /v2/repository/index``: every model of the repository and its views, each version with
  ``state`` READY (served by this worker) or UNAVAILABLE and the ``reason``. Body ``{"ready": true}``
  lists only the ready ones. Public, as ``GET /models`` is.
- ``POST /v2/repository/models/{m}/load``: what "load" means in imgclf: reload this worker from the
  repository's aliases (the same reload as ``POST /admin/reload``), so a model promoted since the start
  is served. ``parameters.version`` first promotes that version (verified, as ``imgclf promote`` does).
- ``POST /v2/repository/models/{m}/unload``: refused (409): a reload never stops serving a model;
  restart with ``IMGCLF_MODELS`` naming the models to serve (docs/serving.md#hot-reload).

Load and unload are admin actions, behind ``IMGCLF_ADMIN_TOKEN`` as ``/admin`` is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from service.http.catalog import Catalog, ReloadRefusedError
from service.http.live import LiveCatalog
from service.http.v2.errors import V2Error, unknown_model
from service.http.v2.facts import VIEWS
from service.repository import Repository, RepositoryError, StoreUnavailableError

log = logging.getLogger(__name__)
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


def repository_index(catalog: Catalog, repo: Repository, ready_only: bool = False) -> list[dict[str, Any]]:
    """Triton's index entries: ``name``, ``version``, ``state``, ``reason`` (the views follow their model)."""
    entries = []
    for name in repo.names():
        served = set(catalog.versions(name))
        for version in repo.versions(name):
            if version in served:
                entries += [{"name": model, "version": str(version), "state": READY, "reason": ""}
                            for model in (name, *(f"{name}.{view}" for view in VIEWS))]
            elif not ready_only:
                entries.append({"name": name, "version": str(version), "state": UNAVAILABLE,
                                "reason": "not served by this worker: not its production version, "
                                          "nor named in IMGCLF_MODELS"})
    return entries


def _version(parameters: Mapping[str, Any]) -> int | None:
    value = parameters.get("version")
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).isascii() or not str(value).isdigit() or int(value) < 1:
        raise V2Error(400, f"parameters.version must be a positive integer, got {value!r}")
    return int(value)


async def load(live: LiveCatalog, repo: Repository, name: str, parameters: Mapping[str, Any]) -> None:
    """Promote ``parameters.version`` if given, then reload this worker; V2Error when the model cannot be
    served afterwards (unknown, no production version, or the reload refused a version)."""
    if name not in repo.names():
        raise unknown_model(name, repo.names())
    version = _version(parameters)
    if version is not None:
        try:
            await asyncio.to_thread(repo.promote, name, version)
        except StoreUnavailableError as exc:
            raise V2Error(503, f"cannot promote {name}:{version} now: {exc}") from exc
        except (LookupError, ValueError, OSError, RepositoryError) as exc:
            raise V2Error(400, f"cannot promote {name}:{version}: {exc}") from exc
        log.info("V2 load: promoted %s:%d", name, version)
    try:
        catalog, _ = await live.reload()
    except ReloadRefusedError as exc:
        raise V2Error(409, f"reload refused, still serving what was served: {exc}", kind="reload_refused") from exc
    if not catalog.versions(name):
        raise V2Error(400, f"model {name!r} has no production version to serve; promote one "
                           f"(`imgclf models promote {name} VERSION`, or parameters.version) and load again")


def unload(name: str) -> None:
    raise V2Error(409, f"imgclf does not unload {name!r} while running: a reload never stops serving a model; "
                       "to stop serving it, restart the server with IMGCLF_MODELS naming the models to serve",
                  kind="unload_refused")
