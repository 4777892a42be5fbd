"""Hot re-assignment through real daemons on loopback: Macs die, leave and join while a
long answer streams, and the answer is still mlx-lm's, token for token.

The answers are long (hundreds of tokens at ~50 tokens/s with three daemons sharing two
cores) so that the faults land mid-generation; the prompt is one whose greedy continuation
in the tiny model has no end-of-sequence token for 1500 tokens.
"""

from __future__ import annotations

import json
import shutil
import signal
import uuid
from pathlib import Path

import pytest
from daemons import DaemonProcess, start_all, wait_for
from serving import Stream, post, serving

PROMPT = "Thunderbolt cables link the Macs"


def by_id(daemons: list[DaemonProcess]) -> dict[str, DaemonProcess]:
    return {d.node_id: d for d in daemons}


def events(daemon: DaemonProcess, kind: str) -> list[dict]:
    return [e for e in daemon.status()["events"] if e["kind"] == kind]


def new_plan_without(daemons: list[DaemonProcess], gone: str, stages: int) -> dict:
    def ready():
        view = daemons[0].status()
        plan = view["plan"]
        return view if plan and gone not in {s["node"] for s in plan["stages"]} \
            and len(plan["stages"]) == stages else None
    return wait_for(ready, 30, f"a plan of {stages} stages without the dead node")


@pytest.mark.slow  # test_chaos.py kills stages and leaders mid-answer in every run
@pytest.mark.parametrize("victim", ["middle", "leader"])
def test_a_stage_killed_mid_generation_and_the_answer_goes_on(cluster, reference, victim):
    daemons = cluster(3)
    view = serving(daemons, 3)
    nodes = by_id(daemons)
    stages = [s["node"] for s in view["plan"]["stages"]]
    dead = nodes[stages[1] if victim == "middle" else view["leader"]]
    entry = next(d for d in daemons if d is not dead)
    expected, count = reference(PROMPT, 300)
    assert count == 300
    stream = Stream(entry, PROMPT, 300, temperature=0)
    stream.wait_pieces(40)
    dead_id = dead.node_id
    dead.kill()  # kill -9
    assert stream.result() == expected
    assert len(stream.pieces) > 40 and events(entry, "resumed"), "the request was not resumed"
    new_plan_without([d for d in daemons if d is not dead], dead_id, 2)


@pytest.mark.slow  # CI's time budget: test_chaos.py kills stages mid-answer in every run, test_tensor_serving a group member
def test_a_stage_killed_mid_batch_and_every_answer_of_the_batch_goes_on(cluster, reference):
    daemons = cluster(3)
    view = serving(daemons, 3)
    dead = by_id(daemons)[view["plan"]["stages"][1]["node"]]
    entries = [d for d in daemons if d is not dead]
    prompts = [f"{PROMPT} {word}" for word in ("now", "then", "again", "here", "there", "twice", "once", "so")]
    streams = [Stream(entries[i % 2], prompt, 150 + 10 * i, temperature=0) for i, prompt in enumerate(prompts)]
    for stream in streams:
        stream.wait_pieces(10)
    dead_id = dead.node_id
    dead.kill()  # kill -9, with all eight in its caches
    for i, stream in enumerate(streams):
        assert stream.result() == reference(prompts[i], 150 + 10 * i)[0], i
    new_plan_without(entries, dead_id, 2)
    assert sum(len(events(d, "resumed")) for d in entries) >= 6  # those still going went on elsewhere


@pytest.mark.slow  # test_chaos.py's restarted nodes join mid-answer in every run
def test_a_node_that_joins_mid_generation_is_given_layers_and_nothing_unchanged_is_read_again(
        cluster, reference, tmp_path, model_dir):
    daemons = cluster(3)
    view = serving(daemons, 3)
    before = {d.node_id: d.status() for d in daemons}
    old_ranges = {s["node"]: set(range(s["start"], s["end"])) for s in view["plan"]["stages"]}
    expected, count = reference(PROMPT, 500)
    stream = Stream(daemons[0], PROMPT, 500, temperature=0)
    stream.wait_pieces(20)
    joiner = cluster.join("n3")
    daemons.append(joiner)
    view4 = serving(daemons, 4)
    assert len(stream.pieces) < count, "the join did not land mid-generation"
    assert stream.result() == expected
    # the commit moved layers, but the answer finished on the route it started on: no pause
    assert not events(daemons[0], "resumed")
    new_ranges = {s["node"]: set(range(s["start"], s["end"])) for s in view4["plan"]["stages"]}
    assert any(new_ranges[n] & old and new_ranges[n] != old for n, old in old_ranges.items())
    for node, old in old_ranges.items():
        runtime, was = by_id(daemons)[node].status()["runtime"], before[node]["runtime"]
        # only the layers new to a node were read from disk; the ones it kept were not
        assert runtime["layers_read"] - was["layers_read"] == len(new_ranges[node] - old)
        if new_ranges[node] == old:  # same layers: no load at all
            assert runtime["loads"] == was["loads"]
        else:
            assert runtime["layers_kept"] - was["layers_kept"] == len(new_ranges[node] & old)
    for node, new in new_ranges.items():  # once the answer is done, the moved layers go
        wait_for(lambda: by_id(daemons)[node].status()["runtime"]["held"] == [[min(new), max(new) + 1]],
                 10, "only the new stage held")
    leader = by_id(daemons)[view4["leader"]]
    assert events(leader, "prepare") and events(leader, "plan")


