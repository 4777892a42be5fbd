"""Weights over the cables, with Macs as network namespaces and shaped veth pairs as cables:
a Mac with no weights joins, fetches its layers from its peers and answers as mlx-lm does;
its disk holds only its shard; a stage killed while the survivors lack its layers is
fetched again from the disk that still holds them; a Mac whose model directory vanished
serves its layers from memory; heartbeats survive a saturated cable.

Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
from daemons import DaemonProcess, serving_view, start_all, wait_for
from serving import Stream, model_dir, read_stream, reference  # noqa: F401  (fixtures)

from tbmesh.weights.manifest import Manifest

pytestmark = [pytest.mark.needs_root]

PROMPT = "Thunderbolt cables link the Macs"


@pytest.fixture
def macs(lab, tmp_path, model_dir):  # noqa: F811
    """start(mac, weights) makes a daemon for that Mac: with the model's directory, or with
    nothing but the model's name (its weights then come from its peers)."""
    cluster = f"w{uuid.uuid4().hex[:8]}"
    daemons: list[DaemonProcess] = []

    def make(mac, weights: bool | Path, *args: str) -> DaemonProcess:
        """weights: True for the model's directory, a Path for a copy of it, False for none."""
        model = str(weights if isinstance(weights, Path) else model_dir) if weights else model_dir.name
        daemon = DaemonProcess(mac.name, tmp_path / mac.name, [
            "--interface", "tb*", "--memory", "4GB", "--model", model, "--cluster", cluster, *args], mac=mac)
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


def manifest_of(state_dir: Path) -> Manifest:
    root = state_dir / "weights"
    digest = next(root.glob("*.manifest")).read_text().strip()
    return Manifest.from_bytes((root / digest[:2] / digest).read_bytes())


def test_a_mac_with_no_weights_fetches_its_layers_and_answers_as_mlx_lm(lab, macs, reference, model_dir):  # noqa: F811
    a, b = lab.add_mac("a"), lab.add_mac("b")
    lab.cable(a, b).shape("100mbit")  # the fetch takes a while: heartbeats share the cable
    # one copy of each layer is enough here: b keeps no copy of a's layers for the cluster
    holder, empty = start_all([macs(a, True, "--replicas", "1"), macs(b, False, "--replicas", "1")])
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
    stored = stored_objects(empty.state_dir)
    tensors = {d: n for d, n in stored.items() if d in {t.digest for t in manifest.tensors}}
    assert set(stored) - set(tensors) <= {f.digest for f in manifest.files} | {manifest.digest}
    assert set(tensors) == {t.digest for t in manifest.needed(stage["start"], stage["end"], 8)}
    assert abs(sum(tensors.values()) - stage["bytes"]) <= 0.01 * stage["bytes"]

    events = holder.status()["events"] + empty.status()["events"]
    assert not [e for e in events if e["kind"] == "suspect"]  # the saturated cable starved no heartbeat


