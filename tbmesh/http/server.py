"""HTTP API on every node (127.0.0.1 by default): the cluster status, the OpenAI-compatible
endpoints (/v1/...), Anthropic's Messages API (/v1/messages), the Ollama-compatible ones
(/api/...) and their OpenAPI document. Errors, aiohttp's own included (no such path, a method
the path does not take, a handler that failed), are in the format of the API a path belongs
to: Ollama's under /api, Anthropic's under /v1/messages, OpenAI's elsewhere. It is handed
what it serves, not the daemon.

With an API key, every endpoint but the health checks (GET /health, and Ollama's GET /) wants
it, /openapi.json included (it names the model), as `Authorization: Bearer KEY` (OpenAI's and
Ollama's clients) or `x-api-key: KEY` (Anthropic's); the OpenAPI document then says so.

No web page can use it. A page's scripts may send requests to any address, but read the
answers only of their own origin, and send a JSON body only after a CORS preflight, which this
server never grants. So every request's Host must be a name of this machine (allowed_hosts: DNS
rebinding gives an attacker's name this machine's address, and the page that origin), and a
JSON body must say it is JSON (tbmesh.http.common.check_json_type). `Listener` serves the app
with timeouts for half-sent requests and a cap on open connections (tbmesh.http.common.Limits).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError

from tbmesh.core.generation import Backend
from tbmesh.core.jsonform import to_json
from tbmesh.core.status import LinkStatus, Status
from tbmesh.http import anthropic as anthropic_api
from tbmesh.http import ollama as ollama_api
from tbmesh.http import openai as openai_api
from tbmesh.http import openapi
from tbmesh.http import responses as responses_api
from tbmesh.http.anthropic import add_anthropic_routes
from tbmesh.http.common import ApiError, Limits, ModelNames
from tbmesh.http.ollama import add_ollama_routes
from tbmesh.http.openai import add_openai_routes
from tbmesh.http.openapi import ApiDescription, json_body, obj, ref
from tbmesh.http.responses import add_responses_routes

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/"})  # health checks (GET): no key needed, and they tell nothing else


def _in_api_shape(path: str, error: ApiError) -> web.Response:
    """`error` in the format of the API `path` belongs to (routed or not)."""
    if ollama_api.owns(path):
        return ollama_api.error_response(error)
    if anthropic_api.owns(path):
        return anthropic_api.error_response(error)
    return openai_api.error_response(error)



# --- the Host header --------------------------------------------------------------------------

LOOPBACK_NAMES = frozenset({"localhost"})  # and its subdomains, and any address: see host_allowed


def _host_name(host: str) -> str:
    """A host (of a Host header, or a name given), without its port, in lower case, without a final dot."""
    host = host.strip()
    if host.startswith("["):  # an IPv6 address: [::1]:7471
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.lower().rstrip(".")


def allowed_hosts(api_host: str, names: Iterable[str] = (), beyond_loopback: bool = False) -> frozenset[str]:
    """The names the API answers to, besides addresses and *.localhost (host_allowed):
    localhost, the --api-host it listens on, `names` (--api-allow-host), and when it listens
    `beyond_loopback`, this machine's own host names (studio, studio.local), which clients on
    other machines use. Ollama's fix of the same hole (CVE-2024-28224) allows these too."""
    allowed = set(LOOPBACK_NAMES) | {_host_name(api_host)} | {_host_name(name) for name in names}
    if beyond_loopback:
        machine = _host_name(socket.gethostname())
        label = machine.split(".")[0]
        allowed |= {machine, label, f"{label}.local"}
    return frozenset(allowed - {""})