def member(tmp_path: Path, model_dir: Path, cluster: str, node: str, memory: str,
           *more: str) -> DaemonProcess:
    """A daemon on loopback with `memory` usable, serving `model_dir` in `cluster`."""
    return DaemonProcess(node, tmp_path / node, ["--interface", "lo", "--memory", memory, "--model",
                                                 str(model_dir), "--cluster", cluster, "--no-probe", *more])


@pytest.fixture
def pair_that_needs_both(tmp_path, model_dir):
    """Two daemons, each with room for a bit more than half the model; a third can be added."""
    from tbmesh.core.planner import plan_layers
    from tbmesh.core.types import NodeInfo
    from tbmesh.weights.modeldir import describe_model_dir

    spec = describe_model_dir(model_dir)

    def fits_alone(memory: int) -> bool:
        return plan_layers(spec, [NodeInfo("a", "a", "", memory, memory, 1e12)], [],
                           context=4096).fits

    low, high = 1, 10 * spec.weight_bytes + 10**8  # the least memory that holds it alone
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits_alone(mid) else (mid + 1, high)
    memory = str(int(low * 0.62))  # half of it and a margin: two are needed, two suffice
    name = f"f{uuid.uuid4().hex[:8]}"
    started: list[DaemonProcess] = []

    def make(i: int, resume_wait: float) -> DaemonProcess:
        daemon = member(tmp_path, model_dir, name, f"n{i}", memory, "--resume-wait", str(resume_wait))
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.kill()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_leave_that_makes_the_model_not_fit_ends_the_request_with_why_after_the_wait(
        pair_that_needs_both, reference):
    daemons = start_all([pair_that_needs_both(i, resume_wait=3) for i in range(2)])
    serving(daemons, 2)
    stream = Stream(daemons[0], PROMPT, 400, temperature=0)
    stream.wait_pieces(20)
    daemons[1].kill()
    stream.join(60)
    assert not stream.is_alive()
    assert stream.error is not None and "does not fit" in stream.error["message"], stream.error
    expected, _ = reference(PROMPT, 400)
    assert expected.startswith(stream.text)  # what it did stream was right
    assert daemons[0].alive()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_join_within_the_wait_lets_the_request_complete(pair_that_needs_both, reference):
    daemons = start_all([pair_that_needs_both(i, resume_wait=60) for i in range(2)])
    serving(daemons, 2)
    expected, _ = reference(PROMPT, 400)
    stream = Stream(daemons[0], PROMPT, 400, temperature=0)
    stream.wait_pieces(20)
    daemons[1].kill()
    wait_for(lambda: daemons[0].status()["no_fit"], 20, "the planner's verdict")
    start_all([pair_that_needs_both(2, resume_wait=60)])
    assert stream.result(120) == expected


@pytest.mark.slow  # test_chaos.py SIGSTOPs a node mid-answer in every run
def test_a_mac_that_sleeps_and_wakes_rejoins_as_itself_and_is_given_layers_again(cluster, reference):
    daemons = cluster(3)
    serving(daemons, 3)
    sleeper = daemons[2]
    sleeper_id, incarnation = sleeper.node_id, sleeper.status()["node"]["incarnation"]
    expected, _ = reference(PROMPT, 400)
    stream = Stream(daemons[0], PROMPT, 400, temperature=0)
    stream.wait_pieces(20)
    sleeper.proc.send_signal(signal.SIGSTOP)  # the lid closes: no crash, no goodbye, just silence
    try:
        new_plan_without(daemons[:2], sleeper_id, 2)
    finally:
        sleeper.proc.send_signal(signal.SIGCONT)
    back = serving(daemons, 3)  # it rejoins and the next plan gives it layers again
    assert sleeper_id in {s["node"] for s in back["plan"]["stages"]}
    assert sleeper.status()["node"]["incarnation"] == incarnation  # not a restart
    assert next(n for n in back["nodes"] if n["id"] == sleeper_id)["state"] == "alive"
    assert stream.result() == expected