@pytest.mark.slow  # minutes: left out of ./dev test --quick (tests/test_weights_memory.py serves from memory in every run)
def test_a_mac_whose_model_directory_vanished_serves_its_layers_from_memory(lab, macs, reference, tmp_path,  # noqa: F811
                                                                          model_dir):  # noqa: F811
    """A Mac serves alone; its model's weight files are deleted while it serves (a disk
    unmounted): its layers are on no disk now, only in its memory. A Mac with no weights
    joins, fetches its layers from that memory, and the two answer as mlx-lm does."""
    a, b = lab.add_mac("a"), lab.add_mac("b")
    cable = lab.cable(a, b)
    cable.unplug()  # until a's files are gone (b starts meanwhile)
    copy = shutil.copytree(model_dir, tmp_path / "copy" / model_dir.name)
    holder, empty = start_all([macs(a, copy, "--replicas", "1"), macs(b, False, "--replicas", "1")])
    serving([holder])
    wait_for(lambda: "hashed tiny" in holder.log(), 30, "a to hash its model")
    for file in copy.glob("*.safetensors"):
        file.unlink()
    checked = wait_for(lambda: re.search(r"checked (\d+) tensors .* fetch (\d+) of them from memory", holder.log()),
                       30, "a to see its files gone and check what it holds of them")
    assert int(checked[1]) == int(checked[2]) > 0
    cable.plug()
    view = serving([holder, empty], 60)
    assert {s["node"] for s in view["plan"]["stages"]} == {holder.node_id, empty.node_id}
    expected, _ = reference(PROMPT, 40)
    pieces: list[str] = []
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "stream": True, "temperature": 0}
    assert read_stream(empty, body, 60, pieces.append)[1] is None and "".join(pieces) == expected
    assert "fetched layers" in empty.log() and verified(empty.state_dir)
    assert not list(copy.glob("*.safetensors"))  # a's layers came from its memory, its new stage too


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_the_cluster_keeps_two_copies_of_each_layer_on_disk(lab, macs):
    a, b, c = (lab.add_mac(n) for n in "abc")
    for x, y in ((a, b), (b, c), (a, c)):
        lab.cable(x, y)
    daemons = start_all([macs(a, weights=True), macs(b, weights=False), macs(c, weights=False)])
    serving(daemons)
    # at least two: a Mac that served other layers first may keep them too, as its slack allows
    status = wait_for(lambda: len((s := daemons[1].status())["replicas"]) == 8 and min(s["replicas"]) >= 2 and s,
                      60, "two copies of every layer")
    for daemon in daemons[1:]:  # the copies are spread: neither Mac took the whole model
        disk = next(n["disk"] for n in status["nodes"] if n["id"] == daemon.node_id)
        assert disk["layers"] and disk["layers"] != [[0, 8]]


def view_manifest_digest(daemon: DaemonProcess) -> str:
    return next(n["disk"]["manifest"] for n in daemon.status()["nodes"] if n["id"] == daemon.node_id)


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_stage_killed_while_the_survivors_lack_its_layers_is_fetched_again(lab, macs, reference):  # noqa: F811
    a, b, c = (lab.add_mac(n) for n in "abc")
    for x, y in ((a, b), (b, c), (a, c)):
        lab.cable(x, y)
    # one copy of each layer: only a's disk (the original directory) holds what b and c lack
    daemons = start_all([macs(a, True, "--replicas", "1"), macs(b, False, "--replicas", "1"),
                         macs(c, False, "--replicas", "1")])
    view = serving(daemons)
    holder, ids = daemons[0], {d: d.node_id for d in daemons}
    victim, entry = daemons[1], daemons[2]
    gone = next(s for s in view["plan"]["stages"] if s["node"] == ids[victim])
    disks = {n["id"]: n["disk"] for n in view["nodes"]}
    assert not any(a <= gone["start"] < b for a, b in disks[ids[entry]]["layers"])  # entry lacks them
    expected, _ = reference(PROMPT, 300)
    stream = Stream(entry, PROMPT, 300, temperature=0, timeout=180)
    stream.wait_pieces(30)
    victim.kill()
    assert stream.result() == expected
    view = serving([holder, entry])
    assert ids[victim] not in {s["node"] for s in view["plan"]["stages"]}
    mine = next(s for s in view["plan"]["stages"] if s["node"] == ids[entry])
    disks = {n["id"]: n["disk"] for n in view["nodes"]}
    assert any(a <= mine["start"] and mine["end"] <= b for a, b in disks[ids[entry]]["layers"])
    assert "fetched layers" in entry.log()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
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


