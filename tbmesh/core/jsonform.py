"""The JSON form of the core's frozen dataclasses (a plan, a node's status): one way to write
them (`to_json`), one to read them back typed (`from_json`), and the keys and types they have
(`json_fields`), from which tbmesh.http.openapi makes their schema.

The form is the wire's (tbmesh.net.wire): a dataclass is an object of its fields, tuples are
arrays, and a field marked OMIT_DEFAULT is left out while it holds its default. Two marks of
our own, in a field's metadata: FLAT puts a dataclass field's keys in its parent's object (the
status's `runtime` is one object made of the engine's and the scheduler's parts), and
`json_key` names the key when the field's name cannot be it (`from`).

`from_json` is a tolerant reader: what the JSON lacks or holds in the wrong type becomes the
field's default, or its type's empty value (0, "", (), None...), so a client shows what an
older or newer daemon sends rather than failing on it. What the daemon sends exactly is
checked against the schema instead (tests/test_status_types.py).
"""

from __future__ import annotations

import functools
import types
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from tbmesh.core.types import omits_default, omitted

FLAT = "flat"


def flat(**metadata: Any) -> dict[str, Any]:
    """Metadata of a dataclass field whose own fields are keys of its parent's object."""
    return {"json": FLAT, **metadata}


def json_key(key: str, **metadata: Any) -> dict[str, Any]:
    """Metadata of a field sent under another key than its name."""
    return {"json_key": key, **metadata}


def doc(text: str) -> dict[str, Any]:
    """Metadata of a field: what its schema says of it."""
    return {"doc": text}


@dataclass(frozen=True)
class JsonField:
    field: Field
    key: str  # the key in the object ("" for a FLAT field: its own fields are the keys)
    type: Any  # the resolved type hint
    flat: bool
    always: bool  # sent whatever it holds (a field marked OMIT_DEFAULT is not)


@functools.cache
def json_fields(cls: type) -> tuple[JsonField, ...]:
    hints = get_type_hints(cls)
    return tuple(JsonField(f, "" if f.metadata.get("json") == FLAT else f.metadata.get("json_key", f.name),
                           hints[f.name], f.metadata.get("json") == FLAT, not omits_default(f))
                 for f in fields(cls))


def to_json(value: Any) -> Any:
    """`value` (a dataclass, or tuples, lists, dicts and plain values holding them) as JSON."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for spec in json_fields(type(value)):
            item = getattr(value, spec.field.name)
            if spec.flat:
                out.update(to_json(item))
            elif not omitted(value, spec.field):
                out[spec.key] = to_json(item)
        return out
    if isinstance(value, (tuple, list)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


T = TypeVar("T")


def from_json(cls: type[T], data: Any) -> T:
    """An instance of dataclass `cls` from its JSON form (tolerant: see the module's doc)."""
    data = data if isinstance(data, dict) else {}
    kwargs = {}
    for spec in json_fields(cls):
        if spec.flat:
            kwargs[spec.field.name] = from_json(spec.type, data)
            continue
        value = _read(spec.type, data[spec.key]) if spec.key in data else _WRONG
        kwargs[spec.field.name] = _fallback(spec) if value is _WRONG else value
    return cls(**kwargs)


# --- reading -----------------------------------------------------------------------------------

_WRONG = object()  # what _read gives for a value not of the type


def _read(tp: Any, value: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is not type(None) and (read := _read(option, value)) is not _WRONG:
                return read
        return None if type(None) in args else _WRONG
    if tp is bool:
        return value if isinstance(value, bool) else _WRONG
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG
    if tp is str:
        return value if isinstance(value, str) else _WRONG
    if origin is Literal:
        return value if isinstance(value, str) else _WRONG  # a newer daemon's new word shows as it is
    if origin is tuple:
        if not isinstance(value, list):
            return _WRONG
        if len(args) == 2 and args[1] is Ellipsis:  # the items of the right type
            return tuple(read for item in value if (read := _read(args[0], item)) is not _WRONG)
        items = tuple(_read(arg, item) for arg, item in zip(args, value))
        return items if len(value) == len(args) and _WRONG not in items else _WRONG
    if origin is dict:
        if not isinstance(value, dict):
            return _WRONG
        return {key: read for key, item in value.items()
                if isinstance(key, str) and (read := _read(args[1], item)) is not _WRONG}
    if is_dataclass(tp):
        return from_json(tp, value) if isinstance(value, dict) else _WRONG
    raise TypeError(f"no JSON form for {tp!r}")


def _fallback(spec: JsonField) -> Any:
    if spec.field.default is not MISSING:
        return spec.field.default
    if spec.field.default_factory is not MISSING:
        return spec.field.default_factory()
    return _empty(spec.type)


def _empty(tp: Any) -> Any:
    """The value a missing or broken field of type `tp` reads as."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return None if type(None) in args else _empty(args[0])
    if origin is tuple:
        return () if len(args) == 2 and args[1] is Ellipsis else tuple(_empty(arg) for arg in args)
    if origin is dict:
        return {}
    if origin is Literal:
        return ""
    if is_dataclass(tp):
        return from_json(tp, {})
    return tp()  # bool, int, float, str: False, 0, 0.0, ""
