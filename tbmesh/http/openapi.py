"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json: a plain dict.

Each API module describes what it serves next to its routes and its request checking, as an
`ApiDescription` (its paths and the schemas they refer to); `document()` joins them. A new API
(another vendor's endpoints) adds its description to the list in tbmesh.http.server.openapi_document
and its routes in make_app.
tests/test_openapi.py checks that the document names exactly the routes the app has, and
tests/test_openapi_fuzz.py fuzzes a live daemon from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

OPENAPI_VERSION = "3.1.0"

Schema = dict[str, Any]


@dataclass(frozen=True)
class ApiDescription:
    """One API's share of the document: OpenAPI path items by path, and component schemas by name."""

    paths: dict[str, dict[str, Any]]
    schemas: dict[str, Schema] = field(default_factory=dict)


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema` or JSON null (an optional field sent as null counts as not sent)."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], required: Iterable[str] = (), **keywords: Any) -> Schema:
    """An object schema; `required` defaults to none."""
    schema: Schema = {"type": "object", "properties": properties, **keywords}
    if required := list(required):
        schema["required"] = required
    return schema


def json_body(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(descriptions: Iterable[ApiDescription]) -> dict[str, Any]:
    """The OpenAPI document of these APIs. Two that describe one path, or one schema name
    differently, are a programming error."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Schema] = {}
    for description in descriptions:
        if clash := paths.keys() & description.paths.keys():
            raise ValueError(f"paths described twice: {sorted(clash)}")
        paths.update(description.paths)
        for name, schema in description.schemas.items():
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different schemas named {name}")
    try:
        package_version = version("tbmesh")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package_version = "unknown"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tbmesh",
            "version": package_version,
            "description": "The HTTP API of a tbmesh node: the cluster's status and an "
                           "OpenAI-compatible API, Anthropic's Messages API and an Ollama-compatible "
                           "API of the model the cluster serves. Errors are in the format of the API "
                           "a path belongs to. With an API key (--api-key), every operation but the "
                           "health checks (GET /health, GET /) wants it, this document's included.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
