"""Membership: a failure detector per direct peer, and the cluster view from link states.

Direct peers are watched with heartbeats (alive -> suspect -> dead). Nodes further away are
alive exactly when they are reachable over adjacencies that both ends publish, so a node two
cables away is declared dead as soon as its neighbours stop listing it. mDNS is never used
for liveness (its records live for minutes).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

from tbmesh.core.messages import LinkState


class PeerState(str, Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True)
class Timing:
    """Failure-detection and election timing, in seconds."""

    heartbeat_interval: float = 0.2
    suspect_after: float = 0.6  # silence before a connected peer is suspected
    dead_after: float = 0.4  # suspicion before it is declared dead (a heartbeat refutes it)
    election_delay: float = 0.2  # leaderless for this long -> the candidate claims a term
    startup_grace: float = 1.0  # a new node listens this long before leading alone
    settle: float = 0.3  # membership unchanged this long -> the leader re-plans
    summary_interval: float = 1.0  # at most one database summary per peer per interval
    retry_unable: float = 60.0  # a node that could not load is planned for again after this,
    retry_unable_max: float = 3600.0  # doubling at each failure in a row, up to this


def due_at(since: float, wait: float) -> float:
    """The first instant `now` at which `now - since >= wait` holds as floats compute it
    (`since + wait` may be an ulp off either way): a timer armed for it finds the condition
    true when it fires, and nothing is due a hair before it."""
    at = since + wait
    while at - since < wait:
        at = math.nextafter(at, math.inf)
    while math.nextafter(at, -math.inf) - since >= wait:
        at = math.nextafter(at, -math.inf)
    return at


@dataclass
class PeerDetector:
    """Failure detector for one directly connected peer.

    A heartbeat keeps it alive; silence or a closed connection makes it suspect; suspicion
    that lasts `dead_after` makes it dead. A higher incarnation is a restarted node: it
    replaces the old one. Heartbeats of an older incarnation are ignored.
    """

    peer: str
    incarnation: int
    state: PeerState
    last_heard: float
    suspect_since: float = 0.0
    connected: bool = True
    rtt_s: float = 0.0
    bytes_per_s: float = 0.0
    rdma: str = ""  # our RDMA device on the cable to the peer, "" without one
    last_seq: int = -1
    echo_at: float = 0.0  # the peer's latest sent_at, echoed back for its RTT
    echo_received: float = 0.0
    connections: int = 1  # connections made to the peer: a new one may have lost what the old one carried

    def heartbeat(self, incarnation: int, seq: int, now: float) -> bool:
        """Record a heartbeat; returns False when it is stale (older incarnation)."""
        if incarnation < self.incarnation:
            return False
        if incarnation > self.incarnation:
            self.incarnation, self.last_seq = incarnation, -1
        self.last_seq = max(self.last_seq, seq)
        self.last_heard = now
        if self.connected:
            self.state = PeerState.ALIVE
        return True

    def connection_lost(self, now: float) -> None:
        self.connected = False
        if self.state is PeerState.ALIVE:
            self.state, self.suspect_since = PeerState.SUSPECT, now

    def connection_made(self, incarnation: int, now: float) -> None:
        self.connections += 1
        if incarnation > self.incarnation:
            self.incarnation, self.last_seq = incarnation, -1
        self.connected, self.state, self.last_heard = True, PeerState.ALIVE, now

    def measure_rtt(self, sample: float) -> None:
        # exponential moving average: one slow heartbeat must not swing the figure
        self.rtt_s = sample if self.rtt_s == 0 else 0.8 * self.rtt_s + 0.2 * sample

    def deadline(self, timing: Timing) -> float | None:
        """When `tick` next changes our state: suspicion after silence, death after
        suspicion; None once dead. A heartbeat received moves it."""
        if self.state is PeerState.ALIVE:
            return due_at(self.last_heard, timing.suspect_after)
        if self.state is PeerState.SUSPECT:
            return due_at(self.suspect_since, timing.dead_after)
        return None

    def tick(self, now: float, timing: Timing) -> None:
        if self.state is PeerState.ALIVE and now - self.last_heard >= timing.suspect_after:
            self.state, self.suspect_since = PeerState.SUSPECT, now
        if self.state is PeerState.SUSPECT and now - self.suspect_since >= timing.dead_after:
            self.state = PeerState.DEAD


class LinkStateDb:
    """The newest link state of every node ever heard of, and what follows from it."""

    def __init__(self) -> None:
        self.states: dict[str, LinkState] = {}
        self.changes = 0  # bumped on every kept state: a cheap key for caches
        self.topology = 0  # bumped when adjacencies change: reachability depends on nothing else
        self.claims = 0  # bumped when a (term, leader) claim changes
        self._peers: dict[str, frozenset[str]] = {}
        self._digest: int | None = None
        self._reachable: tuple[str, int, dict[str, bool]] | None = None

    def offer(self, state: LinkState) -> bool:
        """Keep `state` if it is newer than what we hold; returns whether it was kept."""
        held = self.states.get(state.origin)
        if held is not None and held.key >= state.key:
            return False
        if held is None or _adjacency(held) != _adjacency(state):
            self.topology += 1
        if held is None or (held.term, held.leader) != (state.term, state.leader):
            self.claims += 1
        self.states[state.origin] = state
        self._peers[state.origin] = frozenset() if state.left else frozenset(
            a.peer for a in state.neighbours
        )
        self.changes += 1
        self._digest = None
        return True

    def summary(self) -> tuple[tuple[str, int, int], ...]:
        return tuple((o, s.incarnation, s.version) for o, s in sorted(self.states.items()))

    def digest(self) -> int:
        if self._digest is None:
            text = repr(self.summary()).encode()
            self._digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")
        return self._digest

    def newer_than(self, entries: tuple[tuple[str, int, int], ...]) -> list[LinkState]:
        """Our link states that are missing from, or newer than, a peer's summary."""
        theirs = {origin: (inc, ver) for origin, inc, ver in entries}
        return [
            s for o, s in sorted(self.states.items()) if o not in theirs or s.key > theirs[o]
        ]

    def lacks_any_of(self, entries: tuple[tuple[str, int, int], ...]) -> bool:
        """Whether a peer's summary holds something newer than ours."""
        for origin, inc, ver in entries:
            held = self.states.get(origin)
            if held is None or held.key < (inc, ver):
                return True
        return False

    def reachable(self, me: str) -> dict[str, bool]:
        """Nodes reachable from `me` over adjacencies both ends publish.

        Maps each reachable node to whether it is only suspected: every adjacency that
        leads to it is marked suspect by the neighbour that publishes it.
        """
        if self._reachable is not None and self._reachable[:2] == (me, self.topology):
            return self._reachable[2]
        found: dict[str, bool] = {me: False}
        queue = deque([me])
        while queue:
            here = queue.popleft()
            state = self.states.get(here)
            if state is None or state.left:
                continue
            for adj in state.neighbours:
                if here not in self._peers.get(adj.peer, ()):
                    continue  # one-sided: the other end does not (yet, or any more) agree
                if adj.peer not in found:
                    found[adj.peer] = adj.suspect
                    queue.append(adj.peer)
                elif not adj.suspect:
                    found[adj.peer] = False
        found[me] = False
        self._reachable = (me, self.topology, found)
        return found


def _adjacency(state: LinkState) -> tuple:
    return (state.left, tuple((a.peer, a.suspect) for a in state.neighbours))
