"""HTTP API on every node (127.0.0.1 by default): the cluster status, the OpenAI-compatible
endpoints, Anthropic's Messages API and their OpenAPI document. Errors use the format of the
API a path belongs to (Anthropic's under /v1/messages, OpenAI's elsewhere). It is handed what
it serves, not the daemon."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tbmesh import anthropic_api, openapi
from tbmesh.anthropic_api import add_anthropic_routes
from tbmesh.generation import Backend
from tbmesh.openai_api import ApiError, Limits, add_openai_routes, openapi_description
from tbmesh.openapi import ApiDescription, json_body, nullable, obj, ref

log = logging.getLogger(__name__)


def make_app(status: Callable[[], dict[str, Any]], probe: Callable[[], Awaitable[dict[str, Any]]],
             backend: Backend, limits: Limits = Limits()) -> web.Application:
    """`status()`: GET /status; `probe()`: POST /probe (measure the links again, say them)."""

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def post_probe(request: web.Request) -> web.Response:
        return web.json_response(await probe())

    async def get_openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document(backend, limits))

    app = web.Application(middlewares=[errors_in_api_format])
    app.router.add_get("/status", get_status)
    app.router.add_post("/probe", post_probe)
    app.router.add_get("/openapi.json", get_openapi)
    add_openai_routes(app, backend, limits)
    add_anthropic_routes(app, backend, limits)
    return app


def openapi_document(backend: Backend, limits: Limits = Limits()) -> dict[str, Any]:
    """The OpenAPI document of make_app's API on this node (its models are named in it)."""
    return openapi.document([_description(), openapi_description(backend, limits),
                             anthropic_api.openapi_description(backend, limits)])


def _error(request: web.Request, error: ApiError) -> web.Response:
    """`error` in the format of the API that `request`'s path belongs to."""
    if anthropic_api.owns(request.path):
        return anthropic_api.error_response(error)
    return error.response()


@web.middleware
async def errors_in_api_format(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                               ) -> web.StreamResponse:  # fmt: skip
    """aiohttp's own answers (no such path, a method the path does not take) and any failure a
    handler did not expect, in the error format of the API the path belongs to (Anthropic's
    under /v1/messages, OpenAI's elsewhere) rather than aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        return _error(request, ApiError(405, f"{request.path} does not take {request.method}, only {allowed}",
                                        headers={"Allow": allowed}))
    except web.HTTPNotFound:
        return _error(request, ApiError(404, f"no such endpoint: {request.method} {request.path}"))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(request, ApiError(error.status, error.text or error.reason))
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return _error(request, ApiError(500, f"{type(error).__name__}: {error}", "server_error"))


# --- the OpenAPI description of the status endpoints ------------------------------------------


def _description() -> ApiDescription:
    """GET /status, POST /probe and GET /openapi.json, as tbmesh.daemon's status() makes them."""
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
            "/status": {"get": {"summary": "The cluster as this node sees it",
                                "responses": {"200": json_body(ref("Status"), "the status")}}},
            "/probe": {"post": {"summary": "Measure every link of this node again",
                                "responses": {"200": json_body(links, "the links, measured again")}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": json_body(
                {"type": "object", "required": ["openapi", "info", "paths"]}, "the OpenAPI document")}}},
        },  # fmt: skip
        schemas={"Status": status, "Plan": plan, "Link": link},
    )

