"""The OpenAPI document (GET /openapi.json) against the app that serves it: it names every
route and no other, it is valid OpenAPI 3.1, and what aiohttp answers by itself (no such path,
a method the path does not take) or a handler that fails is in the error format of the API
the path belongs to (Anthropic's under /v1/messages, OpenAI's elsewhere)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from api_server import ApiServer, empty_status, no_links

from tbmesh.core.status import Status
from tbmesh.http.common import Limits
from tbmesh.http.openapi import ApiDescription, document
from tbmesh.http.server import make_app, openapi_document
from tbmesh.runtime.local import LocalBackend
from tbmesh.testbed.tiny import make_tiny_model


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    with LocalBackend(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", layers=2, hidden=64)) as backend:
        yield backend


def failing_status() -> Status:
    raise RuntimeError("the status could not be made")


@pytest.fixture(scope="module")
def server(backend: LocalBackend) -> Iterator[ApiServer]:
    with ApiServer(backend, status=failing_status) as server:
        yield server


def call(server: ApiServer, method: str, path: str) -> tuple[int, Any, dict[str, Any]]:
    request = urllib.request.Request(server.url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, json.loads(error.read())


def is_api_error(body: Any) -> bool:
    return (isinstance(body, dict) and body.keys() == {"error"}
            and body["error"].keys() == {"message", "type", "param", "code"}
            and isinstance(body["error"]["message"], str) and body["error"]["message"] != "")  # fmt: skip


def is_anthropic_error(body: Any) -> bool:
    return (isinstance(body, dict) and body.keys() == {"type", "error"} and body["type"] == "error"
            and body["error"].keys() == {"type", "message"} and body["error"]["message"] != "")  # fmt: skip


def test_the_document_names_every_route_and_no_other(backend: LocalBackend) -> None:
    app = make_app(empty_status, no_links, backend)
    # aiohttp adds a HEAD route to each GET one, which OpenAPI leaves implied
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    described = {(method, path) for path, item in openapi_document(backend)["paths"].items() for method in item}
    assert routes == described
    assert ("post", "/v1/chat/completions") in routes and ("get", "/v1/models/{model}") in routes
    assert ("post", "/v1/messages") in routes and ("post", "/v1/messages/count_tokens") in routes
    assert ("post", "/api/chat") in routes and ("get", "/") in routes and ("get", "/health") in routes


def test_the_document_is_valid_openapi_and_names_the_models(backend: LocalBackend) -> None:
    doc = openapi_document(backend, Limits(max_tokens=100))
    schemathesis.openapi.from_dict(doc).validate()  # OpenAPI 3.1's own schema: raises if not
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert request["properties"]["model"]["enum"] == ["tiny", "tiny:latest"]  # Ollama's tag is taken too
    assert request["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 100  # the limits it is served with
    assert {"400", "403", "404", "408", "413", "415", "503"} <= doc["paths"]["/v1/completions"]["post"]["responses"].keys()
    assert "403" in doc["paths"]["/health"]["get"]["responses"] and "415" not in doc["paths"]["/health"]["get"]["responses"]
    assert doc["paths"]["/api/chat"]["post"]["responses"]["415"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/OllamaError"}  # fmt: skip
    for path in ("/v1/messages", "/v1/messages/count_tokens"):  # Anthropic's error shape, its own schemas
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "403", "404", "413", "415", "503"} <= responses.keys()
        for status in ("400", "403", "415"):
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AnthropicError"}
    assert doc["components"]["schemas"]["MessagesRequest"]["properties"]["model"]["enum"] == ["tiny", "tiny:latest"]
    assert "text/event-stream" in doc["paths"]["/v1/messages"]["post"]["responses"]["200"]["content"]


def test_openapi_json_serves_the_document(server: ApiServer, backend: LocalBackend) -> None:
    assert server.get("/openapi.json") == (200, openapi_document(backend))


def test_a_path_described_twice_is_refused() -> None:
    part = ApiDescription({"/x": {"get": {"responses": {}}}})
    with pytest.raises(ValueError, match="described twice"):
        document([part, part])
    with pytest.raises(ValueError, match="two different schemas named S"):
        document([ApiDescription({}, {"S": {"type": "string"}}), ApiDescription({}, {"S": {"type": "integer"}})])


def test_a_method_a_path_does_not_take_is_405_naming_those_it_does(server: ApiServer) -> None:
    for method, path, allowed in [("DELETE", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET, HEAD"),
                                  ("PUT", "/v1/models/tiny", "GET, HEAD"), ("GET", "/probe", "POST")]:  # fmt: skip
        status, headers, body = call(server, method, path)
        assert status == 405 and headers["Allow"] == allowed, (method, path, status, body)
        assert is_api_error(body) and f"does not take {method}" in body["error"]["message"]
    for method, path in [("GET", "/v1/messages"), ("DELETE", "/v1/messages/count_tokens")]:  # Anthropic's shape
        status, headers, body = call(server, method, path)
        assert status == 405 and headers["Allow"] == "POST", (method, path, status, body)
        assert is_anthropic_error(body) and body["error"]["type"] == "invalid_request_error", body
        assert f"does not take {method}" in body["error"]["message"]


def test_ollamas_paths_answer_404_and_405_in_ollamas_shape(server: ApiServer) -> None:
    status, headers, body = call(server, "GET", "/api/chat")
    assert status == 405 and headers["Allow"] == "POST" and body.keys() == {"error"}, (status, body)
    assert "does not take GET" in body["error"]
    status, _, body = call(server, "POST", "/api/nothing")
    assert status == 404 and body == {"error": "no such endpoint: POST /api/nothing"}


def test_the_document_with_a_key_says_how_to_send_it(backend: LocalBackend) -> None:
    doc = openapi_document(backend, keyed=True)
    schemathesis.openapi.from_dict(doc).validate()
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]
    assert doc["paths"]["/health"]["get"]["security"] == [] and doc["paths"]["/"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/openapi.json"]["get"]
    assert doc["paths"]["/api/tags"]["get"]["responses"]["401"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/OllamaError"}  # fmt: skip
    assert "security" not in openapi_document(backend)


def test_an_unknown_path_is_404_in_the_error_format(server: ApiServer) -> None:
    for method in ("GET", "POST", "DELETE"):
        status, _, body = call(server, method, "/v2/nothing")
        assert status == 404 and is_api_error(body) and body["error"]["message"] == f"no such endpoint: {method} /v2/nothing"
        status, _, body = call(server, method, "/v1/messages/batches")  # under Anthropic's path: its shape
        assert status == 404 and is_anthropic_error(body) and body["error"]["type"] == "not_found_error", body


def test_a_failing_handler_is_500_in_the_error_format_and_the_server_goes_on(server: ApiServer) -> None:
    status, _, body = call(server, "GET", "/status")
    assert status == 500 and is_api_error(body) and body["error"]["type"] == "server_error"
    assert "the status could not be made" in body["error"]["message"]
    assert server.get("/v1/models")[0] == 200



def test_a_failing_handler_under_anthropics_path_is_500_in_anthropics_shape(backend: LocalBackend) -> None:
    async def failing(request: web.Request) -> web.Response:
        raise RuntimeError("it broke")

    async def get() -> tuple[int, Any]:
        app = make_app(empty_status, no_links, backend)
        app.router.add_get("/v1/messages/failing", failing)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/messages/failing")
            return response.status, await response.json()

    status, body = asyncio.run(get())
    assert status == 500 and is_anthropic_error(body) and body["error"]["type"] == "api_error", body
    assert "RuntimeError: it broke" in body["error"]["message"]
