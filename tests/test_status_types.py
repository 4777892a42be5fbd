"""GET /status is its types (tbmesh.core.status): a real daemon's status validates against the
schema made from them and reads back typed to the same JSON; every field of the types is in
the schema; the keys clients read stay put; a status from another daemon version reads."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass

import jsonschema_rs
import pytest
from daemons import DaemonProcess, serving_alone, tiny_model_dir, wait_for

from tbmesh.core.jsonform import flat, from_json, json_fields, to_json
from tbmesh.core.status import RuntimeStatus, Status
from tbmesh.core.types import Plan, Stage
from tbmesh.http.openapi import dataclass_schemas

# what clients (tbmesh status, the demo, the README, dashboards) read: renaming one is a change
STATUS_KEYS = {"node", "cluster", "now", "leader", "term", "model", "nodes", "replicas", "links", "plan", "preparing",
               "no_fit", "runtime", "events"}
NODE_KEYS = {"id", "name", "chip", "state", "memory_total", "memory_usable", "flops", "role", "shard", "other_model",
             "disk"}
RUNTIME_KEYS = {"requests", "held", "loading", "weight_bytes", "active_memory", "tokens_per_s", "loads", "layers_read",
                "layers_kept", "peak_weight_bytes", "bytes_read", "resumed", "tokens", "steps", "refused_nonfinite",
                "tight_loads", "queued", "decoding", "kv_tokens", "kv_room", "prefix_hits", "prefix_lookups",
                "prefix_hit_tokens", "admitted", "preempted", "decode_steps", "decoded", "prefill_steps", "prefilled",
                "stage_requests", "kv_bytes", "prefix_entries", "prefix_tokens", "prefix_bytes"}


def validator(schemas: dict[str, typing.Any]) -> typing.Any:
    return jsonschema_rs.validator_for({**schemas["Status"], "components": {"schemas": schemas}})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("status")
    daemon = serving_alone("solo", root / "solo", tiny_model_dir(root / "model"))
    try:
        # its disk hashed too: every part of a node's status is there
        wait_for(lambda: all(n["disk"] and n["disk"]["manifest"] for n in daemon.status()["nodes"]), 60,
                 "the model on disk to be known")
        yield daemon
    finally:
        daemon.kill()


def test_a_daemons_status_is_what_its_schema_says_and_reads_back_typed(daemon: DaemonProcess) -> None:
    data = daemon.status()
    schemas = json.loads(daemon.get("/openapi.json"))["components"]["schemas"]
    errors = [f"{e.instance_path}: {e.message}" for e in validator(schemas).iter_errors(data)]
    assert not errors, errors
    assert data["runtime"] is not None and data["plan"] is not None and data["nodes"][0]["disk"] is not None
    assert set(data) == STATUS_KEYS and set(data["nodes"][0]) == NODE_KEYS and set(data["runtime"]) == RUNTIME_KEYS
    status = from_json(Status, data)
    assert to_json(status) == data  # the typed reader misses nothing the daemon sends
    assert status.plan is not None and status.plan.stages[0].node == status.node.id
    assert status.runtime is not None and status.runtime.scheduler.kv_room > 0
    # and the schema can fail: a key of the wrong type, one it does not know, one missing
    broken = {**data, "term": "7", "uptime": 1.0}
    del broken["links"]
    errors = list(validator(schemas).iter_errors(broken))
    assert len(errors) == 3 and ["term"] in [list(e.instance_path) for e in errors]
    assert any("uptime" in e.message for e in errors) and any("links" in e.message for e in errors)


def keys_of(cls: type) -> tuple[set[str], set[str]]:
    """The keys of `cls`'s JSON object, and those always sent, by walking its fields."""
    keys, always = set(), set()
    for spec in json_fields(cls):
        if spec.flat:
            inner = keys_of(spec.type)
            keys |= inner[0]
            always |= inner[1]
        else:
            keys.add(spec.key)
            always |= {spec.key} if spec.always else set()
    return keys, always


def described_in(tp: typing.Any) -> Iterator[type]:
    """The dataclasses in type `tp` that have a schema of their own (a FLAT field's has not:
    its fields are its parent's)."""
    if is_dataclass(tp):
        yield tp
        yield from fields_in(tp)
    for arg in typing.get_args(tp):
        yield from described_in(arg)


def fields_in(cls: type) -> Iterator[type]:
    for spec in json_fields(cls):
        yield from fields_in(spec.type) if spec.flat else described_in(spec.type)


def test_every_field_of_the_types_is_in_the_schema() -> None:
    schemas = dataclass_schemas(Status)
    described = set(described_in(Status))
    assert {cls.__name__ for cls in described} == set(schemas)
    for cls in described:
        keys, always = keys_of(cls)
        assert set(schemas[cls.__name__]["properties"]) == keys, cls
        assert set(schemas[cls.__name__].get("required", ())) == always, cls
    assert keys_of(RuntimeStatus)[0] == RUNTIME_KEYS
    assert "sources" not in schemas["FetchStatus"]["properties"] and "from" in schemas["FetchStatus"]["properties"]
    assert set(schemas["Plan"]["required"]) == {"term", "epoch", "model", "stages", "left_out"}  # manifest: when known


def test_a_plan_has_one_json_form() -> None:
    plan = Plan(1, 2, "m", (Stage("a", 0, 4, 10, ("a", "b")), Stage("c", 4, 8, 10)), ("d",), "ab" * 32)
    assert to_json(plan) == {"term": 1, "epoch": 2, "model": "m", "left_out": ["d"], "manifest": "ab" * 32,
                             "stages": [{"node": "a", "start": 0, "end": 4, "bytes": 10, "group": ["a", "b"]},
                                        {"node": "c", "start": 4, "end": 8, "bytes": 10}]}
    assert from_json(Plan, to_json(plan)) == plan
    assert "manifest" not in to_json(Plan(1, 2, "m"))  # as on the wire: left out while not known


def test_a_status_from_another_daemon_version_reads() -> None:
    older = {"node": {"id": "n1", "name": "one"}, "term": 3.0, "nodes": [{"id": "n1", "shard": {"start": 0, "end": 4}},
                                                                           "not a node"],
             "links": None, "runtime": {"requests": 2, "kv_room": "lots"}, "events": [{"kind": "joined"}],
             "newer_key": {"anything": 1}}
    status = from_json(Status, older)
    assert status.node.name == "one" and status.term == 3 and status.cluster == "" and status.links == ()
    assert [n.id for n in status.nodes] == ["n1"] and status.nodes[0].shard.end == 4
    assert status.nodes[0].shard.bytes is None and status.nodes[0].role == "" and status.plan is None
    assert status.runtime.requests == 2 and status.runtime.scheduler.kv_room == 0
    assert status.events[0].kind == "joined" and status.events[0].node is None


@dataclass(frozen=True)
class Part:
    requests: int


@dataclass(frozen=True)
class Whole:
    requests: int
    part: Part = field(metadata=flat())  # its `requests` would be sent twice


def test_the_schema_names_no_key_twice() -> None:
    with pytest.raises(ValueError, match="two fields are sent as 'requests'"):
        dataclass_schemas(Whole)
