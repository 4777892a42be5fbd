"""Weights on disk, in the deterministic simulator: the leader plans only when every layer
is on some member's disk, says which are missing, and a leader with no model of its own
plans from the one a member describes."""

import itertools

from tbmesh.core.cluster import CoreConfig
from tbmesh.core.messages import ENDS, FIRST, LAST, DiskState
from tbmesh.core.types import ModelSpec
from tbmesh.testbed.sim import GB, NetworkModel, Simulator

MODEL = ModelSpec("m", (1 * GB,) * 16, embed_bytes=GB // 2, head_bytes=GB // 2)
WHOLE = DiskState("m", "digest", MODEL, ((0, 16),), ends=ENDS, bytes=17 * GB)
NOTHING = DiskState("m", "digest")


def settled(sim: Simulator) -> bool:
    return sim.converged() and sim.plans_agree()


def cluster(disks: dict[str, DiskState], configs: dict[str, CoreConfig] | None = None) -> Simulator:
    sim = Simulator(seed=1, config=CoreConfig(model=MODEL), network=NetworkModel(load_delay=0.5))
    for node, disk in disks.items():
        sim.add_node(node, (configs or {}).get(node))
        sim.set_disk(node, disk)
    for a, b in itertools.combinations(disks, 2):
        sim.cable(a, b)
    assert sim.run_until_true(lambda: settled(sim), 10) is not None
    return sim


def test_a_mac_with_no_weights_is_planned_for_when_a_peer_holds_them():
    sim = cluster({"a": WHOLE, "b": NOTHING})
    plan = sim.nodes["a"].plan
    assert plan is not None and set(plan.nodes) == {"a", "b"}  # b fetches its layers from a


def test_layers_on_no_disk_are_named_and_nothing_serves():
    half = DiskState("m", "digest", MODEL, ((0, 8),), ends=ENDS)
    sim = cluster({"a": half, "b": NOTHING})
    leader = sim.nodes[sim.nodes["a"].leader]
    assert leader.plan is None
    assert "layers 8-15 of m: on no reachable Mac's disk" in leader.no_fit
    assert "embedding" not in leader.no_fit


def test_layers_scattered_over_disks_are_enough():
    sim = cluster({"a": DiskState("m", spec=MODEL, layers=((0, 5), (9, 16)), ends=(FIRST,)),
                   "b": DiskState("m", spec=MODEL, layers=((4, 10),), ends=(LAST,))})
    assert sim.nodes["a"].plan is not None and not sim.nodes["a"].no_fit


def test_the_model_serves_once_the_missing_layers_reach_a_disk():
    half = DiskState("m", "digest", MODEL, ((0, 8),), ends=ENDS)
    sim = cluster({"a": half, "b": NOTHING})
    assert sim.nodes["a"].plan is None
    sim.set_disk("b", DiskState("m", "digest", None, ((8, 16),)))  # e.g. pulled from the hub
    assert sim.run_until_true(lambda: sim.nodes["a"].plan is not None and settled(sim), 10) is not None
    assert not sim.nodes["a"].no_fit


def test_a_dead_mac_whose_layers_no_survivor_holds_stops_the_model():
    sim = cluster({"a": WHOLE, "b": NOTHING, "c": NOTHING})
    assert sim.nodes["b"].plan is not None
    sim.crash("a")
    assert sim.run_until_true(lambda: settled(sim) and sim.nodes["b"].plan is None, 10) is not None
    leader = sim.nodes[sim.nodes["b"].leader]
    assert "layers 0-15, the embedding, the head of m" in leader.no_fit


def test_a_leader_without_a_model_plans_from_a_members_description():
    name_only = CoreConfig(model_name="m")
    # "a" sorts first and so leads; it knows the model only by name, "b" describes it
    sim = cluster({"a": NOTHING, "b": WHOLE}, configs={"a": name_only})
    a = sim.nodes["a"]
    assert a.config.model is None and a.model == MODEL
    assert a.plan is not None and set(a.plan.nodes) == {"a", "b"}


def test_nodes_that_publish_no_disk_hold_the_whole_model():
    sim = Simulator(seed=1, config=CoreConfig(model=MODEL))
    for node in "ab":
        sim.add_node(node)
    sim.cable("a", "b")
    assert sim.run_until_true(lambda: settled(sim), 10) is not None
    assert sim.nodes["a"].plan is not None and sim.nodes["a"].disks() == {}


def test_disk_state_checks_whole_ranges():
    disk = DiskState("m", layers=((0, 4), (4, 8), (10, 12)))
    assert disk.has(0, 8) and disk.has(10, 12) and not disk.has(7, 11) and not disk.has(12, 13)


# ----- copies on disk (tbmesh.core.replicas) ---------------------------------------------

def test_the_missing_copies_are_spread_over_the_disks_with_room_in_runs():
    from tbmesh.core.replicas import copies, keep_on_disk
    from tbmesh.core.types import Stage

    room = 64 * GB
    disks = {"a": WHOLE, "b": DiskState("m", free=room), "c": DiskState("m", free=room // 2)}
    stages = [Stage("a", 0, 6, 0), Stage("b", 6, 11, 0), Stage("c", 11, 16, 0)]
    keep = {k.node: k for k in keep_on_disk(MODEL, disks, stages, replicas=2)}
    # a holds everything; b and c will hold their stages: so every layer outside a's own
    # stage has two copies already, and a's layers 0-5 and the embedding need one more (the
    # head has two: a's, and c's, the last stage's), shared by b and c in runs, about evenly
    assert keep["b"].layers == ((0, 4),) and keep["b"].ends == ()
    assert keep["c"].layers == ((4, 6),) and keep["c"].ends == (FIRST,)
    assert copies(MODEL, disks) == [1] * 16


def test_a_layer_no_disk_has_room_for_stays_short():
    from tbmesh.core.replicas import keep_on_disk
    from tbmesh.core.types import Stage

    disks = {"a": WHOLE, "b": DiskState("m", free=3 * GB)}  # room for 3 layers beyond its stage
    stages = [Stage("a", 0, 8, 0), Stage("b", 8, 16, 0)]
    (keep,) = keep_on_disk(MODEL, disks, stages, replicas=2)
    assert keep.node == "b" and keep.layers == ((0, 3),)  # layers 3-7 stay on a's disk alone


def test_three_copies_spread_over_the_disks_with_room():
    from tbmesh.core.replicas import keep_on_disk
    from tbmesh.core.types import Stage

    disks = {n: DiskState("m", free=64 * GB) for n in "bcd"} | {"a": WHOLE}
    stages = [Stage("a", 0, 4, 0), Stage("b", 4, 8, 0), Stage("c", 8, 12, 0), Stage("d", 12, 16, 0)]
    keep = keep_on_disk(MODEL, disks, stages, replicas=3)
    count = [1 + sum(s.start <= i < s.end for s in stages if s.node != "a")
             + sum(any(a <= i < b for a, b in k.layers) for k in keep) for i in range(16)]
    assert count == [3] * 16


def test_the_leader_publishes_what_each_member_keeps():
    sim = cluster({"a": WHOLE, "b": DiskState("m", free=64 * GB)})
    b = sim.nodes["b"]
    keep = b.my_keep()
    plan = sim.nodes["a"].plan
    a_stage = next(s for s in plan.stages if s.node == "a")
    assert keep is not None and keep.layers == ((a_stage.start, a_stage.end),)


# ----- layers held in memory only (a Mac whose model directory vanished while it served) -----

IN_MEMORY = DiskState("m", "digest", MODEL, memory=((0, 16),), memory_ends=ENDS, free=64 * GB)


def test_layers_a_mac_holds_in_memory_only_are_planned_for():
    sim = cluster({"a": IN_MEMORY, "b": NOTHING})
    leader = sim.nodes[sim.nodes["a"].leader]
    assert leader.plan is not None and set(leader.plan.nodes) == {"a", "b"} and not leader.no_fit
    half = DiskState("m", "digest", MODEL, memory=((0, 8),), memory_ends=(FIRST,))  # it held 0-7 only
    sim = cluster({"a": half, "b": NOTHING})
    leader = sim.nodes[sim.nodes["a"].leader]
    assert leader.plan is None and "layers 8-15, the head of m: on no reachable Mac's disk" in leader.no_fit


def test_memory_is_no_copy_on_disk():
    from tbmesh.core.replicas import copies, keep_on_disk
    from tbmesh.core.types import Stage

    disks = {"a": IN_MEMORY, "b": DiskState("m", free=64 * GB), "c": DiskState("m", free=64 * GB)}
    stages = [Stage("a", 0, 6, 0), Stage("b", 6, 11, 0), Stage("c", 11, 16, 0)]
    keep = {k.node: k for k in keep_on_disk(MODEL, disks, stages, replicas=2)}
    assert copies(MODEL, disks) == [0] * 16
    # a's stage is in its memory only, on no disk, and a cannot fetch it from itself: b and c
    # each keep a copy of it; the other layers get their second copy on the other's disk
    assert "a" not in keep
    on_disks = [sum(s.start <= i < s.end for s in stages[1:]) + sum(any(x <= i < y for x, y in k.layers)
                                                                    for k in keep.values()) for i in range(16)]
    assert on_disks == [2] * 16
    assert all(FIRST in k.ends for k in keep.values()) and sum(LAST in k.ends for k in keep.values()) == 1


# ----- a model directory deleted on one Mac, then a join (issue 20, item 9) -----------------

def test_a_deleted_model_directory_and_a_join_recover_once_a_copy_is_reachable():
    """a's model directory is deleted while it serves: it holds its stage in memory and can
    load nothing new. c joins: the new plan gives a layers it cannot load, so the leader plans
    without it (and must not stop leading: a load that fails while the running plan's stage
    still serves once made it crash on every update). Once c has gone, the cluster serves
    again from the Macs that hold a copy."""
    sim = cluster({"a": WHOLE, "b": WHOLE})
    plan = sim.nodes["a"].plan
    assert set(plan.nodes) == {"a", "b"}
    held = plan.stage_of("a")
    sim.unloadable.add("a")  # its directory is gone: every new load fails
    sim.set_disk("a", DiskState("m", "digest", MODEL, memory=((held.start, held.end),)))
    sim.add_node("c")
    sim.set_disk("c", NOTHING)
    for peer in "ab":
        sim.cable("c", peer)

    def serving(nodes: set[str]) -> bool:  # one committed plan of `nodes`, each serving its stage
        plan = sim.nodes["b"].plan
        return sim.converged() and plan is not None and set(plan.nodes) == nodes and all(
            sim.nodes[n].plan == plan and sim.nodes[n].preparing is None for n in sim.nodes) and all(
            sim.nodes[n].shard is not None and sim.nodes[n].shard.serving == plan.epoch for n in nodes)

    assert sim.run_until_true(lambda: serving({"b", "c"}), 30) is not None
    sim.crash("c")
    assert sim.run_until_true(lambda: serving({"b"}) or serving({"a", "b"}), 30) is not None
    assert not sim.nodes["b"].no_fit


def test_layers_lost_with_a_deleted_directory_serve_again_once_a_mac_with_a_copy_joins():
    """As above, but a's disk held the only copy of its layers: without a, they are on no
    reachable disk, and the leader says so; a Mac holding the model joins and it serves."""
    sim = cluster({"a": WHOLE, "b": NOTHING})
    held = sim.nodes["a"].plan.stage_of("a")
    sim.unloadable.add("a")
    sim.set_disk("a", DiskState("m", "digest", MODEL, memory=((held.start, held.end),)))
    sim.add_node("c")
    sim.set_disk("c", NOTHING)
    for peer in "ab":
        sim.cable("c", peer)
    assert sim.run_until_true(lambda: "on no reachable Mac's disk" in (sim.nodes["b"].no_fit or ""), 30) is not None
    sim.crash("c")
    sim.run_for(10)
    sim.add_node("d")
    sim.set_disk("d", WHOLE)
    for peer in "ab":
        sim.cable("d", peer)

    def serving() -> bool:
        plan = sim.nodes["b"].plan
        return sim.converged() and plan is not None and "d" in plan.nodes and all(
            sim.nodes[n].plan == plan and sim.nodes[n].preparing is None for n in sim.nodes) and all(
            sim.nodes[n].shard is not None and sim.nodes[n].shard.serving == plan.epoch for n in plan.nodes)

    assert sim.run_until_true(serving, 30) is not None


# ----- two models under one name (issue 20, item 6) --------------------------------------------

OTHER = DiskState("m", "other", MODEL, ((0, 16),), ends=ENDS, bytes=17 * GB)  # same name and shape, other weights


def two_models(disks: dict[str, DiskState]) -> Simulator:
    sim = Simulator(seed=1, config=CoreConfig(model=MODEL), network=NetworkModel(load_delay=0.5))
    for node, disk in disks.items():
        sim.add_node(node)
        sim.set_disk(node, disk)
    for a, b in itertools.combinations(disks, 2):
        sim.cable(a, b)
    return sim


def committed(sim: Simulator, nodes: set[str]) -> bool:
    """Every node runs one committed plan of exactly `nodes`, each serving its stage."""
    plan = next(iter(sim.nodes.values())).plan
    return sim.converged() and plan is not None and set(plan.nodes) == nodes and plan.considered == nodes and all(
        sim.nodes[n].plan == plan and sim.nodes[n].preparing is None for n in sim.nodes) and all(
        sim.nodes[n].shard is not None and sim.nodes[n].shard.serving == plan.epoch for n in nodes)


def test_a_mac_holding_another_model_under_the_name_is_planned_without_and_told_why():
    sim = two_models({"a": WHOLE, "b": OTHER, "c": NOTHING})  # "a" sorts first and so leads
    assert sim.run_until_true(lambda: committed(sim, {"a", "c"}), 10) is not None
    assert sim.nodes["a"].plan.manifest == "digest"
    why = "b holds another model under the name m: manifest other… vs digest…, the cluster's"
    assert all(sim.nodes[n].other_models() == {"b": why} for n in "abc")  # every node's status says so
    events = [e for n, e in sim.stats.events if n == "a" and e.kind == "other-model"]
    assert [(e.node, e.detail) for e in events] == [("b", why + ": left out of the plan")]
    assert all(k.node != "b" for k in sim.nodes["a"].keep)  # nor asked to keep copies of ours


def test_another_models_layers_do_not_make_the_model_whole():
    half = DiskState("m", "digest", MODEL, ((0, 8),), ends=ENDS)
    sim = two_models({"a": half, "b": OTHER})
    assert sim.run_until_true(lambda: bool(sim.nodes["a"].no_fit), 10) is not None
    sim.run_for(2)
    no_fit = sim.nodes["a"].no_fit
    assert sim.nodes["a"].plan is None and "layers 8-15 of m: on no reachable Mac's disk" in no_fit
    assert no_fit.startswith("b holds another model under the name m")


def test_a_new_leader_holding_another_model_keeps_the_running_one():
    sim = two_models({"a": WHOLE, "b": OTHER, "c": WHOLE})
    assert sim.run_until_true(lambda: committed(sim, {"a", "c"}), 10) is not None
    sim.crash("a")  # b sorts first of the two left, and leads now
    assert sim.run_until_true(lambda: committed(sim, {"c"}) and sim.nodes["b"].is_leader, 20) is not None
    assert sim.nodes["b"].plan.manifest == "digest" and set(sim.nodes["b"].other_models()) == {"b"}


def test_two_macs_that_served_alone_with_two_models_under_one_name_agree_on_the_leaders():
    sim = two_models({"a": WHOLE, "b": OTHER})  # no cable yet: each plans its own model alone
    sim.unplug("a", "b")
    assert sim.run_until_true(lambda: all(sim.nodes[n].plan is not None for n in "ab"), 10) is not None
    assert sim.nodes["a"].plan.key == sim.nodes["b"].plan.key  # each its first plan
    sim.cable("a", "b")
    # a leads: b runs a's plan, newer than its own, though made for the same group
    assert sim.run_until_true(lambda: committed(sim, {"a"}), 10) is not None
    assert sim.nodes["b"].plan.manifest == "digest" and set(sim.nodes["b"].other_models()) == {"b"}
