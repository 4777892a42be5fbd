"""Weights over the cables, with Macs as network namespaces and shaped veth pairs as cables:
a Mac with no weights joins, fetches its layers from its peers and answers as mlx-lm does;
its disk holds only its shard; a stage killed while the survivors lack its layers is
fetched again from the disk that still holds them; heartbeats survive a saturated cable.

Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from daemons import DaemonProcess, serving_view, start_all, wait_for
from serving import Stream, model_dir, read_stream, reference  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.needs_root]

PROMPT = "Thunderbolt cables link the Macs"


@pytest.fixture
def macs(lab, tmp_path, model_dir):  # noqa: F811
    """start(mac, weights) makes a daemon for that Mac: with the model's directory, or with
    nothing but the model's name (its weights then come from its peers)."""
    cluster = f"w{uuid.uuid4().hex[:8]}"
    daemons: list[DaemonProcess] = []

    def make(mac, weights: bool) -> DaemonProcess:
        model = str(model_dir) if weights else model_dir.name
        daemon = DaemonProcess(mac.name, tmp_path / mac.name, [
            "--interface", "tb*", "--memory", "4GB", "--model", model, "--cluster", cluster], mac=mac)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.kill()


def serving(daemons: list[DaemonProcess], timeout: float = 60) -> dict:
    return wait_for(lambda: serving_view(daemons), timeout, "a committed plan that every stage serves")


def stored_objects(state_dir: Path) -> dict[str, int]:
    """digest -> size of every finished object in a daemon's store."""
    root = state_dir / "weights"
    return {p.name: p.stat().st_size for p in root.glob("??/*") if p.is_file() and "." not in p.name}


def manifest_of(state_dir: Path) -> dict:
    root = state_dir / "weights"
    digest = next(root.glob("*.manifest")).read_text().strip()
    return json.loads((root / digest[:2] / digest).read_bytes())


def test_a_mac_with_no_weights_fetches_its_layers_and_answers_as_mlx_lm(lab, macs, reference, model_dir):  # noqa: F811
    a, b = lab.add_mac("a"), lab.add_mac("b")
    lab.cable(a, b).shape("100mbit")  # the fetch takes a while: heartbeats share the cable
    holder, empty = start_all([macs(a, weights=True), macs(b, weights=False)])
    view = serving([holder, empty])
    stage = next(s for s in view["plan"]["stages"] if s["node"] == empty.node_id)
    assert not list(Path(empty.state_dir / "models" / model_dir.name).glob("*.safetensors"))

    expected, _ = reference(PROMPT, 60)
    pieces: list[str] = []
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "stream": True, "temperature": 0}
    _, error = read_stream(empty, body, 60, pieces.append)
    assert error is None and "".join(pieces) == expected

    # its disk holds its shard's tensors (plus the manifest and the small files), no more
    manifest = manifest_of(empty.state_dir)
    tensors = {t["digest"]: t for t in manifest["tensors"]}
    small = {f["digest"] for f in manifest["files"]}
    stored = stored_objects(empty.state_dir)
    held = {d: n for d, n in stored.items() if d in tensors}
    assert set(stored) - set(held) <= small | {view_manifest_digest(empty)}
    layers = {t["layer"] for d in held for t in manifest["tensors"] if t["digest"] == d}
    wanted = set(range(stage["start"], stage["end"])) | ({None} if stage["start"] == 0 or stage["end"] == 8 else set())
    assert layers <= wanted
    assert abs(sum(held.values()) - stage["bytes"]) <= 0.01 * stage["bytes"]

    events = holder.status()["events"] + empty.status()["events"]
    assert not [e for e in events if e["kind"] == "suspect"]  # the saturated cable starved no heartbeat


def view_manifest_digest(daemon: DaemonProcess) -> str:
    return next(n["disk"]["manifest"] for n in daemon.status()["nodes"] if n["id"] == daemon.node_id)


def test_a_stage_killed_while_the_survivors_lack_its_layers_is_fetched_again(lab, macs, reference):  # noqa: F811
    a, b, c = (lab.add_mac(n) for n in "abc")
    for x, y in ((a, b), (b, c), (a, c)):
        lab.cable(x, y)
    daemons = start_all([macs(a, weights=True), macs(b, weights=False), macs(c, weights=False)])
    view = serving(daemons)
    holder = daemons[0]
    victim = next(d for d in daemons[1:] if any(s["node"] == d.node_id for s in view["plan"]["stages"]))
    entry = next(d for d in daemons[1:] if d is not victim)
    expected, _ = reference(PROMPT, 300)
    stream = Stream(entry, PROMPT, 300, temperature=0, timeout=180)
    stream.wait_pieces(30)
    victim.kill()
    assert stream.result() == expected
    survivors = [holder, entry]
    view = serving(survivors)
    assert victim.node_id not in {s["node"] for s in view["plan"]["stages"]}
    disks = {n["id"]: n["disk"] for n in view["nodes"] if n["id"] != victim.node_id}
    mine = next(s for s in view["plan"]["stages"] if s["node"] == entry.node_id)
    assert any(start <= mine["start"] and mine["end"] <= end for start, end in disks[entry.node_id]["layers"])


def test_a_model_on_no_disk_says_so_and_serves_nothing(lab, macs):
    a, b = lab.add_mac("a"), lab.add_mac("b")
    lab.cable(a, b)
    daemons = start_all([macs(a, weights=False), macs(b, weights=False)])
    status = wait_for(lambda: (s := daemons[0].status())["model"] is None and s["leader"] and s, 20,
                      "a leader that knows no model")
    assert status["plan"] is None
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5}
    answer = json.loads(daemons[0].request("POST", "/v1/completions", json.dumps(body).encode(), timeout=60))
    assert "no reachable Mac holds the model tiny" in answer["error"]["message"]
