"""A model's aliases (``aliases.json``): which version is production, which was, which is on trial.

    {"production": 3, "previous": 2, "rollout": {"version": 4, "mode": "shadow", "weight": 0.1}}

Every change is a pure function from the current document to the new one, so both repositories (a
local folder under a file lock, an object store with conditional writes or a lock object) apply the
same rule, and a writer that lost a race simply applies it again to what the winner wrote.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PRODUCTION, PREVIOUS, ROLLOUT = "production", "previous", "rollout"

AliasDocument = dict[str, Any]  # aliases.json as read: name -> version, and "rollout" -> its object


class AliasError(ValueError):
    """An alias file that cannot be read, or a change it cannot take; the message says which and why."""


class Rollout(BaseModel):
    """A candidate version on trial beside production.

    ``canary``: each replica answers ``weight`` of the requests that name no version with it.
    ``shadow``: production answers; each replica also scores ``weight`` of them with the candidate, off
    the request path, and records how the two compare.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    mode: Literal["canary", "shadow"]
    weight: float = Field(gt=0, le=1, description="share of the requests that name no version")


def parse(data: object, where: str) -> AliasDocument:
    """A document read from ``where``, checked: integer versions, and at most one valid rollout."""
    if not isinstance(data, dict):
        raise AliasError(f"{where} is not a valid alias file: expected a JSON object")
    document: AliasDocument = {}
    for key, value in data.items():
        if key == ROLLOUT:
            try:
                document[key] = Rollout.model_validate(value).model_dump()
            except ValidationError as exc:
                raise AliasError(f"{where}: invalid rollout: {exc.errors()[0]['msg']}") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            document[str(key)] = value
        else:
            raise AliasError(f"{where} is not a valid alias file: {key!r} must name a version number")
    return document


def versions(document: AliasDocument) -> dict[str, int]:
    """The plain aliases (production, previous, ...), without the rollout."""
    return {k: v for k, v in document.items() if k != ROLLOUT}


def rollout(document: AliasDocument) -> Rollout | None:
    value = document.get(ROLLOUT)
    return Rollout.model_validate(value) if value is not None else None


def promoted(document: AliasDocument, version: int) -> AliasDocument:
    """``version`` becomes production and the old production previous; a rollout of ``version`` ends."""
    new = dict(document)
    new[PRODUCTION] = version
    if document.get(PRODUCTION) not in (None, version):
        new[PREVIOUS] = document[PRODUCTION]
    if (trial := rollout(document)) is not None and trial.version == version:
        del new[ROLLOUT]
    return new


def demoted(document: AliasDocument) -> AliasDocument:
    """No production any more (undoes a model's first promotion)."""
    return {k: v for k, v in document.items() if k != PRODUCTION}


def rolled_back(document: AliasDocument, name: str) -> AliasDocument:
    """Production and previous swap places."""
    if PREVIOUS not in document:
        raise AliasError(f"model {name!r} has no previous version to roll back to")
    new = dict(document)
    new[PRODUCTION], new[PREVIOUS] = document[PREVIOUS], document[PRODUCTION]
    return new


def trial_started(document: AliasDocument, name: str, trial: Rollout) -> AliasDocument:
    """``trial`` starts (or replaces the rollout under way); production must exist and differ from it."""
    production = document.get(PRODUCTION)
    if production is None:
        raise AliasError(f"model {name!r} has no production version to roll {trial.version} out beside; "
                         "promote one first")
    if production == trial.version:
        raise AliasError(f"{name}:{trial.version} is production already")
    return document | {ROLLOUT: trial.model_dump()}


def trial_ended(document: AliasDocument) -> AliasDocument:
    return {k: v for k, v in document.items() if k != ROLLOUT}
