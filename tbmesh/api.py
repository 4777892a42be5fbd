"""HTTP API on every node (127.0.0.1 by default): the cluster status and the OpenAI-compatible
endpoints. Errors use OpenAI's error format."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from tbmesh.openai_api import ApiError, add_openai_routes

if TYPE_CHECKING:
    from tbmesh.daemon import Daemon


def make_app(daemon: Daemon) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(daemon.status())

    async def probe(request: web.Request) -> web.Response:
        await daemon.probe_all()
        return web.json_response({"links": daemon.status()["links"]})

    async def not_found(request: web.Request) -> web.Response:
        return ApiError(404, f"no such endpoint: {request.method} {request.path}").response()

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/probe", probe)
    add_openai_routes(app, daemon.pipeline)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
