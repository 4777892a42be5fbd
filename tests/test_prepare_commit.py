"""Prepare -> ready -> commit -> drop, in the deterministic simulator.

The simulator's runtime follows `Assignment` as the daemon's pipeline does (it loads the
stage each plan gives it after `load_delay` and publishes what it holds), so these are the
leader's rules with every node's loading in the loop.
"""

import itertools
from dataclasses import replace

from tbmesh.core.assignment import union_bytes
from tbmesh.core.cluster import CoreConfig
from tbmesh.core.membership import Timing
from tbmesh.core.messages import ShardState
from tbmesh.core.types import ModelSpec
from tbmesh.testbed.sim import GB, NetworkModel, Simulator, make_info

MODEL = ModelSpec("m", (1 * GB,) * 16, embed_bytes=GB // 2, head_bytes=GB // 2)
CONFIG = CoreConfig(model=MODEL)
LOAD = 2.0  # seconds a shard takes to load: long enough to watch the old plan serve


def settled(sim: Simulator) -> bool:
    return sim.converged() and sim.plans_agree()


def cluster(ids, load_delay: float = LOAD, seed: int = 1, infos=None) -> Simulator:
    sim = Simulator(seed=seed, config=CONFIG, network=NetworkModel(load_delay=load_delay))
    for node in ids:
        sim.add_node((infos or {}).get(node, node))
    for a, b in itertools.combinations(ids, 2):
        sim.cable(a, b)
    assert sim.run_until_true(lambda: settled(sim), 4 * load_delay + 5) is not None
    return sim


def kinds(sim: Simulator, node: str) -> list[str]:
    return [e.kind for n, e in sim.stats.events if n == node]


def test_the_old_plan_serves_until_every_node_of_the_new_one_has_loaded():
    sim = cluster(["a", "b", "c"])
    old = sim.nodes["a"].plan
    sim.add_node("d")
    for peer in "abc":
        sim.cable("d", peer)
    sim.run_until_true(lambda: sim.nodes["a"].preparing is not None, 3)
    preparing = sim.nodes["a"].preparing
    assert "d" in preparing.nodes and preparing.key > old.key
    sim.run_for(LOAD / 2)  # d (and whoever gained layers) is still loading
    assert all(sim.nodes[n].plan == old for n in "abcd")
    for n in "abc":  # each still serves its old stage, while it loads its new one
        assert sim.nodes[n].shard.serving == old.epoch
    assert sim.run_until_true(lambda: settled(sim), LOAD + 2) is not None
    new = sim.nodes["a"].plan
    assert new == preparing and all(sim.nodes[n].plan == new for n in "abcd")
    assert all(sim.nodes[n].shard.serving == new.epoch for n in "abcd")
    # drop: each node holds exactly its new stage
    assert all(sim.held[s.node] == {(s.start, s.end)} for s in new.stages)


def test_a_node_whose_layers_did_not_change_loads_nothing():
    infos = {"a": make_info("a", 64 * GB), "b": make_info("b", 64 * GB),
             "tiny": make_info("tiny", 1 * GB // 10)}  # too small to be given layers
    sim = cluster(["a", "b", "tiny"], infos=infos)
    plan = sim.nodes["a"].plan
    assert "tiny" in plan.left_out
    loads = {n: list(sim.loads.get(n, [])) for n in "ab"}
    sim.crash("tiny")
    assert sim.run_until_true(lambda: settled(sim) and sim.nodes["a"].plan.considered == {"a", "b"},
                              5) is not None
    after = sim.nodes["a"].plan
    assert after.stages == plan.stages and after.key > plan.key
    assert {n: sim.loads.get(n, []) for n in "ab"} == loads  # nothing loaded again


def test_a_leader_change_reloads_nothing():
    infos = {"a": make_info("a", 1 * GB // 10), "b": make_info("b", 64 * GB),
             "c": make_info("c", 64 * GB)}
    sim = cluster(["a", "b", "c"], infos=infos)
    assert sim.nodes["b"].leader == "a" and "a" in sim.nodes["b"].plan.left_out
    loads = {n: list(sim.loads.get(n, [])) for n in "bc"}
    sim.crash("a")
    assert sim.run_until_true(lambda: settled(sim) and sim.nodes["b"].plan.considered == {"b", "c"},
                              5) is not None
    assert sim.nodes["b"].leader in {"b", "c"}
    assert {n: sim.loads.get(n, []) for n in "bc"} == loads


def test_a_join_while_preparing_waits_for_the_commit_and_then_gets_layers():
    sim = cluster(["a", "b"])
    sim.add_node("c")
    sim.cable("a", "c")
    sim.cable("b", "c")
    sim.run_until_true(lambda: sim.nodes["a"].preparing is not None, 3)
    first = sim.nodes["a"].preparing
    sim.add_node("d")
    sim.cable("a", "d")
    sim.cable("b", "d")
    sim.run_for(1.0)
    assert sim.nodes["a"].preparing == first  # not restarted by the join
    assert sim.run_until_true(lambda: settled(sim) and "d" in sim.nodes["a"].plan.nodes,
                              3 * LOAD + 5) is not None
    committed = [e.data["epoch"] for n, e in sim.stats.events if n == "a" and e.kind == "plan"]
    assert first.epoch in committed  # the first one was committed, not thrown away


def join_d_and_catch_it_preparing(sim: Simulator):
    sim.add_node("d")
    for peer in "abc":
        sim.cable("d", peer)
    sim.run_until_true(lambda: sim.nodes["a"].preparing is not None, 3)
    return sim.nodes["a"].preparing


def test_the_joiner_dying_while_it_loads_leaves_the_running_plan_as_it_was():
    sim = cluster(["a", "b", "c"])
    running = sim.nodes["a"].plan
    loads = {n: list(sim.loads.get(n, [])) for n in "abc"}
    join_d_and_catch_it_preparing(sim)
    sim.crash("d")
    assert sim.run_until_true(lambda: settled(sim), 3 * LOAD + 5) is not None
    assert sim.nodes["a"].plan == running  # made for exactly this group: adopted again
    assert "abandoned" in kinds(sim, "a")
    # whatever they started loading for the abandoned plan, they serve the old stages
    assert all(sim.held[s.node] == {(s.start, s.end)} for s in running.stages)
    assert all(sim.loads.get(n, [])[: len(loads[n])] == loads[n] for n in "abc")


def test_a_node_of_the_preparing_plan_dying_makes_a_new_plan_without_it():
    sim = cluster(["a", "b", "c"])
    preparing = join_d_and_catch_it_preparing(sim)
    sim.crash("b")
    assert sim.run_until_true(lambda: settled(sim), 3 * LOAD + 5) is not None
    plan = sim.nodes["a"].plan
    assert plan.considered == {"a", "c", "d"} and plan.key > preparing.key
    assert "abandoned" in kinds(sim, "a")


def test_a_flapping_cable_settles_on_one_plan_without_a_storm():
    sim = cluster(["a", "b", "c"], load_delay=0.3)
    for _ in range(5):  # five flaps in ten seconds
        sim.unplug("b", "c")
        sim.unplug("a", "c")
        sim.run_for(1.0)
        sim.cable("b", "c")
        sim.cable("a", "c")
        sim.run_for(1.0)
    assert sim.run_until_true(lambda: settled(sim) and sim.nodes["a"].plan.considered == {"a", "b", "c"},
                              10) is not None
    leader = sim.nodes["a"].leader
    prepared = kinds(sim, leader).count("prepare")
    assert prepared <= 12  # at most about one per membership change, not one per message


def test_a_preparing_plan_from_an_older_term_is_refused():
    sim = cluster(["a", "b"])
    node = sim.nodes["b"]
    running = node.plan
    assert running is not None
    stale = type(running)(running.term - 1, running.epoch + 5, running.model, running.stages)
    leader = sim.nodes[node.leader]
    leader.preparing = stale  # as if a deposed leader's plan were still around
    sim.run_for(0.5)
    assert node.plan == running
    assert node.preparing is None or node.preparing.key > running.key


def test_ready_means_loaded_for_that_epoch():
    state = ShardState("m", 0, 4, 7, 0.5, serving=6)
    assert not state.ready and ShardState("m", 0, 4, 7, 1.0).ready


def test_nodes_that_miss_the_commit_catch_up_from_the_leader():
    sim = Simulator(seed=3, config=CONFIG, network=NetworkModel(load_delay=0.5, drop=0.3))
    for node in "abcd":
        sim.add_node(node)
    for x, y in itertools.combinations("abcd", 2):
        sim.cable(x, y)
    # with three messages in ten lost, link-state anti-entropy still brings every node the
    # committed plan, and no node runs an older one
    assert sim.run_until_true(lambda: settled(sim), 30) is not None
    plan = sim.nodes["a"].plan
    assert plan.considered == set("abcd") and sim.stats.dropped > 0
    assert all(sim.nodes[n].shard.serving == plan.epoch for n in "abcd")


def test_a_large_change_of_a_nodes_usable_memory_plans_again_and_a_small_one_does_not():
    from dataclasses import replace

    sim = cluster(["a", "b", "c"], load_delay=0.2)
    before = sim.nodes["a"].plan
    node = sim.nodes["b"]
    sim._carry_out("b", node.update_info(replace(node.info, memory_usable=int(node.info.memory_usable * 0.95)),
                                         sim.now))
    sim.run_for(2.0)
    assert sim.nodes["a"].plan == before  # 5 %: noise, not a reason to move layers
    sim._carry_out("b", node.update_info(replace(node.info, memory_usable=node.info.memory_usable // 3),
                                         sim.now))
    assert sim.run_until_true(lambda: settled(sim) and sim.nodes["a"].plan.key > before.key, 5) is not None
    after = sim.nodes["a"].plan
    size = {s.node: s.end - s.start for s in after.stages}
    old = {s.node: s.end - s.start for s in before.stages}
    assert size["b"] < old["b"]  # b, with a third of its memory, holds fewer layers


def test_a_node_that_cannot_hold_its_old_and_new_stage_together_lets_the_old_one_go_first():
    # 17 GB of model on three 10 GB Macs. The first stage dies: the middle one moves to the
    # front, and its old and new layers together would pass its 10 GB: it must not hold both
    # while it loads (the last stage only grows, and keeps what it has).
    infos = {n: make_info(n, 10 * GB) for n in "abc"}
    sim = cluster(["a", "b", "c"], infos=infos)
    old = sim.nodes["a"].plan
    first = old.stages[0].node
    sim.crash(first)
    alive = [n for n in "abc" if n != first]
    sim.run_until_true(lambda: (p := sim.nodes[alive[0]].preparing) is not None and first not in p.nodes, 5)
    preparing = sim.nodes[alive[0]].preparing
    tight = {n for n in alive
             if union_bytes(MODEL, old.stage_of(n), preparing.stage_of(n)) > infos[n].memory_usable}
    assert tight and tight != set(alive)  # the scenario has both kinds
    sim.run_for(LOAD / 2)  # loading
    for n in alive:
        was, new = old.stage_of(n), preparing.stage_of(n)
        if n in tight:  # it let the old stage go: it holds nothing but what it loads
            assert sim.held[n] <= {(new.start, new.end)} and sim.nodes[n].shard.serving == 0
        else:  # it keeps its old stage while it loads
            assert (was.start, was.end) in sim.held[n] and sim.nodes[n].shard.serving == old.epoch
    assert sim.run_until_true(lambda: settled(sim), LOAD + 3) is not None
    assert sim.nodes[alive[0]].plan == preparing
    assert all(sim.nodes[n].shard.serving == preparing.epoch for n in alive)


def test_a_node_that_cannot_load_is_planned_around_and_tried_again_with_a_back_off():
    config = CoreConfig(replace(Timing(), retry_unable=5.0), MODEL)
    sim = Simulator(seed=3, config=config, network=NetworkModel(load_delay=0.5, load_retry=1.0))
    sim.unloadable.add("c")  # its model copy is damaged
    for node in "abc":
        sim.add_node(node)
    for a, b in itertools.combinations("abc", 2):
        sim.cable(a, b)

    def serving(nodes: set[str]) -> bool:  # every node runs one committed plan of `nodes`
        plan = sim.nodes["a"].plan
        return sim.converged() and plan is not None and set(plan.nodes) == nodes and all(
            sim.nodes[n].plan == plan and sim.nodes[n].preparing is None for n in "abc") and all(
            sim.nodes[n].shard.serving == plan.epoch for n in nodes)

    assert sim.run_until_true(lambda: serving({"a", "b"}), 10) is not None
    leader = sim.nodes["a"].leader

    def at(kind: str) -> list[float]:
        return [e.at for n, e in sim.stats.events if n == leader and e.kind == kind and e.node == "c"]

    sim.run_for(20)  # failures at t0, then retries after 5 s, then 10 s: each fails again
    failed, retried = at("load-failed"), at("retry")
    assert len(failed) >= 2 and len(retried) >= 2
    assert 5 <= retried[0] - failed[0] < 6 and 10 <= retried[1] - failed[1] < 11  # doubling
    assert sim.nodes["a"].plan is not None and "c" not in sim.nodes["a"].plan.nodes  # a and b serve on
    sim.unloadable.discard("c")  # repaired: at the next retry it loads, and is given layers
    assert sim.run_until_true(lambda: serving({"a", "b", "c"}), 25) is not None
    assert settled(sim)


def test_when_no_mac_can_load_the_reason_says_which_and_why_not_that_no_node_fits():
    config = CoreConfig(replace(Timing(), retry_unable=60.0), MODEL)
    sim = Simulator(seed=4, config=config, network=NetworkModel(load_delay=0.5))
    sim.unloadable |= {"a", "b"}  # their model directories vanished
    for node in "ab":
        sim.add_node(node)
    sim.cable("a", "b")
    assert sim.run_until_true(lambda: bool(sim.nodes["a"].no_fit) and "b could" in sim.nodes["a"].no_fit, 10)
    leader = sim.nodes[sim.nodes["a"].leader]
    assert leader.no_fit == "a could not load its layers: unreadable; b could not load its layers: unreadable"
