"""Boundary checks of the ``/batch`` task, done in the request guard before a job is queued.

BentoML validates a task's inputs only when the task runs; a bad ``top_k`` or ``model`` would be a
200 with a job id and a failure later. These checks give the same 4xx answers ``/classify`` gives.
"""

from __future__ import annotations

import json
from typing import cast

import bentoml
from pydantic import TypeAdapter, ValidationError

from service.archive import ArchiveLimits
from service.catalog import UnknownModelError
from service.settings import Settings


def _form_value(text: str | None) -> object:
    """A multipart text field as BentoML reads it: JSON if it parses, else the string."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


_TOP_K, _MODEL = TypeAdapter(int), TypeAdapter(str | None)


def check_job_fields(fields: dict[str, str]) -> tuple[int, str, str] | None:
    """``top_k`` and ``model`` of a /batch/submit, checked before the job is queued (BentoML validates a
    task's inputs only when it runs): a bad one is a 4xx now, not a failed job after a 200."""
    values: dict[str, object] = {}
    for name, adapter, default in (("top_k", _TOP_K, "5"), ("model", _MODEL, None)):
        try:  # as BentoML validates them: the same 400 message as /classify gives
            values[name] = adapter.validate_python(_form_value(fields.get(name, default)))
        except ValidationError as exc:
            return 400, "invalid_request", f"{name}: {exc.errors()[0]['msg']}"
    top_k, model = cast(int, values["top_k"]), cast("str | None", values["model"])
    try:  # the same answers as _engine and _check_top_k give inside the job (the guard counts the refusal)
        engine = bentoml.get_current_service().catalog.get(model)
    except UnknownModelError as exc:
        return 404, "unknown_model", str(exc)
    except ValueError as exc:
        return 400, "invalid_model", str(exc)
    labels = len(engine.manifest.labels)
    if not 1 <= top_k <= labels:
        return 400, "invalid_top_k", f"top_k must be between 1 and {labels}, got {top_k}"
    return None


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(max_entries=settings.max_archive_entries, max_total_bytes=settings.max_archive_expanded_bytes,
                         max_entry_bytes=settings.max_upload_bytes, max_ratio=settings.max_archive_ratio)
