"""The core's one timer: `ClusterNode.next_deadline()` says when `tick` next has something to
do, so a shell arms one timer for it after every call instead of ticking on a fixed interval
(as aioquic's `get_timer()`). What this rests on: a tick before the deadline changes nothing,
and a tick at it does what was due."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tbmesh.core.cluster import ClusterNode, CoreConfig
from tbmesh.core.membership import PeerDetector, PeerState, Timing, due_at
from tbmesh.core.messages import Heartbeat
from tbmesh.core.types import ModelSpec
from tbmesh.testbed.sim import GB, NetworkModel, Simulator, make_info

T = Timing()
MODEL = ModelSpec("m", (1 * GB,) * 16, embed_bytes=GB // 2, head_bytes=GB // 2)
NODES = [f"n{i}" for i in range(4)]


@settings(max_examples=300, deadline=None)
@given(since=st.floats(0, 1e7), wait=st.floats(1e-6, 3600))
def test_due_at_is_the_first_instant_the_condition_holds(since, wait):
    at = due_at(since, wait)
    assert at - since >= wait
    assert math.nextafter(at, -math.inf) - since < wait


def test_a_detector_changes_state_at_its_deadline_and_not_a_hair_before():
    detector = PeerDetector("b", 1, PeerState.ALIVE, last_heard=0.1)
    suspect_at = detector.deadline(T)
    detector.tick(math.nextafter(suspect_at, 0), T)
    assert detector.state is PeerState.ALIVE
    detector.tick(suspect_at, T)
    assert detector.state is PeerState.SUSPECT
    dead_at = detector.deadline(T)
    assert dead_at == due_at(suspect_at, T.dead_after)
    detector.tick(math.nextafter(dead_at, 0), T)
    assert detector.state is PeerState.SUSPECT
    detector.tick(dead_at, T)
    assert detector.state is PeerState.DEAD and detector.deadline(T) is None


def test_a_heartbeat_puts_the_suspicion_off():
    detector = PeerDetector("b", 1, PeerState.ALIVE, last_heard=0.0)
    before = detector.deadline(T)
    detector.heartbeat(1, 1, 0.35)
    assert detector.deadline(T) == due_at(0.35, T.suspect_after) > before


def test_a_lone_node_wakes_for_its_election_then_sleeps():
    core = ClusterNode(make_info("a"), 1, 10.0)
    deadline = core.next_deadline()
    assert deadline == due_at(10.0, T.startup_grace)  # it listens this long before leading alone
    assert core.tick(math.nextafter(deadline, 0)) == [] and core.leader is None
    assert core.next_deadline() == deadline
    core.tick(deadline)
    assert core.is_leader
    assert core.next_deadline() is None  # no peer, no model: nothing will be due until an input


def test_a_message_received_owes_a_flush_at_once_and_a_connected_peer_heartbeats():
    a = ClusterNode(make_info("a"), 1, 0.0)
    a.peer_connected("b", 1, 0.5)
    assert a.next_deadline() == 0.0  # the heartbeat schedule, idle since 0: due now
    a.tick(0.5)
    assert a.next_deadline() == 0.5 + T.heartbeat_interval  # then one interval on, not a burst
    a.receive("b", Heartbeat("b", 1, 1, 0.55, 0.0, 0.0, 0), 0.6)
    assert a.next_deadline() == 0.6  # the receive's flush
    a.flush(0.6)
    assert a.next_deadline() == 0.5 + T.heartbeat_interval


def check_ticks(monkeypatch) -> dict[str, int]:
    """Make every tick of every core check that one before its deadline changes nothing.
    Returns the counts of ticks before and at/after their deadline."""
    counts = {"early": 0, "due": 0}
    tick = ClusterNode.tick

    def view(core: ClusterNode) -> tuple:
        connected = any(d.connected for d in core.peers.values())  # else no heartbeat is scheduled
        return (core.db.states.get(core.id), core.leader, core.term, core.plan, core.preparing, core.no_fit,
                core.members(), {p: (d.state, d.connected) for p, d in core.peers.items()}, core.keep,
                core.next_heartbeat if connected else None, len(core.events))

    def checked(core: ClusterNode, now: float) -> list:
        deadline = core.next_deadline()
        if deadline is not None and now >= deadline:
            counts["due"] += 1
            return tick(core, now)
        before = view(core)
        actions = tick(core, now)
        assert actions == [] and view(core) == before, (core.id, now, deadline, actions)
        assert core.next_deadline() == deadline
        counts["early"] += 1
        return actions

    monkeypatch.setattr(ClusterNode, "tick", checked)
    return counts


def faults(sim: Simulator) -> None:
    """Joins, a plan to load, a silent crash, a reset, a partition healed, a leave, a
    restart, a Mac that cannot load (retried after its back-off), lost messages."""
    for node in NODES:
        sim.add_node(node)
    for i, a in enumerate(NODES):
        for b in NODES[i + 1:]:
            sim.cable(a, b)
    sim.run_for(3)
    sim.crash("n3", reset=False)
    sim.run_for(2)
    sim.restart("n3")
    sim.run_for(2)
    sim.partition({"n0", "n1"}, {"n2", "n3"})
    sim.run_for(2)
    sim.heal()
    sim.run_for(2)
    sim.unloadable.add("n2")
    sim.crash("n1", reset=True)
    sim.run_for(3)
    sim.leave("n0")
    sim.run_for(2)
    sim.unloadable.discard("n2")
    sim.restart("n1")
    sim.restart("n0")
    sim.run_for(8)  # past n2's retry, so it is planned for again


CONFIG = CoreConfig(Timing(retry_unable=2.0), model=MODEL)


def test_in_the_ticked_simulator_no_tick_before_the_deadline_changes_anything(monkeypatch):
    counts = check_ticks(monkeypatch)
    for seed in range(3):
        sim = Simulator(seed=seed, config=CONFIG, network=NetworkModel(drop=0.03), timers=False)
        faults(sim)
        assert sim.run_until_true(lambda sim=sim: sim.converged() and sim.plans_agree(), 10) is not None
        assert any(e.kind == "retry" for _, e in sim.stats.events)  # the back-off's deadline was met
    assert counts["early"] > 1000 and counts["due"] > 1000  # both kinds were checked


def outcome(sim: Simulator) -> tuple:
    groups = sorted(sorted(g) for g in sim.components())
    plans = {n: (c.plan.considered, [(s.node, s.start, s.end) for s in c.plan.stages]) if c.plan else None
             for n, c in sim.nodes.items()}
    return groups, {n: c.leader for n, c in sim.nodes.items()}, plans


def test_the_core_run_from_its_deadline_alone_ends_where_the_ticked_one_does():
    ticked = Simulator(seed=5, config=CONFIG, timers=False)
    timed = Simulator(seed=5, config=CONFIG, timers=True)
    for sim in (ticked, timed):
        faults(sim)
        assert sim.run_until_true(lambda sim=sim: sim.converged() and sim.plans_agree(), 10) is not None
    assert outcome(timed) == outcome(ticked)
    kinds = {"joined", "dead", "left", "restarted", "load-failed", "retry"}
    assert {e.kind for _, e in timed.stats.events} & kinds == {e.kind for _, e in ticked.stats.events} & kinds == kinds


def test_a_timed_lone_node_sleeps_once_it_leads():
    sim = Simulator(seed=1, timers=True)
    sim.add_node("a")
    sim.run_for(2)
    assert sim.nodes["a"].is_leader
    woke = sim.ticks
    sim.run_for(600)
    assert sim.ticks == woke <= 2  # a ticked node would have ticked 6000 times


def test_timed_nodes_wake_for_heartbeats_and_flushes_only():
    sim = Simulator(seed=2, config=CoreConfig(), timers=True)
    for node in ("a", "b", "c"):
        sim.add_node(node)
    sim.cable("a", "b")
    sim.cable("b", "c")
    sim.cable("a", "c")
    sim.run_for(5)
    assert sim.converged()
    before, window = sim.ticks, 20.0
    sim.run_for(window)
    per_node_per_s = (sim.ticks - before) / 3 / window
    beats = 1 / T.heartbeat_interval
    # its own heartbeats, and at most a flush for each of its 2 peers' heartbeats
    assert beats <= per_node_per_s <= 3 * beats + 0.5
