"""HTTP API on every node (127.0.0.1 by default): the cluster status, and later the
OpenAI-compatible endpoints. Errors use OpenAI's error format."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tbmesh.daemon import Daemon


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                             status=status)


def make_app(daemon: Daemon) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(daemon.status())

    async def probe(request: web.Request) -> web.Response:
        await daemon.probe_all()
        return web.json_response({"links": daemon.status()["links"]})

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"no such endpoint: {request.method} {request.path}")

    from tbmesh.openai_api import add_openai_routes

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/probe", probe)
    add_openai_routes(app, daemon.pipeline)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