def host_allowed(header: str, names: Collection[str]) -> bool:
    """Whether a request with this Host header may be served: one of `names`, a subdomain of
    localhost (RFC 6761: browsers resolve them to loopback themselves, never through DNS), any
    IP address (no name was looked up: nothing to rebind), or none at all (no browser sends
    none; HTTP/1.0 clients may)."""
    if not header:
        return True
    host = _host_name(header)
    if host in names or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_middleware(names: Collection[str]) -> Any:
    """Refuse (403) a request whose Host is not allowed (host_allowed): a web page's DNS
    rebinding. The health checks too: one rule for every path."""

    @web.middleware
    async def check_host(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        header = request.headers.get(hdrs.HOST, "")
        if host_allowed(header, names):
            return await handler(request)
        host = _host_name(header)
        return _in_api_shape(request.path, ApiError(
            403, f"this API does not answer to the host {host!r} (a web page's DNS rebinding looks like this); "
                 f"if it is a name of this machine, start the daemon with --api-allow-host {host}",
            code="host_not_allowed"))  # fmt: skip

    return check_host


# --- the API key ------------------------------------------------------------------------------


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


def make_app(status: Callable[[], Status], probe: Callable[[], Awaitable[Iterable[LinkStatus]]],
             backend: Backend, limits: Limits = Limits(), api_key: str | None = None,
             hosts: Collection[str] = LOOPBACK_NAMES, names: ModelNames = ModelNames()) -> web.Application:  # fmt: skip
    """`status()`: GET /status; `probe()`: POST /probe (measure the links again, give them);
    `api_key`: the key every request but a health check must carry (None: no key); `hosts`:
    the names it answers to (allowed_hosts); `names`: which model a request's name means (its
    aliases: --model-alias)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(to_json(status()))

    async def post_probe(request: web.Request) -> web.Response:
        return web.json_response({"links": to_json(tuple(await probe()))})

    async def get_openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document(backend, limits, keyed=api_key is not None, names=names))

    # the Host and the key are checked inside errors_in_api_format: a 404 or 405 is told only to
    # who may ask
    middlewares = [errors_in_api_format, host_middleware(hosts)] + \
        ([key_middleware(api_key)] if api_key is not None else [])  # fmt: skip
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/health", health)
    app.router.add_get("/status", get_status)
    app.router.add_post("/probe", post_probe)
    app.router.add_get("/openapi.json", get_openapi)
    add_openai_routes(app, backend, limits, names)
    add_responses_routes(app, backend, limits, names)
    add_anthropic_routes(app, backend, limits, names)
    add_ollama_routes(app, backend, limits, names)
    return app


def openapi_document(backend: Backend, limits: Limits = Limits(), keyed: bool = False,
                     names: ModelNames = ModelNames()) -> dict[str, Any]:  # fmt: skip
    """The OpenAPI document of make_app's API on this node (its models are named in it);
    `keyed`: the node wants an API key (the document's security then says how to send it)."""
    document = openapi.document([_description(), openai_api.openapi_description(backend, limits, names),
                                 responses_api.openapi_description(backend, limits, names),
                                 anthropic_api.openapi_description(backend, limits, names),
                                 ollama_api.openapi_description(backend, limits, names)])  # fmt: skip
    for path, item in document["paths"].items():  # what any operation may answer, in its API's error format
        for operation in item.values():
            error = _error_schema(path, operation)
            operation["responses"]["403"] = json_body(error, "the request's Host is not a name of this machine "
                                                             "(code host_not_allowed; --api-allow-host)")
            if "requestBody" in operation:
                operation["responses"]["408"] = json_body(error, f"the body took longer than {limits.body_timeout:g} s")
                operation["responses"]["415"] = json_body(error, "the body is not sent as JSON "
                                                                 "(Content-Type: application/json)")
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
                    operation["responses"]["401"] = json_body(_error_schema(path, operation),
                                                              "no API key, or a wrong one")
    return document


def _error_schema(path: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The schema of an operation's errors: that of those it describes, else its API's."""
    errors = [r for code, r in operation["responses"].items() if code[0] in "45"]
    if errors:
        return errors[0]["content"]["application/json"]["schema"]
    return ref(ollama_api.ERROR if ollama_api.owns(path) else anthropic_api.ERROR if anthropic_api.owns(path) else "Error")


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


# --- serving: timeouts and a cap on connections -----------------------------------------------


class Listener:
    """Serves the app on any number of ports (one app: the same endpoints, key and connections
    on each), with Limits' header_timeout, linger and max_connections (the body's timeout is
    read_body's). aiohttp has no cap on connections: its own server (the protocol factory) is
    handed each one while fewer than max_connections are open."""

    def __init__(self, app: web.Application, limits: Limits = Limits(), handler_cancellation: bool = False) -> None:
        # keepalive_timeout runs from a connection's start and from each answer until the next
        # request's headers are in: a client that sends half of them is closed then
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=handler_cancellation,
                                    keepalive_timeout=limits.header_timeout, lingering_time=limits.linger,
                                    logger=_ServerLog(logging.getLogger("aiohttp.server"), {}))  # fmt: skip
        self.limits = limits
        self.servers: list[asyncio.Server] = []
        self._full = False  # refusing connections now (told once in the log)

    async def start(self) -> None:
        await self.runner.setup()

    async def listen(self, host: str, port: int) -> int:
        """Serve on host:port (0: any free port); the port. Raises OSError."""
        server = await asyncio.get_running_loop().create_server(self._connection, host, port)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def _connection(self) -> asyncio.BaseProtocol:
        """A new connection's protocol: aiohttp's, or one that closes it at once when
        max_connections are open. Closed rather than answered with a 503: an answer needs the
        request read, and its path to know the error's shape, which is what the cap keeps
        from piling up; a client sees a connection closed, as when a server is restarted, and
        the openai and anthropic SDKs retry it. (A burst accepted in one go may pass the cap by the listen backlog.)"""
        server = self.runner.server
        assert server is not None, "start() first"
        if len(server.connections) < self.limits.max_connections:
            self._full = False
            return server()
        if not self._full:
            log.warning("the API has %d connections open, its most: new ones are closed until some end "
                        "(idle and half-sent ones within %g s)", self.limits.max_connections,
                        self.limits.header_timeout)  # fmt: skip
        self._full = True
        return _Closed()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        await self.runner.cleanup()


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server log, where a request that breaks HTTP (aiohttp answers it with a 400 of
    its own: the client's mistake) is a debug line, not an error with a traceback: no client
    can fill the log."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and 400 <= exc_info.code < 500:
            self.debug("%s: %s", str(msg) % args, " ".join(exc_info.message.split()))
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


class _Closed(asyncio.Protocol):
    """A connection beyond the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


# --- the OpenAPI description of the status endpoints ------------------------------------------


def _description() -> ApiDescription:
    """GET /health, GET /status, POST /probe and GET /openapi.json; the status's schemas are made
    from its types (tbmesh.core.status)."""
    links = obj({"links": {"type": "array", "items": ref("LinkStatus")}}, required=["links"])
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
        schemas=openapi.dataclass_schemas(Status),
    )

