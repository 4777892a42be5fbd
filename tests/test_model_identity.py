"""One model is one model, through real daemons on loopback (issue 20, items 6 and 7): two Macs
holding different models under one name are not planned as one, and a Mac whose copy of the
model rotted (a NaN in one layer, its size and times kept) serves no step of it; either way
the answers are mlx-lm's, token for token, for the cluster's model."""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path

import pytest
from daemons import DaemonProcess, start_all, wait_for
from serving import PROMPTS, complete, mlx_reference, post

from tbmesh.testbed.tiny import make_tiny_model
from tbmesh.weights.modeldir import read_layout


def tiny(root: Path, seed: int) -> Path:
    """The test model, under the directory name "tiny" whatever its seed."""
    return make_tiny_model(root / f"seed{seed}" / "tiny", layers=8, hidden=128, vocab=512, seed=seed)


@pytest.fixture
def daemons(tmp_path):
    cluster = f"o{uuid.uuid4().hex[:8]}"
    made: list[DaemonProcess] = []

    def make(name: str, model: Path) -> DaemonProcess:
        made.append(DaemonProcess(name, tmp_path / name, ["--interface", "lo", "--memory", "4GB", "--model",
                                                          str(model), "--cluster", cluster, "--no-probe"]))
        return made[-1]

    yield make
    for daemon in made:
        daemon.kill()


def node(status: dict, node_id: str) -> dict:
    return next(n for n in status["nodes"] if n["id"] == node_id)


def test_two_models_under_one_name_are_not_planned_as_one(daemons, tmp_path):
    models = {seed: tiny(tmp_path / "models", seed) for seed in (0, 1)}
    started = start_all([daemons(f"n{seed}", models[seed]) for seed in (0, 1)])
    ids = {d.node_id: (d, seed) for d, seed in zip(started, (0, 1))}

    def settled() -> dict | None:
        statuses = [d.status() for d in started]
        leader = statuses[0]["leader"]
        plan = statuses[0]["plan"]
        if leader is None or plan is None or any(s["leader"] != leader or s["plan"] != plan for s in statuses):
            return None
        if len({n["id"] for n in statuses[0]["nodes"] if n["state"] == "alive"}) != 2:
            return None
        if not all(node(statuses[0], s["node"])["shard"] and node(statuses[0], s["node"])["shard"]["loaded"]
                   for s in plan["stages"]):
            return None
        return statuses[0]

    view = wait_for(settled, 60, "one plan, served")
    leader, other = ids[view["leader"]], next(v for k, v in ids.items() if k != view["leader"])
    # only the leader's model's Mac holds layers; the other is left out, and every status says why
    assert [s["node"] for s in view["plan"]["stages"]] == [view["leader"]]
    for daemon in started:
        status = daemon.status()
        why = node(status, other[0].node_id)["other_model"]
        assert why and f"{other[0].name} holds another model under the name tiny: manifest" in why
        assert node(status, view["leader"])["other_model"] is None
    assert any(e["kind"] == "other-model" for e in leader[0].status()["events"])
    assert "other-model" in leader[0].log() and "holds another model under the name tiny" in leader[0].log()

    reference = mlx_reference(models[leader[1]])
    for prompt in PROMPTS:
        assert complete(leader[0], prompt, 16, temperature=0) == reference(prompt, 16)
    # the other Mac's own API refuses: its tokenizer and weights are the other model's
    status, body = post(other[0], "/v1/completions", {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4})
    assert status == 503 and "holds another model under the name tiny" in body["error"]["message"]


def rot(model: Path) -> None:
    """Bits rotted in place in a copy already hashed: a NaN in a weight of every layer (the file
    keeps its size; the running daemon's manifest still names the bytes it hashed)."""
    for path in model.glob("model*.safetensors"):
        slots = read_layout(path)
        with open(path, "r+b") as f:
            for name, slot in slots.items():
                if name.endswith("mlp.down_proj.weight") and slot.dtype == "F32":
                    f.seek(slot.start)
                    f.write(struct.pack("<f", float("nan")))


def test_a_mac_whose_copy_rotted_serves_no_layer_of_it_and_answers_stay_mlx_lms(daemons, tmp_path):
    """a and b hold copies of one model; b's has rotted (a NaN in each layer) since it hashed it.
    When a new plan gives b layers it has not loaded yet, it refuses them as it reads them:
    the leader plans without b, and the answers are mlx-lm's, before and after."""
    model = tiny(tmp_path / "models", 0)
    copies = [shutil.copytree(model, tmp_path / name / "tiny") for name in ("copy-a", "copy-b")]
    memory = tmp_path / "b-memory"
    memory.write_text("10MiB")  # b holds two layers at first
    a = daemons("a", copies[0])
    a.args += ["--memory", "40MiB"]
    b = daemons("b", copies[1])
    b.args.remove("--memory"), b.args.remove("4GB")
    b.env = {"TBMESH_MEMORY_FILE": str(memory)}
    start_all([a, b])
    ids = {a.node_id: "a", b.node_id: "b"}

    def stages() -> list[tuple[str, int, int]] | None:
        statuses = [d.status() for d in (a, b)]
        plan = statuses[0]["plan"]
        if plan is None or statuses[1]["plan"] != plan or statuses[0]["preparing"] is not None:
            return None
        if not all(node(statuses[0], s["node"])["shard"] and node(statuses[0], s["node"])["shard"]["serving"]
                   == plan["epoch"] for s in plan["stages"]):
            return None
        return [(ids[s["node"]], s["start"], s["end"]) for s in plan["stages"]]

    before = wait_for(lambda: (found := stages()) and len(found) == 2 and found, 60, "a plan of a and b")
    held = next(range(s, e) for n, s, e in before if n == "b")
    assert len(held) <= 2  # of 8: a bigger share has layers new to it
    reference = mlx_reference(model)
    expected = {prompt: reference(prompt, 16) for prompt in PROMPTS}
    assert complete(a, PROMPTS[0], 16, temperature=0) == expected[PROMPTS[0]]
    rot(copies[1])
    memory.write_text("40MiB")  # b's share grows: it must read new layers from its rotted copy
    assert wait_for(lambda: stages() == [("a", 0, 8)], 60, "a plan without b")
    events = a.status()["events"] + b.status()["events"]  # the leader's says why
    failed = [e["detail"] for e in events if e["kind"] == "load-failed"]
    assert failed and "holds values that are not finite (NaN or inf): this copy of the model is damaged" in failed[0]
    for prompt in PROMPTS:
        assert complete(b, prompt, 16, temperature=0) == expected[prompt]  # b's API still answers, through a
    assert complete(a, PROMPTS[0], 16, temperature=0) == expected[PROMPTS[0]]  # again: from the prefix cache
