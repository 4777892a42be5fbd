"""HTTP API on every node (127.0.0.1 by default): the cluster status and the OpenAI-compatible
endpoints. Errors use OpenAI's error format. It is handed what it serves, not the daemon."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tbmesh.anthropic_api import add_anthropic_routes
from tbmesh.generation import Backend
from tbmesh.openai_api import ApiError, add_openai_routes


def make_app(status: Callable[[], dict[str, Any]], probe: Callable[[], Awaitable[dict[str, Any]]],
             backend: Backend) -> web.Application:
    """`status()`: GET /status; `probe()`: POST /probe (measure the links again, say them)."""

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def post_probe(request: web.Request) -> web.Response:
        return web.json_response(await probe())

    async def not_found(request: web.Request) -> web.Response:
        return ApiError(404, f"no such endpoint: {request.method} {request.path}").response()

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_post("/probe", post_probe)
    add_openai_routes(app, backend)
    add_anthropic_routes(app, backend)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
