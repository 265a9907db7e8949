"""The V2 branch of the error tree: a :class:`~service.http.errors.ServiceError` answered as ``{"error": message}``.

tritonclient reads exactly the ``error`` key of any non-200 answer (``tritonclient/http/_utils.py``),
and KServe's and MLServer's clients do the same, so the body carries nothing else. ``kind`` is for the
application's metrics and its own error shape; it is not sent over V2.
"""

from __future__ import annotations

import json

from service.http.errors import Headers, ServiceError


class V2Error(ServiceError):
    """A request the V2 codec refuses: what the client did wrong, as the client should read it."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: Headers = ()) -> None:
        super().__init__(status, kind, message, headers)

    def body(self) -> bytes:
        """The REST body: ``{"error": message}``."""
        return json.dumps({"error": self.message}).encode()

    @classmethod
    def of(cls, error: ServiceError) -> V2Error:
        """Any refusal as V2 renders it (its status, kind, message and headers kept)."""
        return error if isinstance(error, V2Error) else cls(error.status, error.message, error.kind, error.headers)


def invalid(message: str) -> V2Error:
    """A 400: the request is malformed or does not match what the model offers."""
    return V2Error(400, message)


def unknown_model(name: str, known: list[str]) -> V2Error:
    """A 404 that lists what is served, so the client can correct the name."""
    offered = ", ".join(sorted(known)) or "none"
    return V2Error(404, f"unknown model {name!r}; served models: {offered}", kind="unknown_model")


def unknown_version(name: str, version: str, loaded: list[int]) -> V2Error:
    """A 404 that says which versions of the model are loaded (hot reload may have moved on)."""
    offered = ", ".join(str(v) for v in sorted(loaded)) or "none"
    return V2Error(404, f"model {name!r} has no version {version!r} loaded; loaded versions: {offered}",
                   kind="unknown_version")


def parse_version(name: str, version: str | None, loaded: list[int]) -> int | None:
    """The integer version of a ``/versions/{v}`` segment (None: the production one), or a 404."""
    if version is None or version == "":
        return None
    if not (version.isascii() and version.isdigit()) or int(version) not in loaded:  # "²".isdigit() is True
        raise unknown_version(name, version, loaded)
    return int(version)


def image_error(index: int, message: str, status: int = 400, kind: str = "invalid_image") -> V2Error:
    """One undecodable image fails the whole V2 request (V2 has no per-item errors): name its index."""
    return V2Error(status, f"image {index}: {message}", kind=kind)
