"""Unit tests of the pure membership and election pieces, driven by hand with explicit times."""

from tbmesh.core import election
from tbmesh.core.cluster import ClusterNode, CoreConfig
from tbmesh.core.election import Claim
from tbmesh.core.membership import LinkStateDb, PeerDetector, PeerState, Timing
from tbmesh.core.messages import Adjacency, Disconnect, Goodbye, Heartbeat, LinkState, LinkStates, Send
from tbmesh.core.types import ModelSpec, NodeInfo, Plan, Stage

T = Timing()


def detector() -> PeerDetector:
    return PeerDetector("b", incarnation=1, state=PeerState.ALIVE, last_heard=0.0)


def test_silence_makes_a_peer_suspect_then_dead():
    d = detector()
    d.tick(T.suspect_after - 0.01, T)
    assert d.state is PeerState.ALIVE
    d.tick(T.suspect_after, T)
    assert d.state is PeerState.SUSPECT
    d.tick(T.suspect_after + T.dead_after - 0.01, T)
    assert d.state is PeerState.SUSPECT
    d.tick(T.suspect_after + T.dead_after, T)
    assert d.state is PeerState.DEAD


def test_a_heartbeat_refutes_suspicion():
    d = detector()
    d.tick(T.suspect_after, T)
    assert d.heartbeat(1, 5, T.suspect_after + 0.1)
    assert d.state is PeerState.ALIVE
    d.tick(T.suspect_after + T.dead_after + 0.05, T)
    assert d.state is PeerState.ALIVE


def test_a_closed_connection_is_an_immediate_suspicion():
    d = detector()
    d.connection_lost(0.05)
    assert d.state is PeerState.SUSPECT
    # heartbeats in flight on the dead connection do not revive it
    d.heartbeat(1, 9, 0.06)
    assert d.state is PeerState.SUSPECT
    d.tick(0.05 + T.dead_after, T)
    assert d.state is PeerState.DEAD


def test_incarnations_tell_a_restarted_node_from_its_old_self():
    d = detector()
    assert d.heartbeat(1, 10, 0.1)
    assert d.heartbeat(2, 0, 0.2)  # restarted: seq starts again
    assert d.incarnation == 2 and d.last_seq == 0
    assert not d.heartbeat(1, 11, 0.3)  # a late heartbeat of the old life is ignored
    assert d.last_heard == 0.2


def _state(origin: str, *peers: str, version: int = 1, **kw) -> LinkState:
    info = NodeInfo(origin, origin)
    return LinkState(origin, 1, version, info, tuple(Adjacency(p) for p in peers), **kw)


def test_reachability_needs_both_ends_to_agree():
    db = LinkStateDb()
    db.offer(_state("a", "b"))
    db.offer(_state("b", "a", "c"))
    db.offer(_state("c"))  # c no longer lists b: the b-c adjacency is gone
    assert set(db.reachable("a")) == {"a", "b"}
    db.offer(_state("c", "b", version=2))
    assert set(db.reachable("a")) == {"a", "b", "c"}
    assert not db.offer(_state("c", version=1))  # older versions are ignored


def test_a_node_only_suspected_by_all_its_neighbours_is_suspect():
    db = LinkStateDb()
    db.offer(LinkState("a", 1, 1, NodeInfo("a", "a"), (Adjacency("b"), Adjacency("c", suspect=True))))
    db.offer(_state("b", "a"))
    db.offer(_state("c", "a"))
    assert db.reachable("a") == {"a": False, "b": False, "c": True}


def test_best_claimant_prefers_followers_then_term_then_smaller_id():
    # a lone node (z, term 9) never deposes a leader with followers
    claims = {"a": Claim(2, "a"), "b": Claim(2, "a"), "z": Claim(9, "z")}
    assert election.best_claimant(claims) == "a"
    # equal groups: the higher term wins
    claims = {"a": Claim(2, "a"), "b": Claim(2, "a"), "c": Claim(3, "c"), "d": Claim(3, "c")}
    assert election.best_claimant(claims) == "c"
    # all equal: the smaller id
    assert election.best_claimant({"x": Claim(1, "x"), "y": Claim(1, "y")}) == "x"
    # followers of a node that does not claim to lead do not make it a leader
    assert election.best_claimant({"a": Claim(1, "q"), "b": Claim(1, "q")}) is None


def _sends(actions, kind):
    return [a for a in actions if isinstance(a, Send) and isinstance(a.message, kind)]


