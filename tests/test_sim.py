"""Cluster scenarios in the deterministic simulator: election, failure detection and plans."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbmesh.core.cluster import CoreConfig
from tbmesh.core.types import ModelSpec
from tbmesh.testbed.sim import GB, NetworkModel, Simulator, make_info

MODEL = ModelSpec("m", (1 * GB,) * 16, embed_bytes=GB // 2, head_bytes=GB // 2)
CONFIG = CoreConfig(model=MODEL)
T = CONFIG.timing
# After the last fault, the network must be quiet this long for the cluster to converge:
# failure detection, election delay, settle window, and flooding, with room to spare.
CONVERGENCE_BOUND = 3 * (T.suspect_after + T.dead_after + T.election_delay + T.settle) + 2.0


@pytest.fixture(autouse=True, scope="module", params=["ticked", "timed"])
def shell(request):
    """Every scenario twice: each node ticked on a fixed interval, and each run from its one
    timer armed for ClusterNode.next_deadline() alone, as the daemon runs it."""
    Simulator.TIMERS = request.param == "timed"
    yield request.param
    Simulator.TIMERS = False


def mesh(sim: Simulator, ids) -> None:
    for a, b in itertools.combinations(ids, 2):
        sim.cable(a, b)


def start(n: int, seed: int = 1, **kw) -> Simulator:
    sim = Simulator(seed=seed, config=CONFIG, **kw)
    ids = [f"n{i}" for i in range(n)]
    for node in ids:
        sim.add_node(node)
    mesh(sim, ids)
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 5) is not None
    return sim


def leader_of(sim: Simulator, node: str) -> str | None:
    return sim.nodes[node].leader


def test_a_cluster_forms_with_one_leader_and_one_plan():
    sim = start(4)
    (leader,) = sim.leaders(set(sim.nodes))
    plan = sim.nodes["n0"].plan
    assert plan is not None and set(plan.nodes) == set(sim.nodes)
    assert all(sim.nodes[n].term == sim.nodes[leader].term for n in sim.nodes)


def test_leader_crash_gives_one_new_leader_and_a_plan_without_it():
    sim = start(4)
    old = leader_of(sim, "n1")
    old_term = sim.nodes["n1"].term
    sim.crash(old)
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 5) is not None
    survivors = set(sim.nodes)
    (new,) = sim.leaders(survivors)
    assert new != old and sim.nodes[new].term > old_term
    plan = sim.nodes[new].plan
    assert set(plan.nodes) == survivors and plan.term == sim.nodes[new].term


def test_silent_crash_is_detected_by_heartbeat_timeout():
    sim = start(3)
    follower = next(n for n in sim.nodes if not sim.nodes[n].is_leader)
    sim.crash(follower, reset=False)
    crashed_at = sim.now
    others = [n for n in sim.nodes]
    seen = sim.run_until_true(lambda: all(follower not in sim.nodes[n].members() for n in others), 5)
    assert seen is not None
    took = seen - crashed_at
    # silence counts from the last heartbeat heard, up to one interval before the crash
    bound = T.suspect_after + T.dead_after
    assert bound - T.heartbeat_interval <= took <= bound + T.heartbeat_interval


def test_kill_with_reset_is_detected_faster_than_silence():
    sim = start(3)
    follower = next(n for n in sim.nodes if not sim.nodes[n].is_leader)
    sim.crash(follower, reset=True)
    crashed_at = sim.now
    seen = sim.run_until_true(lambda: all(follower not in sim.nodes[n].members() for n in sim.nodes), 5)
    assert seen is not None and seen - crashed_at < T.suspect_after + T.dead_after


def test_a_graceful_leave_is_seen_at_once():
    sim = start(3)
    follower = next(n for n in sim.nodes if not sim.nodes[n].is_leader)
    sim.leave(follower)
    left_at = sim.now
    seen = sim.run_until_true(lambda: all(follower not in sim.nodes[n].members() for n in sim.nodes), 5)
    assert seen is not None and seen - left_at < T.dead_after
    kinds = {e.kind for n, e in sim.stats.events if e.node == follower and e.at >= left_at}
    assert "left" in kinds and "dead" not in kinds


def test_partition_gives_one_leader_per_side_and_heal_keeps_the_higher_term():
    sim = start(4)
    leader = leader_of(sim, "n0")
    side_a = {leader, next(n for n in sorted(sim.nodes) if n != leader)}
    side_b = set(sim.nodes) - side_a
    sim.partition(side_a, side_b)
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
    (la,) = sim.leaders(side_a)
    (lb,) = sim.leaders(side_b)
    assert la == leader and lb in side_b
    assert sim.nodes[lb].term > sim.nodes[la].term
    assert set(sim.nodes[la].plan.nodes) == side_a and set(sim.nodes[lb].plan.nodes) == side_b
    sim.heal()
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
    assert sim.leaders(set(sim.nodes)) == {lb}  # equal halves: the higher term wins
    assert set(sim.nodes[lb].plan.nodes) == set(sim.nodes)


def test_a_joining_node_keeps_the_old_leader_even_with_a_smaller_id():
    sim = start(3)
    leader = leader_of(sim, "n0")
    term = sim.nodes[leader].term
    sim.run_for(3)  # the newcomer also runs alone long enough to lead itself first
    sim.add_node("a0")  # sorts before every n*: it would win any id tie-break
    sim.run_for(T.startup_grace + 1)
    assert sim.nodes["a0"].is_leader  # alone, it leads itself
    mesh(sim, sorted(sim.nodes))
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
    assert sim.leaders(set(sim.nodes)) == {leader}
    assert sim.nodes[leader].term >= term
    assert "a0" in sim.nodes[leader].plan.considered


def test_a_restarted_node_is_one_node_not_two():
    sim = start(3)
    follower = next(n for n in sorted(sim.nodes) if not sim.nodes[n].is_leader)
    leader = leader_of(sim, follower)
    sim.crash(follower, reset=True)
    sim.run_for(0.1)  # back before anyone declared it dead
    sim.restart(follower)
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
    for node in sim.nodes.values():
        assert len(node.members()) == 3
        assert node.db.states[follower].incarnation == 2
    assert sim.leaders(set(sim.nodes)) == {leader}
    restarts = [e for n, e in sim.stats.events if e.kind == "restarted" and e.node == follower]
    assert restarts


def test_a_chain_without_a_bridge_spreads_the_view_over_several_hops():
    sim = Simulator(seed=3, config=CONFIG)
    ids = ["a", "b", "c", "d", "e"]
    for n in ids:
        sim.add_node(n)
    for a, b in zip(ids, ids[1:]):
        sim.cable(a, b)
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
    assert set(sim.nodes["a"].members()) == set(ids)
    sim.crash("c", reset=True)  # splits the chain in two groups
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
    assert set(sim.nodes["a"].members()) == {"a", "b"}
    assert set(sim.nodes["e"].members()) == {"d", "e"}


def test_a_mac_that_led_itself_while_unplugged_rejoins_the_group_plan():
    """While alone, d leads itself at a higher term and plans for itself; back in the group,
    the group's plan must be stamped newer than d's, or d would refuse it forever."""
    for seed in range(12):
        sim = Simulator(seed=seed, config=CONFIG)
        ids = ["a", "b", "c", "d"]
        for n in ids:
            sim.add_node(n)
        for x, y in zip(ids, ids[1:]):
            sim.cable(x, y)
        assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None
        sim.unplug("c", "d")
        alone = sim.run_until_true(lambda: sim.nodes["d"].plan is not None
                                   and sim.nodes["d"].plan.considered == {"d"}, 10)
        assert alone is not None
        sim.run_for(sim.rng.random())
        sim.cable("c", "d")
        assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 10) is not None, seed
        assert sim.nodes["d"].plan.considered == set(ids)


def test_lost_messages_are_repaired_by_anti_entropy():
    sim = start(5, seed=7, network=NetworkModel(drop=0.2))
    leader = leader_of(sim, "n0")
    sim.crash(leader)
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 20) is not None
    assert sim.stats.dropped > 0


def test_a_model_that_does_not_fit_leaves_every_node_without_a_plan_and_with_the_reason():
    big = ModelSpec("big", (100 * GB,) * 8)
    sim = Simulator(seed=1, config=CoreConfig(model=big))
    for n in ["a", "b"]:
        sim.add_node(make_info(n, memory_usable=64 * GB))
    sim.cable("a", "b")
    sim.run_for(5)
    for node in sim.nodes.values():
        assert node.plan is None
        assert node.no_fit and "short by" in node.no_fit


# ----- random fault schedules ------------------------------------------------------------

NODES = [f"n{i}" for i in range(5)]

fault = st.one_of(
    st.tuples(st.just("crash"), st.sampled_from(NODES), st.booleans()),
    st.tuples(st.just("restart"), st.sampled_from(NODES), st.booleans()),
    st.tuples(st.just("partition"), st.sets(st.sampled_from(NODES)), st.booleans()),
    st.tuples(st.just("heal"), st.none(), st.booleans()),
    st.tuples(st.just("unplug"), st.sampled_from(list(itertools.combinations(NODES, 2))), st.booleans()),
    st.tuples(st.just("plug"), st.sampled_from(list(itertools.combinations(NODES, 2))), st.booleans()),
    st.tuples(st.just("leave"), st.sampled_from(NODES), st.booleans()),
)
schedule = st.lists(st.tuples(st.floats(0.01, 3.0), fault), min_size=1, max_size=12)


def apply(sim: Simulator, op: str, arg, flag: bool) -> None:
    if op == "crash" and arg in sim.nodes:
        sim.crash(arg, reset=flag)
    elif op == "restart" and arg not in sim.nodes:
        sim.restart(arg)
    elif op == "partition":
        sim.partition(arg, set(NODES) - arg)
    elif op == "heal":
        sim.heal()
    elif op == "unplug":
        sim.unplug(*arg)
    elif op == "plug":
        sim.cable(*arg)
    elif op == "leave" and arg in sim.nodes:
        sim.leave(arg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedule, seed=st.integers(0, 2**16), drop=st.sampled_from([0.0, 0.05]))
def test_random_faults_never_leave_two_leaders_in_one_group_once_quiet(schedule, seed, drop):
    sim = Simulator(seed=seed, config=CONFIG, network=NetworkModel(drop=drop))
    for node in NODES:
        sim.add_node(node)
    mesh(sim, NODES)
    sim.run_for(2)
    for wait, (op, arg, flag) in schedule:
        sim.run_for(wait)
        apply(sim, op, arg, flag)
    sim.run_for(CONVERGENCE_BOUND)
    for group in sim.components():
        leaders = sim.leaders(group)
        assert len(leaders) == 1, (group, leaders)
        (leader,) = leaders
        assert leader in group and sim.nodes[leader].is_leader
        assert all(set(sim.nodes[n].members()) == group for n in group)
    assert sim.plans_agree()


def test_a_pulled_cable_between_nodes_still_reachable_leaves_every_nodes_sound_links_then_returns():
    sim = start(4)
    everything = frozenset(frozenset(p) for p in itertools.combinations([f"n{i}" for i in range(4)], 2))
    assert all(core.sound_links().keys() == everything for core in sim.nodes.values())
    sim.unplug("n0", "n1")  # n0 and n1 still reach each other through n2 and n3
    assert sim.run_until_true(lambda: all(frozenset(("n0", "n1")) not in core.sound_links()
                                          for core in sim.nodes.values()), 3) is not None
    assert all(len(core.members()) == 4 for core in sim.nodes.values())
    sim.cable("n0", "n1")
    assert sim.run_until_true(lambda: all(core.sound_links().keys() == everything for core in sim.nodes.values()),
                              5) is not None


def test_every_node_and_the_planner_see_rdma_on_the_cables_both_ends_run_it_on():
    from tbmesh.core.planner import plan_layers

    seen = []

    def planner(model, nodes, links, **kw):
        seen.append({(x.a, x.b): x.rdma for x in links})
        return plan_layers(model, nodes, links, **kw)

    sim = Simulator(seed=3, config=CONFIG, planner=planner)
    for node in ("n0", "n1", "n2"):
        sim.add_node(node)
    sim.cable("n0", "n1", rdma=True)
    sim.cable("n1", "n2", rdma=True)
    sim.cable("n0", "n2")  # one end, or both, without a device on this cable
    want = {("n0", "n1"): True, ("n0", "n2"): False, ("n1", "n2"): True}
    assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 5) is not None
    assert all({(x.a, x.b): x.rdma for x in core.links()} == want for core in sim.nodes.values())
    assert seen[-1] == want  # the leader plans with them (a group over jaccl, or over TCP)
    sim.unplug("n0", "n1")
    sim.cable("n0", "n1")  # plugged back into a port without RDMA
    assert sim.run_until_true(lambda: all(not any(x.rdma for x in core.links() if x.joins("n0", "n1"))
                                          and len(core.links()) == 3 for core in sim.nodes.values()), 5)


def test_a_connection_made_anew_without_a_suspicion_is_trouble_at_every_node():
    """A cable that flaps faster than heartbeats notice (the daemon adopts a new connection
    over the old one): what the old one carried may be lost, so every node must see the pair
    as troubled, not only its two ends (the entry and stage 0 of a route may be elsewhere)."""
    sim = start(4)
    before = {n: core.sound_links() for n, core in sim.nodes.items()}
    pair = frozenset(("n0", "n1"))
    assert all(pair in links for links in before.values())
    for a, b in (("n0", "n1"), ("n1", "n0")):  # the new connection's hello, at each end
        sim.nodes[a].peer_connected(b, sim.nodes[b].incarnation, sim.now)
    sim.run_for(1.0)
    for node, core in sim.nodes.items():
        after = core.sound_links()
        assert pair in after, node  # never suspected
        assert core.troubled_links(before[node], after) == [pair], node
    assert all(core.troubled_links(core.sound_links(), core.sound_links()) == [] for core in sim.nodes.values())
