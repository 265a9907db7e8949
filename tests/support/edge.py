"""The HTTP edge in process: ``build_app`` on a repository, requests through its whole stack (error
rendering, guard, admission, the route table) over httpx's ASGI transport, real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx

from service.http.edge import Edge, build_app
from service.settings import Settings

Step = tuple[str, dict] | Callable[[], object]


def edge_for(repo: Path, **settings: object) -> Edge:
    """One worker's edge over ``repo`` with its models loaded (``settings``: Settings fields)."""
    edge = build_app(Settings(model_repo=repo, **settings))
    edge.worker.load()
    return edge


async def unreached(scope: dict, receive: object, send: object) -> None:
    """Where BentoML's app would be: the route table must answer every request of these tests."""
    raise AssertionError(f"{scope['method']} {scope['path']} reached BentoML: the route table should answer it")


def calls(edge: Edge, *steps: Step, counted: list[str] | None = None) -> list[httpx.Response]:
    """Requests ``(path, httpx keyword arguments)`` in order (POST unless the arguments say ``method``), all
    on one event loop (a model's batching task lives on the loop of its first request); a callable step
    runs between two requests. ``counted`` receives the kind of every error the renderer counts."""
    app = edge.asgi(unreached, count=(lambda _kind: None) if counted is None else counted.append)

    async def run() -> list[httpx.Response]:
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            for step in steps:
                if callable(step):
                    step()
                else:
                    arguments = dict(step[1])
                    out.append(await client.request(arguments.pop("method", "POST"), step[0], **arguments))
        return out

    return asyncio.run(run())


def post(edge: Edge, path: str, counted: list[str] | None = None, **kwargs: object) -> httpx.Response:
    """One POST through the whole edge (see :func:`calls`)."""
    return calls(edge, (path, kwargs), counted=counted)[0]