def damage(model: Path, into: Path) -> Path:
    """A copy of `model` whose MLP weights have their shapes transposed: the same bytes, so
    the daemon starts with it, but no layer of it can be loaded (and its manifest is not the
    model's: the leader leaves it out as another model under the same name)."""
    copy = into / model.name
    shutil.copytree(model, copy)
    for file in copy.glob("*.safetensors"):
        data = bytearray(file.read_bytes())
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        for name, entry in header.items():
            if name.endswith("mlp.gate_proj.weight"):
                entry["shape"] = entry["shape"][::-1]
        encoded = json.dumps(header, separators=(",", ":")).encode().ljust(size)
        assert len(encoded) == size
        file.write_bytes(bytes(data[:8]) + encoded + bytes(data[8 + size:]))
    return copy


def test_a_mac_that_cannot_load_its_layers_is_planned_around(tmp_path, model_dir, reference):
    name = f"d{uuid.uuid4().hex[:8]}"
    damaged = damage(model_dir, tmp_path / "damaged")
    good = member(tmp_path, model_dir, name, "good", "4GB")
    bad = member(tmp_path, damaged, name, "bad", "4GB")
    try:
        start_all([good, bad])
        bad_id = bad.node_id

        def failures() -> list[dict]:  # a load that failed, or (seen first) a manifest not the model's
            return [e for d in (good, bad) for e in d.status()["events"] if e["kind"] in ("load-failed", "other-model")]

        def planned_around() -> dict | None:
            # after the failure: before it, a plan of `good` alone was only the one made
            # before `bad` joined
            view = good.status()
            plan = view["plan"]
            alive = {n["id"] for n in view["nodes"] if n["state"] == "alive"}
            return view if failures() and plan and bad_id in alive and [s["node"] for s in plan["stages"]] \
                == [good.node_id] and view["preparing"] is None else None

        wait_for(planned_around, 30, "a plan without the Mac that cannot load")
        assert any(w in failures()[0]["detail"] for w in ("could not load layers", "left out of the plan"))
        assert bad.alive() and good.alive()
        status, body = post(good, "/v1/completions", {"model": "tiny", "prompt": PROMPT,
                                                      "max_tokens": 24, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == reference(PROMPT, 24)[0]
    finally:
        good.kill()
        bad.kill()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_the_leader_dying_disturbs_nothing_when_it_holds_no_layers(tmp_path, model_dir, reference):
    from tbmesh.node.measure import machine_identity
    from tbmesh.node.state import Identity, save_identity

    name = f"l{uuid.uuid4().hex[:8]}"

    def daemon(node: str, memory: str) -> DaemonProcess:
        return member(tmp_path, model_dir, name, node, memory)

    # the smallest id, started first: it leads; with 1 MB it is given no layers
    boss = daemon("boss", "1MB")
    (tmp_path / "boss").mkdir()
    save_identity(tmp_path / "boss", Identity("0" * 16, machine_identity(), 0))
    workers = [daemon("a", "4GB"), daemon("b", "4GB")]
    try:
        boss.start()
        wait_for(lambda: boss.status()["leader"] == "0" * 16, 10, "boss leading itself")
        for worker in workers:  # one at a time: two newcomers that met before finding the boss
            worker.start()      # would elect one of them (two followers beat one)
            wait_for(lambda: worker.status()["leader"] == "0" * 16, 20, "following the boss")
        everyone = workers + [boss]
        view = serving(everyone, 2)
        assert view["leader"] == "0" * 16 and view["plan"]["left_out"] == ["0" * 16]
        before = {d.node_id: d.status()["runtime"] for d in workers}
        expected, _ = reference(PROMPT, 300)
        stream = Stream(workers[0], PROMPT, 300, temperature=0)
        stream.wait_pieces(30)
        boss.kill()  # kill -9 the leader
        after = wait_for(lambda: (v := workers[0].status())["leader"] in before
                         and set(v["plan"]["left_out"]) == set() and v or None, 20, "a new leader")
        assert [s["node"] for s in after["plan"]["stages"]] == [s["node"] for s in view["plan"]["stages"]]
        assert stream.result() == expected
        assert not events(workers[0], "resumed")  # the answer never stopped
        for d in workers:  # and no layer was loaded again because the leader changed
            runtime = d.status()["runtime"]
            assert (runtime["loads"], runtime["layers_read"]) == \
                (before[d.node_id]["loads"], before[d.node_id]["layers_read"])
    finally:
        for d in [boss, *workers]:
            d.kill()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_the_stages_free_the_caches_of_an_entry_that_died_mid_answer(tmp_path, model_dir):
    name = f"e{uuid.uuid4().hex[:8]}"
    entry = member(tmp_path, model_dir, name, "entry", "1MB")  # given no layers: only an entry
    stages = [member(tmp_path, model_dir, name, node, "4GB") for node in ("a", "b")]
    try:
        start_all([entry, *stages])
        serving([entry, *stages], 2)
        view = wait_for(lambda: (v := entry.status())["plan"]["left_out"] == [entry.node_id] and v, 20,
                        "a plan that considered the entry and gave it no layers")
        stream = Stream(entry, PROMPT, 2000, temperature=0)
        stream.wait_pieces(5)
        wait_for(lambda: all(d.status()["runtime"]["stage_requests"] == 1 for d in stages), 10,
                 "both stages holding the request's cache")
        entry.kill()  # kill -9: no Cancel will ever come from it
        wait_for(lambda: all(d.status()["runtime"]["stage_requests"] == 0 for d in stages), 15,
                 "the caches of the dead entry's request freed")
        for d in stages:  # and nothing else changed: the same layers, still loaded
            assert d.status()["runtime"]["held"] == [[s["start"], s["end"]] for s in view["plan"]["stages"]
                                                      if s["node"] == d.node_id]
    finally:
        for d in [entry, *stages]:
            d.kill()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_mac_without_room_for_its_old_and_new_layers_lets_the_old_go_before_loading(
        tmp_path, model_dir, reference):
    from tbmesh.core.assignment import kv_room, union_bytes
    from tbmesh.core.types import Stage
    from tbmesh.weights.modeldir import describe_model_dir

    # 8 layers of 0.79 MB weights + 2.1 MB of KV room each (4096 tokens): three Macs of 12.2 MB
    # hold 3/3/2 layers, two of them 4/4 (11.8 MB); the one that moves to the front would need
    # its old and new layers together (>= 12.6 MB) while it loads
    memory, spec = 12_200_000, describe_model_dir(model_dir)
    name = f"t{uuid.uuid4().hex[:8]}"
    daemons = [member(tmp_path, model_dir, name, node, "12.2MB") for node in ("a", "b", "c")]
    try:
        start_all(daemons)
        view = serving(daemons, 3)
        old = {s["node"]: s for s in view["plan"]["stages"]}
        ids = by_id(daemons)
        first, *survivors = [s["node"] for s in view["plan"]["stages"]]
        before = {n: ids[n].status()["runtime"] for n in survivors}
        stream = Stream(ids[survivors[-1]], PROMPT, 120, temperature=0)
        stream.wait_pieces(10)
        ids[first].kill()
        after = new_plan_without([ids[n] for n in survivors], first, 2)
        new = {s["node"]: s for s in after["plan"]["stages"]}

        def stage(s: dict) -> Stage:
            return Stage(s["node"], s["start"], s["end"], s["bytes"])

        tight = {n for n in survivors
                 if union_bytes(spec, stage(old[n]), stage(new[n])) + kv_room(spec, stage(new[n]), 4096) > memory}
        assert tight and tight != set(survivors)  # the scenario has both kinds
        assert stream.result() == reference(PROMPT, 120)[0]
        for n in survivors:
            runtime = ids[n].status()["runtime"]
            gained = set(range(new[n]["start"], new[n]["end"])) - set(range(old[n]["start"], old[n]["end"]))
            assert runtime["tight_loads"] - before[n]["tight_loads"] == (n in tight)
            # letting the old stage go first costs no re-read of the layers it keeps
            assert runtime["layers_read"] - before[n]["layers_read"] == len(gained)
            assert runtime["held"] == [[new[n]["start"], new[n]["end"]]]
            if n in tight:  # it never held both stages' layers
                assert runtime["peak_weight_bytes"] < union_bytes(spec, stage(old[n]), stage(new[n]))
    finally:
        for d in daemons:
            d.kill()