def verified(state_dir: Path) -> bool:
    """Every finished object in the store hashes to its name."""
    root = state_dir / "weights"
    return all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name
               for p in root.glob("??/*") if p.is_file() and "." not in p.name)


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_cable_pulled_mid_fetch_and_the_fetch_goes_on_from_another_peer(lab, macs, reference, tmp_path, model_dir):  # noqa: F811
    a, b, c = (lab.add_mac(n) for n in "abc")
    slow = lab.cable(a, b)
    lab.cable(c, b).shape("20mbit")
    lab.cable(a, c)
    slow.shape("20mbit")  # b's ~3 MB take a second or two over either
    copy = shutil.copytree(model_dir, tmp_path / "copy" / model_dir.name)
    holder, empty, other = start_all([macs(a, True, "--replicas", "1"), macs(b, False, "--replicas", "1"),
                                      macs(c, copy, "--replicas", "1")])
    wait_for(lambda: "fetching" in empty.log(), 60, "b to start fetching its layers")
    time.sleep(0.3)
    slow.unplug()  # mid-fetch: what came from a stays, the rest comes from c
    view = serving([holder, empty, other], 90)
    assert any(s["node"] == empty.node_id for s in view["plan"]["stages"])
    assert verified(empty.state_dir)
    expected, _ = reference(PROMPT, 40)
    pieces: list[str] = []
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "stream": True, "temperature": 0}
    assert read_stream(empty, body, 60, pieces.append)[1] is None and "".join(pieces) == expected


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_peer_serving_corrupt_bytes_is_caught_and_avoided(lab, macs, tmp_path, model_dir):  # noqa: F811
    from tbmesh.weights.modeldir import read_layout, weight_files

    a, b, c = (lab.add_mac(n) for n in "abc")
    for x, y in ((a, b), (b, c), (a, c)):
        lab.cable(x, y)
    copy = shutil.copytree(model_dir, tmp_path / "copy" / model_dir.name)
    bad = macs(a, copy, "--replicas", "1")
    bad.start()
    wait_for(lambda: "hashed tiny" in bad.log(), 30, "a to hash its model")
    # the disk rots after a hashed it: every tensor of layers 0-7 in a's copy gets flipped bytes
    for file in weight_files(copy):
        with open(file, "r+b") as f:
            for name, slot in read_layout(file).items():
                if ".layers." in name and slot.end - slot.start >= 64:
                    f.seek(slot.start + 16)
                    f.write(bytes(b ^ 0xFF for b in f.read(8))[:8])
    good = macs(c, True, "--replicas", "1").start()
    wait_for(lambda: "hashed tiny" in good.log(), 30, "c to hash its model")
    empty = macs(b, False, "--replicas", "1").start()
    serving([bad, empty, good], 90)
    assert re.search(r"FetchReport\(.*corrupt=[1-9]", empty.log())  # caught, and fetched again from c
    assert verified(empty.state_dir)  # nothing corrupt was kept


@pytest.mark.slow  # minutes: left out of ./dev test --quick (tests/test_disk.py makes the parts' union in every run)
def test_macs_that_each_pulled_part_of_the_model_serve_it_together(lab, tmp_path):
    """No Mac holds the whole model: each pulled some of its files (tbmesh model pull --layers);
    their parts make the manifest, and a third Mac with only the name joins them."""
    from serving import mlx_reference

    from tbmesh.testbed.tiny import make_tiny_model

    split = make_tiny_model(tmp_path / "split" / "tiny", layers=8, hidden=128, vocab=512, max_shard_bytes=400_000)
    files = sorted(p.name for p in split.glob("model-*.safetensors"))
    half = len(files) // 2
    parts = {"a": files[:half + 1], "b": files[half:]}
    a, b, c = (lab.add_mac(n) for n in "abc")
    for x, y in ((a, b), (b, c), (a, c)):
        lab.cable(x, y)
    cluster = f"p{uuid.uuid4().hex[:8]}"
    daemons = []
    for mac in (a, b, c):
        if mac.name in parts:
            model = tmp_path / mac.name / "model" / "tiny"
            model.mkdir(parents=True)
            for path in split.iterdir():
                if not path.name.startswith("model-") or path.name in parts[mac.name]:
                    shutil.copyfile(path, model / path.name)
        else:
            model = Path("tiny")
        daemons.append(DaemonProcess(mac.name, tmp_path / mac.name / "state", [
            "--interface", "tb*", "--memory", "4GB", "--model", str(model), "--cluster", cluster], mac=mac))
    try:
        start_all(daemons)
        view = serving(daemons, 90)
        assert {s["node"] for s in view["plan"]["stages"]} == {d.node_id for d in daemons}
        assert "from 2 Macs' parts" in daemons[0].log() + daemons[1].log()
        expected, _ = mlx_reference(split)(PROMPT, 40)
        pieces: list[str] = []
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "stream": True, "temperature": 0}
        assert read_stream(daemons[2], body, 60, pieces.append)[1] is None and "".join(pieces) == expected
    finally:
        for daemon in daemons:
            daemon.kill()
