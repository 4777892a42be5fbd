"""HTTP API on every node (127.0.0.1 by default): the cluster status, the OpenAI-compatible
endpoints (/v1/...), Anthropic's Messages API (/v1/messages), the Ollama-compatible ones
(/api/...) and their OpenAPI document. Errors, aiohttp's own included (no such path, a method
the path does not take, a handler that failed), are in the format of the API a path belongs
to: Ollama's under /api, Anthropic's under /v1/messages, OpenAI's elsewhere. It is handed
what it serves, not the daemon.

With an API key, every endpoint but the health checks (GET /health, and Ollama's GET /) wants
it, /openapi.json included (it names the model), as `Authorization: Bearer KEY` (OpenAI's and
Ollama's clients) or `x-api-key: KEY` (Anthropic's); the OpenAPI document then says so.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tbmesh import anthropic_api, ollama_api, openapi
from tbmesh.anthropic_api import add_anthropic_routes
from tbmesh.generation import Backend
from tbmesh.ollama_api import add_ollama_routes
from tbmesh.openai_api import ApiError, Limits, add_openai_routes, openapi_description
from tbmesh.openapi import ApiDescription, json_body, nullable, obj, ref

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/"})  # health checks (GET): no key needed, and they tell nothing else


def _in_api_shape(path: str, error: ApiError) -> web.Response:
    """`error` in the format of the API `path` belongs to (routed or not)."""
    if ollama_api.owns(path):
        return ollama_api.error_response(error.status, error.message, error.headers)
    if anthropic_api.owns(path):
        return anthropic_api.error_response(error)
    return error.response()



def _digest(key: str) -> bytes:
    # hashed first, so that comparing takes the same time whatever the lengths
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_middleware(api_key: str) -> Any:
    """Refuse (401) a request without the key, but on OPEN_PATHS; keys compared in constant time."""
    expected = _digest(api_key)

    @web.middleware
    async def check_key(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path in OPEN_PATHS and request.method in ("GET", "HEAD"):
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
        return _in_api_shape(request.path, ApiError(401, message, code="invalid_api_key",
                                                    headers={"WWW-Authenticate": 'Bearer realm="tbmesh"'}))

    return check_key


def make_app(status: Callable[[], dict[str, Any]], probe: Callable[[], Awaitable[dict[str, Any]]],
             backend: Backend, limits: Limits = Limits(), api_key: str | None = None) -> web.Application:  # fmt: skip
    """`status()`: GET /status; `probe()`: POST /probe (measure the links again, say them);
    `api_key`: the key every request but a health check must carry (None: no key)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def post_probe(request: web.Request) -> web.Response:
        return web.json_response(await probe())

    async def get_openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document(backend, limits, keyed=api_key is not None))

    # the key is checked inside errors_in_api_format: a 404 or 405 is told only to who has the key
    middlewares = [errors_in_api_format] + ([key_middleware(api_key)] if api_key is not None else [])
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/health", health)
    app.router.add_get("/status", get_status)
    app.router.add_post("/probe", post_probe)
    app.router.add_get("/openapi.json", get_openapi)
    add_openai_routes(app, backend, limits)
    add_anthropic_routes(app, backend, limits)
    add_ollama_routes(app, backend, limits)
    return app


def openapi_document(backend: Backend, limits: Limits = Limits(), keyed: bool = False) -> dict[str, Any]:
    """The OpenAPI document of make_app's API on this node (its models are named in it);
    `keyed`: the node wants an API key (the document's security then says how to send it)."""
    document = openapi.document([_description(), openapi_description(backend, limits),
                                 anthropic_api.openapi_description(backend, limits),
                                 ollama_api.openapi_description(backend, limits)])  # fmt: skip
    if keyed:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the node's API key (--api-key)"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                       "description": "the node's API key, as Anthropic's clients send it"},
        }  # fmt: skip
        document["security"] = [{"bearer": []}, {"apiKey": []}]
        for path in OPEN_PATHS:
            for operation in document["paths"][path].values():
                operation["security"] = []  # the health checks are open
        for path, item in document["paths"].items():
            for operation in item.values():
                if operation.get("security") != []:
                    errors = [r for code, r in operation["responses"].items() if code[0] in "45"]
                    schema = errors[0]["content"]["application/json"]["schema"] if errors else \
                        ref(ollama_api.ERROR if ollama_api.owns(path) else
                            anthropic_api.ERROR if anthropic_api.owns(path) else "Error")  # fmt: skip
                    operation["responses"]["401"] = json_body(schema, "no API key, or a wrong one")
    return document