def test_heartbeats_measure_round_trip_time():
    a = ClusterNode(NodeInfo("a", "a"), 1, 0.0)
    a.peer_connected("b", 1, 0.0)
    a.tick(1.0)  # a sends sent_at=1.0
    # b answers 0.002 s later, having held a's heartbeat for 0.0005 s
    a.receive("b", Heartbeat("b", 1, 1, sent_at=5.0, echo_at=1.0, echo_hold=0.0005), 1.002)
    assert abs(a.peers["b"].rtt_s - 0.0015) < 1e-9


def test_a_dead_connected_peer_is_disconnected_and_a_goodbye_is_immediate():
    a = ClusterNode(NodeInfo("a", "a"), 1, 0.0)
    a.peer_connected("b", 1, 0.0)
    a.peer_connected("c", 1, 0.0)
    a.tick(T.suspect_after)
    assert a.peers["b"].state is PeerState.SUSPECT
    actions = a.tick(T.suspect_after + T.dead_after)
    assert a.peers["b"].state is PeerState.DEAD
    assert Disconnect("b") in actions and Disconnect("c") in actions
    a.peer_connected("b", 1, 2.0)
    a.receive("b", Goodbye("b", 1), 2.01)
    a.flush(2.01)
    assert a.peers["b"].state is PeerState.DEAD


def _leader_with_plan(term: int, epoch: int) -> LinkState:
    plan = Plan(term, epoch, "m", (Stage("a", 0, 2, 2), Stage("l", 2, 4, 2)))
    return LinkState("l", 1, 10 * term + epoch, NodeInfo("l", "l"), (Adjacency("a"),),
                     term=term, leader="l", plan=plan)


def test_a_plan_from_an_older_term_or_epoch_is_refused():
    a = ClusterNode(NodeInfo("a", "a"), 1, 0.0, CoreConfig(model=ModelSpec("m", (1,) * 4)))
    a.peer_connected("l", 1, 0.0)
    a.receive("l", LinkStates("l", (_leader_with_plan(5, 3),)), 0.1)
    a.flush(0.1)
    assert a.leader == "l" and a.plan.key == (5, 3)
    # the same leader cannot move the cluster back to an older plan ...
    stale = _leader_with_plan(4, 9)
    a.receive("l", LinkStates("l", (LinkState(**{**stale.__dict__, "version": 99}),)), 0.2)
    a.flush(0.2)
    assert a.plan.key == (5, 3)
    stale = _leader_with_plan(5, 2)
    a.receive("l", LinkStates("l", (LinkState(**{**stale.__dict__, "version": 100}),)), 0.3)
    a.flush(0.3)
    assert a.plan.key == (5, 3)
    # ... and a newer one is taken
    newer = _leader_with_plan(5, 4)
    a.receive("l", LinkStates("l", (LinkState(**{**newer.__dict__, "version": 101}),)), 0.4)
    a.flush(0.4)
    assert a.plan.key == (5, 4)


def test_our_own_link_state_from_a_previous_life_is_outbid():
    a = ClusterNode(NodeInfo("a", "a"), 1, 0.0)
    a.peer_connected("b", 1, 0.0)
    ghost = LinkState("a", 1, 50, NodeInfo("a", "a"))
    actions = a.receive("b", LinkStates("b", (ghost,)), 0.1)
    assert a.version > 50
    flooded = _sends(actions, LinkStates)
    assert any(s.origin == "a" and s.version > 50 for f in flooded for s in f.message.states)


def test_a_link_has_rdma_when_both_ends_publish_a_device_on_it():
    a = ClusterNode(NodeInfo("a", "a"), 1, 0.0)
    for peer in ("b", "c"):
        a.peer_connected(peer, 1, 0.0)
    a.set_link_rdma("b", "rdma_en2", 0.0)
    a.set_link_rdma("c", "rdma_en3", 0.0)
    published = a.db.states["a"].neighbours
    assert [(adj.peer, adj.rdma) for adj in published] == [("b", "rdma_en2"), ("c", "rdma_en3")]
    # b publishes a device toward a; c (RDMA off, or a Thunderbolt 4 port) publishes none
    b = LinkState("b", 1, 1, NodeInfo("b", "b"), (Adjacency("a", rdma="rdma_en5"), Adjacency("c")))
    c = LinkState("c", 1, 1, NodeInfo("c", "c"), (Adjacency("a"), Adjacency("b")))
    a.receive("b", LinkStates("b", (b, c)), 0.01)
    a.flush(0.01)
    assert {(x.a, x.b): x.rdma for x in a.links()} == {("a", "b"): True, ("a", "c"): False, ("b", "c"): False}
    assert a.rdma_devices() == {("a", "b"): "rdma_en2", ("b", "a"): "rdma_en5"}
    # the connection to b moves to a port without a device: the link has no RDMA any more
    a.set_link_rdma("b", "", 0.02)
    assert not any(x.rdma for x in a.links()) and a.rdma_devices() == {}
