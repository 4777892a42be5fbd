"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json: a plain dict.

Each API module describes what it serves next to its routes and its request checking, as an
`ApiDescription` (its paths and the schemas they refer to); `document()` joins them. A new API
(another vendor's endpoints) adds its description to the list in tbmesh.http.server.openapi_document
and its routes in make_app.
What a dataclass describes is not written twice: `dataclass_schemas` makes the schemas of
GET /status from tbmesh.core.status's types.
tests/test_openapi.py checks that the document names exactly the routes the app has, and
tests/test_openapi_fuzz.py fuzzes a live daemon from it.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass, field, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, Union, get_args, get_origin

from tbmesh.core.jsonform import json_fields

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


def dataclass_schemas(cls: type) -> dict[str, Schema]:
    """The component schemas of dataclass `cls` and of the dataclasses it holds, by class
    name, made from their type hints: the JSON form tbmesh.core.jsonform writes, and only it
    (additionalProperties false); a field left out at its default is not required."""
    schemas: dict[str, Schema] = {}
    _schema_of(cls, schemas)
    return schemas


def _schema_of(tp: Any, schemas: dict[str, Schema]) -> Schema:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        options = [_schema_of(a, schemas) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return nullable(schema) if type(None) in args else schema
    if tp in _PLAIN:
        return {"type": _PLAIN[tp]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": _schema_of(args[0], schemas)}
    if origin is tuple:
        return {"type": "array", "prefixItems": [_schema_of(a, schemas) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if origin is dict and args[0] is str:
        return {"type": "object", "additionalProperties": _schema_of(args[1], schemas)}
    if is_dataclass(tp):
        name = tp.__name__
        if name not in schemas:
            schemas[name] = {}  # taken: a dataclass that holds itself refers to it
            properties: dict[str, Schema] = {}
            required: list[str] = []
            _add_fields(tp, properties, required, schemas)
            description = " ".join((tp.__doc__ or "").split("\n\n")[0].split())
            schemas[name] = obj(properties, required, additionalProperties=False,
                                **({"description": description} if description else {}))
        return ref(name)
    raise TypeError(f"no JSON schema for {tp!r}")


_PLAIN = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def _add_fields(cls: type, properties: dict[str, Schema], required: list[str], schemas: dict[str, Schema]) -> None:
    for spec in json_fields(cls):
        if spec.flat:  # its keys are ours
            _add_fields(spec.type, properties, required, schemas)
            continue
        if spec.key in properties:
            raise ValueError(f"{cls.__name__}: two fields are sent as {spec.key!r}")
        schema = _schema_of(spec.type, schemas)
        if "doc" in spec.field.metadata:
            schema = {**schema, "description": spec.field.metadata["doc"]}
        properties[spec.key] = schema
        if spec.always:
            required.append(spec.key)


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
