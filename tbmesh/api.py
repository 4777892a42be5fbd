"""HTTP API on every node (127.0.0.1 by default): the cluster status, the OpenAI-compatible
endpoints (/v1/...) and the Ollama-compatible ones (/api/...). Each API answers errors in its
own format. It is handed what it serves, not the daemon.

With an API key, every endpoint but the health checks (GET /health, and Ollama's GET /) wants
it, as `Authorization: Bearer KEY` (OpenAI's and Ollama's clients) or `x-api-key: KEY`
(Anthropic's).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tbmesh.anthropic_api import add_anthropic_routes
from tbmesh.generation import Backend
from tbmesh.ollama_api import add_ollama_routes
from tbmesh.ollama_api import error_response as ollama_error
from tbmesh.openai_api import ApiError, add_openai_routes

OPEN_PATHS = frozenset({"/health", "/"})  # health checks: no key needed, and they tell nothing else


def _in_api_shape(path: str, status: int, message: str, code: str | None) -> web.Response:
    """An error in the format of the API `path` belongs to."""
    if path == "/api" or path.startswith("/api/"):
        return ollama_error(status, message)
    if path == "/v1/messages" or path.startswith("/v1/messages/"):  # Anthropic's
        kind = "authentication_error" if status == 401 else "not_found_error"
        return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)
    return ApiError(status, message, code=code).response()


def _digest(key: str) -> bytes:
    # hashed first, so that comparing takes the same time whatever the lengths
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_middleware(api_key: str) -> Any:
    """Refuse (401) a request without the key, but on OPEN_PATHS; keys compared in constant time."""
    expected = _digest(api_key)

    @web.middleware
    async def check_key(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        given = [bearer.strip()] if scheme.lower() == "bearer" else []
        given += [request.headers["x-api-key"]] if "x-api-key" in request.headers else []
        if not given:
            message = "this API needs a key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        elif not any([hmac.compare_digest(_digest(key), expected) for key in given]):  # a list: compare them all
            message = "the API key is wrong"
        else:
            return await handler(request)
        response = _in_api_shape(request.path, 401, message, "invalid_api_key")
        response.headers["WWW-Authenticate"] = 'Bearer realm="tbmesh"'
        return response

    return check_key


def make_app(status: Callable[[], dict[str, Any]], probe: Callable[[], Awaitable[dict[str, Any]]],
             backend: Backend, api_key: str | None = None) -> web.Application:  # fmt: skip
    """`status()`: GET /status; `probe()`: POST /probe (measure the links again, say them);
    `api_key`: the key every request but a health check must carry (None: no key)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def post_probe(request: web.Request) -> web.Response:
        return web.json_response(await probe())

    async def not_found(request: web.Request) -> web.Response:
        return _in_api_shape(request.path, 404, f"no such endpoint: {request.method} {request.path}", None)

    app = web.Application(middlewares=[key_middleware(api_key)] if api_key is not None else [])
    app.router.add_get("/health", health)
    app.router.add_get("/status", get_status)
    app.router.add_post("/probe", post_probe)
    add_openai_routes(app, backend)
    add_anthropic_routes(app, backend)
    add_ollama_routes(app, backend)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
