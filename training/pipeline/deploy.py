"""Step 9 of the pipeline (deploy): tell running services to reload, and prove they serve the new version.

For each service: ``POST /admin/reload`` (bearer token), then poll ``GET /models`` and a smoke
``POST /classify`` of a held-out image whose answer is known from the ONNX evaluation, until
``consecutive`` rounds in a row all report the expected version (with several workers any of them
may answer, and they converge by watching the aliases), or the deadline passes. The new model
answering the smoke image wrongly fails at once. No torch here: HTTP only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from training.pipeline.config import DeployConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmokeCheck:
    """A held-out image and what the new version must answer for it."""

    image: bytes
    filename: str  # sent as the upload's file name
    source: str  # where the image came from, for the record
    label: str
    index: int
    score: float

    def describe(self) -> dict[str, Any]:
        return {"file": self.source, "label": self.label, "index": self.index, "score": self.score}


class ServiceCheck(BaseModel):
    url: str
    ok: bool
    reason: str
    expected_version: int
    reload: dict[str, Any] | None = None  # the service's answer to POST /admin/reload
    seen_versions: list[int | None] = []  # version reported by each answer, in order (None: not served)
    rounds: int = 0
    seconds: float = 0.0


def reload(client: httpx.Client, url: str, token: str | None) -> tuple[bool, str, dict[str, Any] | None]:
    """POST /admin/reload; (ok, reason, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = client.post(f"{url}/admin/reload", headers=headers)
    except httpx.HTTPError as exc:
        return False, f"reload request failed: {exc!r}", None
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text[:500]}
    if response.status_code == 200:
        return True, "reloaded", body
    why = {401: "the admin token was refused", 404: "the admin endpoint is off (is IMGCLF_ADMIN_TOKEN set on the "
           "service?)", 409: "the service refused the new version and keeps serving the old one"}
    reason = f"reload answered {response.status_code}: {why.get(response.status_code, 'unexpected')}: "
    return False, reason + str(body.get("error", body)), body


def _served_version(body: dict[str, Any], name: str) -> int | None:
    for model in body.get("models", []):
        if model.get("name") == name:
            return int(model["version"])
    return None


def verify(
    client: httpx.Client, url: str, name: str, version: int, cfg: DeployConfig, smoke: SmokeCheck | None,
) -> tuple[bool, str, list[int | None], int]:
    """Poll until ``cfg.consecutive`` rounds in a row show ``version`` (and the smoke answer); (ok, reason, seen, rounds)."""
    deadline = time.monotonic() + cfg.timeout_s
    streak, rounds = 0, 0
    seen: list[int | None] = []
    last = "no answer yet"
    while True:
        rounds += 1
        try:
            models = client.get(f"{url}/models")
            listed = _served_version(models.json(), name) if models.status_code == 200 else None
            seen.append(listed)
            answered = None
            if smoke is not None:
                response = client.post(f"{url}/classify", files={"image": (smoke.filename, smoke.image)},
                                       data={"model": name, "top_k": "1"})
                if response.status_code == 200:
                    body = response.json()
                    answered = int(body["version"])
                    seen.append(answered)
                    top = body["predictions"][0]
                    if answered == version and (top["label"] != smoke.label
                                                or abs(top["score"] - smoke.score) > cfg.smoke_score_tolerance):
                        return False, (f"smoke check failed: {name}:{version} answered {top['label']!r} "
                                       f"({top['score']:.6f}) for {smoke.filename}, expected {smoke.label!r} "
                                       f"({smoke.score:.6f})"), seen, rounds
                else:
                    seen.append(None)
                    last = f"/classify answered {response.status_code}: {response.text[:200]}"
            good = listed == version and (smoke is None or answered == version)
            if not good and listed is not None:
                last = f"/models lists {name}:{listed}" + (f", /classify answered {name}:{answered}" if smoke else "")
            elif not good and listed is None:
                last = f"/models does not list {name}"
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            good, last = False, f"request failed: {exc!r}"
        streak = streak + 1 if good else 0
        if streak >= cfg.consecutive:
            return True, f"{cfg.consecutive} answers in a row from {name}:{version}" + (
                f", smoke image answered {smoke.label!r}" if smoke else ""), seen, rounds
        if time.monotonic() >= deadline:
            reason = f"after {cfg.timeout_s:g} s the service does not consistently serve {name}:{version}"
            return False, f"{reason} (last: {last})", seen, rounds
        time.sleep(cfg.poll_interval_s)


def reload_and_verify(
    urls: list[str], token: str | None, name: str, version: int, cfg: DeployConfig, smoke: SmokeCheck | None,
) -> list[ServiceCheck]:
    """Each service in turn; the list has one check per URL (the first failure does not skip the rest)."""
    results = []
    with httpx.Client(timeout=cfg.request_timeout_s) as client:
        for url in urls:
            started = time.monotonic()
            ok, reason, body = reload(client, url, token)
            seen: list[int | None] = []
            rounds = 0
            if ok:
                ok, reason, seen, rounds = verify(client, url, name, version, cfg, smoke)
            log.log(logging.INFO if ok else logging.ERROR, "%s: %s", url, reason)
            results.append(ServiceCheck(url=url, ok=ok, reason=reason, expected_version=version, reload=body,
                                        seen_versions=seen[-50:], rounds=rounds,
                                        seconds=time.monotonic() - started))
    return results