@web.middleware
async def errors_in_api_format(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                               ) -> web.StreamResponse:  # fmt: skip
    """aiohttp's own answers (no such path, a method the path does not take) and any failure a
    handler did not expect, in the error format of the API the path belongs to (Ollama's under
    /api, Anthropic's under /v1/messages, OpenAI's elsewhere) rather than aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        return _in_api_shape(request.path, ApiError(405, f"{request.path} does not take {request.method}, only {allowed}",
                                        headers={"Allow": allowed}))
    except web.HTTPNotFound:
        return _in_api_shape(request.path, ApiError(404, f"no such endpoint: {request.method} {request.path}"))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _in_api_shape(request.path, ApiError(error.status, error.text or error.reason))
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return _in_api_shape(request.path, ApiError(500, f"{type(error).__name__}: {error}", "server_error"))


# --- the OpenAPI description of the status endpoints ------------------------------------------


def _description() -> ApiDescription:
    """GET /health, GET /status, POST /probe and GET /openapi.json, as tbmesh.daemon's status() makes them."""
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    strings = {"type": "array", "items": string}
    link = obj({"a": string, "b": string, "bandwidth_bps": number, "rtt_s": number},
               required=["a", "b", "bandwidth_bps", "rtt_s"])
    shard = obj({"start": integer, "end": integer, "epoch": integer, "bytes": nullable(integer),
                 "progress": number, "loaded": {"type": "boolean"}, "serving": integer},
                required=["start", "end", "epoch", "bytes", "progress", "loaded", "serving"])  # fmt: skip
    node = obj({"id": string, "name": string, "chip": string, "state": {"enum": ["alive", "suspect", "dead"]},
                "memory_total": integer, "memory_usable": integer, "flops": number,
                "role": {"enum": ["leader", "follower"]}, "shard": nullable(shard)},
               required=["id", "name", "chip", "state", "memory_total", "memory_usable", "flops", "role",
                         "shard"])  # fmt: skip
    stage = obj({"node": string, "start": integer, "end": integer, "bytes": integer},
                required=["node", "start", "end", "bytes"])
    plan_fields = {"term": integer, "epoch": integer, "model": string,
                   "stages": {"type": "array", "items": stage}, "left_out": strings}  # fmt: skip
    plan = obj(plan_fields, required=list(plan_fields))
    preparing = obj({**plan_fields, "progress": {"type": "object", "additionalProperties": number,
                                                 "description": "each stage's node: how much it has loaded"}},
                    required=[*plan_fields, "progress"])  # fmt: skip
    event = obj({"at": number, "kind": string, "node": nullable(string), "detail": string},
                required=["at", "kind", "node", "detail"])
    status = obj({
        "node": obj({"id": string, "name": string, "incarnation": integer, "port": integer,
                     "interfaces": strings, "addresses": strings},
                    required=["id", "name", "incarnation", "port", "interfaces", "addresses"]),
        "cluster": string,
        "now": {**number, "description": "the clock of events[].at"},
        "leader": nullable(string),
        "term": integer,
        "model": nullable(string),
        "nodes": {"type": "array", "items": node},
        "links": {"type": "array", "items": ref("Link")},
        "plan": nullable(ref("Plan")),
        "preparing": nullable(preparing),
        "no_fit": nullable({**string, "description": "why the model fits no plan"}),
        "runtime": nullable({"type": "object", "description": "this node's serving engine: its figures"}),
        "events": {"type": "array", "items": event},
    }, required=["node", "cluster", "now", "leader", "term", "model", "nodes", "links", "plan", "preparing",
                 "no_fit", "runtime", "events"])  # fmt: skip
    links = obj({"links": {"type": "array", "items": ref("Link")}}, required=["links"])
    return ApiDescription(
        paths={
            "/health": {"get": {"summary": "Whether the node's API is up (no API key needed)",
                                "responses": {"200": json_body(obj({"status": {"const": "ok"}}, required=["status"],
                                                                   additionalProperties=False), "it is")}}},
            "/status": {"get": {"summary": "The cluster as this node sees it",
                                "responses": {"200": json_body(ref("Status"), "the status")}}},
            "/probe": {"post": {"summary": "Measure every link of this node again",
                                "responses": {"200": json_body(links, "the links, measured again")}}},
            "/openapi.json": {"get": {"summary": "This document (it wants the API key, if the node has one)", "responses": {"200": json_body(
                {"type": "object", "required": ["openapi", "info", "paths"]}, "the OpenAPI document")}}},
        },  # fmt: skip
        schemas={"Status": status, "Plan": plan, "Link": link},
    )

