"""One node's view of the cluster: membership, election and the plan, without any I/O.

The shell (the daemon, or the simulator) feeds it events with the current time and carries
out the actions it returns:

    node = ClusterNode(info, incarnation, now, config)
    actions = node.peer_connected("b", incarnation=3, now=now)
    actions = node.receive("b", message, now)
    actions = node.flush(now)           # soon after a burst of receives (coalesced)
    actions = node.tick(now)            # at node.next_deadline(), asked again after every call
    events = node.drain_events()        # joined, dead, leader, plan, ...

It never reads a clock, opens a socket or sleeps. Its timers are one deadline
(`next_deadline`, as aioquic's `get_timer`): a shell arms one timer for it; a shell that ticks
on a fixed interval instead (the simulator) sees the same, as a tick before it does nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tbmesh.core import election
from tbmesh.core.membership import LinkStateDb, PeerDetector, PeerState, Timing, due_at
from tbmesh.core.messages import (
    ENDS,
    FIRST,
    LAST,
    Action,
    Adjacency,
    DatabaseSummary,
    Disconnect,
    DiskState,
    Event,
    Goodbye,
    Heartbeat,
    KeepOnDisk,
    LinkState,
    LinkStates,
    Message,
    Send,
    ShardState,
)
from tbmesh.core.groups import DEFAULT_PARALLEL, Parallel
from tbmesh.core.replicas import REPLICAS, keep_on_disk
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Placement, Plan, ranges_of

Planner = Callable[..., Placement]

MEMORY_CHANGE = 0.10  # a member's usable memory moving by more than this fraction re-plans


@dataclass(frozen=True)
class CoreConfig:
    timing: Timing = field(default_factory=Timing)
    model: ModelSpec | None = None  # what the leader plans for; None = membership only
    context: int = 0  # tokens of KV cache each stage must keep room for
    model_name: str | None = None  # without `model`: serve this one, as a member's disk state describes it
    replicas: int = REPLICAS  # copies of each layer the leader keeps on its members' disks
    # the planner's shapes (tbmesh.core.groups); a node passes its --parallel
    parallel: Parallel = DEFAULT_PARALLEL


def _default_planner() -> Planner:
    from tbmesh.core.planner import plan_layers

    return plan_layers


class ClusterNode:
    def __init__(
        self,
        info: NodeInfo,
        incarnation: int,
        now: float,
        config: CoreConfig | None = None,
        planner: Planner | None = None,
    ) -> None:
        self.info = info
        self.id = info.id
        self.incarnation = incarnation
        self.config = config or CoreConfig()
        self.timing = self.config.timing
        self.planner = planner or _default_planner()
        self.peers: dict[str, PeerDetector] = {}
        self.db = LinkStateDb()
        self.version = 0
        self.term = 0
        self.leader: str | None = None
        self.plan: Plan | None = None  # the running plan (ours if we lead, else accepted)
        self.preparing: Plan | None = None  # the next plan, loading; committed when all are ready
        self.no_fit: str | None = None  # the planner's reason when the model does not fit
        self.shard: ShardState | None = None  # what our runtime has loaded
        self.disk: DiskState | None = None  # the model's weights on our disk
        self.keep: tuple[KeepOnDisk, ...] = ()  # the copies each member keeps on disk (the leader's)
        self.started_at = now
        self.leaderless_since: float | None = now
        self.seq = 0
        self.next_heartbeat = now
        self.events: list[Event] = []
        self._out: list[Action] = []
        self._published: LinkState | None = None
        self._published_rtt: dict[str, float] = {}
        self._last_summary: dict[str, float] = {}
        self._digest_mismatch: dict[str, int] = {}
        self._members: dict[str, bool] = {self.id: False}  # reachable -> suspected
        self._members_since = now
        self._planned_for: frozenset[str] | None = None
        self._planned_memory: dict[str, int] = {}  # usable memory of each member when planned
        self._missing: str | None = None  # the layers on no member's disk when planned
        self._unable: dict[str, float] = {}  # members that could not load their layers -> since
        self._unable_failures: dict[str, int] = {}  # failures in a row, for the back-off
        self._unable_why: dict[str, str] = {}  # what their last failed load said
        self._unable_in: frozenset[str] = frozenset()  # the membership that holds for
        self._others: dict[str, str] = {}  # members left out, holding another model under its name -> why
        self._election_key: tuple | None = None
        self._claims_cache: dict[str, election.Claim] = {}
        self._best: str | None = None
        self._left = False
        self.dirty = False  # received messages not yet reflected in the view
        self._dirty_at = now  # when the first of them came: a flush is owed from then
        self._updated_at = now  # the time of the last update: its timers that were due are done
        self._publish(now)

    # ----- inputs -------------------------------------------------------------------

    def peer_connected(self, peer: str, incarnation: int, now: float) -> list[Action]:
        """A transport connection to `peer` finished its hello."""
        detector = self.peers.get(peer)
        if detector is None:
            self.peers[peer] = PeerDetector(peer, incarnation, PeerState.ALIVE, now)
        else:
            if incarnation > detector.incarnation:
                self._event(now, "restarted", peer, f"incarnation {incarnation}")
            detector.connection_made(incarnation, now)
        # A new link: heartbeat at once and compare databases so both sides sync quickly.
        self._send(peer, self._heartbeat(peer, now))
        self._send_summary(peer, now, reply=True)
        return self._update(now)

    def peer_disconnected(self, peer: str, now: float) -> list[Action]:
        """The connection closed (EOF, reset): an immediate suspicion."""
        detector = self.peers.get(peer)
        if detector is not None:
            detector.connection_lost(now)
        return self._update(now)

    def receive(self, peer: str, message: Message, now: float) -> list[Action]:
        """Handle one message. Replies and flooding are returned at once; what follows
        for the view (election, plan) waits for `flush`, so a burst of link states costs
        one recomputation instead of one each."""
        detector = self.peers.get(peer)
        if detector is None or not detector.connected or self._left:
            return []
        if isinstance(message, Heartbeat):
            self._on_heartbeat(detector, message, now)
        elif isinstance(message, LinkStates):
            self._on_link_states(peer, message.states, now)
        elif isinstance(message, DatabaseSummary):
            self._on_summary(peer, message, now)
        elif isinstance(message, Goodbye):
            if message.incarnation >= detector.incarnation:
                detector.state, detector.connected = PeerState.DEAD, False
        if not self.dirty:
            self._dirty_at = now
        self.dirty = True
        out, self._out = self._out, []
        return out

    def flush(self, now: float) -> list[Action]:
        """Bring the view, the election and the plan up to date after `receive`s."""
        return self._update(now) if self.dirty else []

    def tick(self, now: float) -> list[Action]:
        if self._left:
            return []
        if now >= self.next_heartbeat:
            interval = self.timing.heartbeat_interval
            # a whole interval late (no peer was connected, so no timer was armed for it):
            # the next one interval from now, not a second one at once to catch up
            late = self.next_heartbeat + interval <= now
            self.next_heartbeat = now + interval if late else self.next_heartbeat + interval
            for peer in self._connected():
                self._send(peer, self._heartbeat(peer, now))
        return self._update(now)

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do; None when nothing will be until an input
        comes. The earliest of: the next heartbeats (while a peer is connected), each direct
        peer's suspicion after silence and death after suspicion, the election when we are
        the leaderless group's candidate, the leader's settling before it plans and its
        retries of Macs that could not load, and a flush owed since a `receive` (at once).

        It moves with every input (a heartbeat received puts a suspicion off, a member
        joining restarts the settling), so a shell asks again after each call into the node
        and re-arms its one timer. A tick before the deadline changes nothing."""
        if self._left:
            return None
        if self.dirty:
            return self._dirty_at
        timing = self.timing
        timers = [detector.deadline(timing) for detector in self.peers.values()]
        if self.leader is None and self.leaderless_since is not None \
                and election.candidate(self._members) == self.id:
            timers.append(max(due_at(self.leaderless_since, timing.election_delay),
                              due_at(self.started_at, timing.startup_grace)))
        if self.is_leader:
            timers.append(due_at(self._members_since, timing.settle))
            timers += [due_at(since, self._retry_wait(node)) for node, since in self._unable.items()]
        # These are conditions of time, true from their deadline on: one the last update
        # already saw (its deadline at or before it) has done what it does.
        due = [t for t in timers if t is not None and t > self._updated_at]
        if any(d.connected and d.state is not PeerState.DEAD for d in self.peers.values()):
            due.append(self.next_heartbeat)  # due until a tick sends them
        return min(due, default=None)

    def set_link_bandwidth(self, peer: str, bytes_per_s: float, now: float) -> list[Action]:
        """A bandwidth probe to a direct peer finished."""
        detector = self.peers.get(peer)
        if detector is not None:
            detector.bytes_per_s = bytes_per_s
        return self._update(now)

    def set_link_rdma(self, peer: str, device: str, now: float) -> list[Action]:
        """Our RDMA device on the cable to a direct peer ("rdma_en2"; "" for none): published
        with the adjacency, so every node knows which links both ends run RDMA on."""
        detector = self.peers.get(peer)
        if detector is not None:
            detector.rdma = device
        return self._update(now)

    def update_info(self, info: NodeInfo, now: float) -> list[Action]:
        self.info = info
        return self._update(now)

    def set_shard(self, shard: ShardState | None, now: float) -> list[Action]:
        """What this node's runtime has loaded (published so every node sees who serves)."""
        self.shard = shard
        return self._update(now)

    def set_disk(self, disk: DiskState | None, now: float) -> list[Action]:
        """The model's weights on this node's disk (published so peers know whom to fetch from)."""
        self.disk = disk
        return self._update(now)

    def leave(self, now: float) -> list[Action]:
        """Say goodbye: peers mark us dead at once instead of waiting for silence."""
        self._left = True
        self._publish(now)
        for peer in self._connected():
            self._send(peer, Goodbye(self.id, self.incarnation))
        out, self._out = self._out, []
        return out

    def drain_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # ----- the view -----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.leader == self.id

    def members(self) -> dict[str, bool]:
        """Reachable nodes (ourselves included), each mapped to whether it is suspected."""
        return dict(self._members)

    def sound_links(self) -> dict[frozenset[str], dict[str, int]]:
        """Pairs of reachable nodes whose connection no end suspects (ours as our detectors
        see them now), each with the connections its ends say they made to each other. A
        pair that leaves, or whose count goes up at either end, may have lost messages with
        its connection, though both nodes stay reachable (by other cables): the data plane
        starts again what went over it."""
        counts: dict[frozenset[str], dict[str, int]] = {}
        suspected: set[frozenset[str]] = set()
        for peer, detector in self.peers.items():
            pair = frozenset((self.id, peer))
            counts.setdefault(pair, {})[self.id] = detector.connections
            if detector.state is not PeerState.ALIVE or not detector.connected:
                suspected.add(pair)
        for origin in self._members:
            state = self.db.states.get(origin) if origin != self.id else None
            for adj in state.neighbours if state is not None else ():
                if adj.peer in self._members:
                    pair = frozenset((origin, adj.peer))
                    counts.setdefault(pair, {})[origin] = adj.connections
                    if adj.suspect:
                        suspected.add(pair)
        return {p: c for p, c in counts.items() if p not in suspected and p <= self._members.keys()}

    @staticmethod
    def troubled_links(before: dict[frozenset[str], dict[str, int]],
                       now: dict[frozenset[str], dict[str, int]]) -> list[frozenset[str]]:
        """The pairs of `before` (sound_links) that are no longer sound, or whose connection
        was made anew at an end that reported it both times."""
        return [pair for pair, counts in before.items()
                if pair not in now or any(now[pair].get(end, count) != count for end, count in counts.items())]

    def state_of(self, node: str) -> PeerState:
        if node in self._members:
            return PeerState.SUSPECT if self._members[node] else PeerState.ALIVE
        return PeerState.DEAD

    def shards(self) -> dict[str, ShardState]:
        """What each reachable node has loaded."""
        found = {n: s.shard for n in self._members
                 if (s := self.db.states.get(n)) is not None and s.shard is not None}
        if self.shard is not None:
            found[self.id] = self.shard
        return found

    def disks(self) -> dict[str, DiskState]:
        """What each reachable node keeps on disk (nodes that publish nothing are left out:
        they hold the whole model, as every node did before weights could flow)."""
        found = {n: s.disk for n in self._members
                 if (s := self.db.states.get(n)) is not None and s.disk is not None}
        if self.disk is not None:
            found[self.id] = self.disk
        return found

    @property
    def model_name(self) -> str | None:
        return self.config.model.name if self.config.model is not None else self.config.model_name

    @property
    def model(self) -> ModelSpec | None:
        """The model to plan for: ours, or the one a member describes under our model's name
        (one holding the cluster's copy of it, see model_manifest)."""
        if self.config.model is not None:
            return self.config.model
        name, wanted = self.config.model_name, self.model_manifest()
        specs = [d.spec for n, d in sorted(self.disks().items(), key=lambda x: (x[1].manifest != wanted, x[0]))
                 if d.spec is not None and d.spec.name == name and d.manifest in ("", wanted)]
        return specs[0] if name is not None and specs else None

    def model_manifest(self) -> str:
        """The digest of the manifest of the model the cluster serves ("" while no member
        knows it): the running plan's while a member holds it (a new leader, or a Mac that
        joins, changes nothing), else the leader's own copy's, else the one most members hold
        (ties: the smallest digest). Every node reads the same from the same view."""
        name = self.model_name
        if name is None:
            return ""
        disks = {n: d for n, d in self.disks().items() if d.model == name and d.manifest}
        running = self.plan.manifest if self.plan is not None and self.plan.model == name else ""
        if running and any(d.manifest == running for d in disks.values()):
            return running
        if (leader := disks.get(self.leader or "")) is not None:
            return leader.manifest
        counts = Counter(d.manifest for d in disks.values())
        return min(counts, key=lambda m: (-counts[m], m), default="")

    def other_models(self) -> dict[str, str]:
        """The reachable Macs whose disk holds another model under our model's name, each with
        why no plan uses them (answers made of two models' layers would be silently wrong).
        A Mac whose manifest is not known yet (it is hashing its copy) is not one of them."""
        wanted = self.model_manifest()
        if not wanted:
            return {}
        return {n: f"{self._name(n)} holds another model under the name {d.model}: manifest "
                   f"{d.manifest[:12]}… vs {wanted[:12]}…, the cluster's"
                for n, d in sorted(self.disks().items())
                if d.model == self.model_name and d.manifest and d.manifest != wanted}

    def node_infos(self) -> dict[str, NodeInfo]:
        """Every node ever heard of, with the info it last published."""
        infos = {origin: state.info for origin, state in self.db.states.items()}
        infos[self.id] = self.info
        return infos

    def rdma_devices(self) -> dict[tuple[str, str], str]:
        """{(a, b): a's RDMA device on its cable to b} for the direct links among reachable
        nodes whose two ends both publish one (jaccl needs a device at each end)."""
        published = {(origin, adj.peer): adj.rdma for origin in self._members
                     if (state := self.db.states.get(origin)) is not None
                     for adj in state.neighbours if adj.rdma and adj.peer in self._members}
        return {(a, b): device for (a, b), device in published.items() if (b, a) in published}

    def links(self) -> list[LinkInfo]:
        """Direct links among reachable nodes. Both ends publish a link's figures; ours
        come first (freshest here), else the smaller id's, so every node reads the same.
        A link has RDMA when both ends publish a device on it (rdma_devices)."""
        rdma = self.rdma_devices()
        best: dict[tuple[str, str], LinkInfo] = {}
        for origin in sorted(self._members, key=lambda n: (n != self.id, n)):
            state = self.db.states.get(origin)
            if state is None:
                continue
            for adj in state.neighbours:
                if adj.peer not in self._members:
                    continue
                pair = (min(origin, adj.peer), max(origin, adj.peer))
                held = best.get(pair)
                if held is None:
                    best[pair] = LinkInfo(pair[0], pair[1], adj.bytes_per_s, adj.rtt_s, pair in rdma)
                elif not (held.bytes_per_s and held.rtt_s):
                    best[pair] = LinkInfo(pair[0], pair[1], held.bytes_per_s or adj.bytes_per_s,
                                          held.rtt_s or adj.rtt_s, held.rdma)
        return [best[pair] for pair in sorted(best)]

    # ----- message handlers -----------------------------------------------------------

    def _on_heartbeat(self, detector: PeerDetector, hb: Heartbeat, now: float) -> None:
        if not detector.heartbeat(hb.incarnation, hb.seq, now):
            return
        if hb.echo_at > 0:
            detector.measure_rtt(max(0.0, now - hb.echo_at - hb.echo_hold))
        detector.echo_at, detector.echo_received = hb.sent_at, now
        # Digests differ for a moment after every change; only a lasting difference
        # means a lost update, which a summary exchange repairs.
        if hb.digest != self.db.digest():
            misses = self._digest_mismatch.get(detector.peer, 0) + 1
            self._digest_mismatch[detector.peer] = misses
            if misses >= 2:
                self._send_summary(detector.peer, now, reply=True)
        else:
            self._digest_mismatch[detector.peer] = 0

    def _on_link_states(self, sender: str, states: Sequence[LinkState], now: float) -> None:
        fresh: list[LinkState] = []
        for state in states:
            if state.origin == self.id:
                self._refute_own(state, now)
                continue
            held = self.db.states.get(state.origin)
            if self.db.offer(state):
                fresh.append(state)
                if held is not None and state.incarnation > held.incarnation:
                    self._event(now, "restarted", state.origin, f"incarnation {state.incarnation}")
        if fresh:
            for peer in self._connected():
                if peer != sender:
                    self._send(peer, LinkStates(self.id, tuple(fresh)))

    def _refute_own(self, state: LinkState, now: float) -> None:
        """A copy of our own link state from a previous life is newer than ours: outbid it."""
        if state.key < (self.incarnation, self.version):
            return
        if state.incarnation > self.incarnation:
            self.incarnation = state.incarnation + 1
            self.version = 0
        else:
            self.version = state.version + 1
        self._published = None  # publish again under the new version
        self._publish(now)

    def _on_summary(self, peer: str, summary: DatabaseSummary, now: float) -> None:
        newer = self.db.newer_than(summary.entries)
        if newer:
            self._send(peer, LinkStates(self.id, tuple(newer)))
        if summary.reply and self.db.lacks_any_of(summary.entries):
            self._send_summary(peer, now, reply=False, force=True)

    # ----- the state machine ------------------------------------------------------------

    def _update(self, now: float) -> list[Action]:
        self.dirty, self._updated_at = False, now
        for detector in self.peers.values():
            before = detector.state
            detector.tick(now, self.timing)
            if detector.state is PeerState.DEAD and detector.connected:
                detector.connected = False
                self._out.append(Disconnect(detector.peer))
            if detector.state is not before and detector.state is PeerState.DEAD:
                self._digest_mismatch.pop(detector.peer, None)
        self._publish(now)
        self._refresh_members(now)
        self._elect(now)
        if self.is_leader:
            self._lead(now)
            self.keep = self._keep_on_disk()
        else:
            self._follow(now)
            leader = self.db.states.get(self.leader) if self.leader is not None else None
            self.keep = leader.keep if leader is not None else ()
        self._publish(now)
        out, self._out = self._out, []
        return out

    def _refresh_members(self, now: float) -> None:
        members = self.db.reachable(self.id)
        if members is self._members or members == self._members:
            self._members = members
            return
        for node in sorted(set(members) | set(self._members)):
            old, new = self._members.get(node), members.get(node)
            if old is None and new is not None:
                self._event(now, "joined", node, self._name(node))
            elif new is None:
                left = self.db.states.get(node)
                self._event(now, "left" if left and left.left else "dead", node, self._name(node))
            elif old != new:
                self._event(now, "suspect" if new else "alive", node, self._name(node))
        if set(members) != set(self._members):
            self._members_since = now
        self._members = members

    def _claims(self) -> dict[str, election.Claim]:
        claims = {}
        for node in self._members:
            state = self.db.states.get(node)
            if state is not None:
                claims[node] = election.Claim(state.term, state.leader)
        claims[self.id] = election.Claim(self.term, self.leader)
        return claims

    def _elect(self, now: float) -> None:
        key = (self.db.topology, self.db.claims, self.term, self.leader)
        if key != self._election_key:  # the claims only change with the view
            self._election_key = key
            self._claims_cache = self._claims()
            self._best = election.best_claimant(self._claims_cache)
        claims, best = self._claims_cache, self._best
        if best is None:
            if self.leader is not None:
                self._event(now, "leader", None, "no leader")
                self.leader = None
            if self.leaderless_since is None:
                self.leaderless_since = now
            waited = now - self.leaderless_since >= self.timing.election_delay
            settled = now - self.started_at >= self.timing.startup_grace
            if waited and settled and election.candidate(self._members) == self.id:
                terms = [s.term for s in self.db.states.values()] + [self.term]
                self.term = election.next_term(terms)
                self._become_leader(now)
            return
        self.leaderless_since = None
        if best == self.id:
            highest = max(
                [c.term for c in claims.values()] + [p.term for p in self._visible_plans()]
            )
            if highest > self.term:
                self.term = highest + 1  # never lead below a term someone can see
            return
        if best != self.leader:
            self._event(now, "leader", best, f"{self._name(best)} leads term {claims[best].term}")
        self.leader = best
        self.term = max(self.term, claims[best].term)

    def _become_leader(self, now: float) -> None:
        self.leader = self.id
        self._planned_for = None
        self._event(now, "leader", self.id, f"{self.info.name} leads term {self.term}")

    def _visible_plans(self, preparing: bool = False) -> list[Plan]:
        """The running plans (or the ones being prepared) that we and reachable nodes publish."""
        plans = [p] if (p := self.preparing if preparing else self.plan) else []
        for node in self._members:
            state = self.db.states.get(node)
            if state is not None and (p := state.preparing if preparing else state.plan):
                plans.append(p)
        return plans

    def _lead(self, now: float) -> None:
        """Plan for the group, prepare the plan (every node loads its new stage while the
        old plan keeps serving), and commit it when every node of it reports ready."""
        model = self.model
        if model is None:
            return
        manifest = self.model_manifest()
        plans = [p for p in self._visible_plans() if p.model == model.name]
        newest = max(plans, key=lambda p: p.key, default=None)  # what we run must be newer (or members refuse it)
        members = self._eligible(frozenset(self._members), now) - self._other_models(now)
        ours = max((p for p in plans if p.considered == members and p.manifest in ("", manifest)),
                   key=lambda p: p.key, default=None)  # not one of another model under the name
        if self.preparing is None:  # a new leader takes over what its predecessor prepared
            self.preparing = max((p for p in self._visible_preparing(model.name, manifest)
                                  if p.considered == members), key=lambda p: p.key, default=None)
        if members != self._planned_for:
            self._planned_memory = {}
        if self._memory_moved(members):
            self._event(now, "memory", None, "a node's usable memory changed: planning again")
            self._planned_for, self._planned_memory, ours = None, {}, None
            if self.preparing is not None:
                self._abandon(now, "a node's usable memory changed")
        elif self.preparing is not None and self.preparing.considered == members:
            ours = None  # a newer plan for this same group is on its way
        if ours is not None:
            # A plan made for exactly this group is adopted as it is: a new leader changes
            # nothing. When a member runs a newer plan (the one it made while it was alone),
            # or another as new (alone, with another model under the name), the same stages are
            # stamped newer still, or that member would refuse ours. So are they when the plan
            # was made before the model's manifest was known (its Macs were hashing their copies).
            if any(p.key >= ours.key and p != ours for p in plans) or ours.manifest != manifest:
                ours = replace(ours, term=self.term, epoch=newest.epoch + 1, manifest=manifest)
            self._planned_for = members
            self._planned_memory = self._planned_memory or self._memory_of(members)
            self.no_fit = None
            if self.preparing is not None:
                self._abandon(now, "the group is back to the one the running plan was made for")
            self._accept(ours, now)
            return
        if self.preparing is not None:
            # Joins wait for the commit (a new plan now would restart every load), unless
            # nothing serves yet: at start-up the first Mac must not load the whole model
            # alone before the others, found a moment later, get their share.
            joined_first = self.plan is None and members != self._planned_for
            if set(self.preparing.members) <= members and not joined_first:
                if self._prepared(self.preparing):
                    self._commit(now)
                return
            if now - self._members_since < self.timing.settle:
                return  # keep it until the group settles
            if lost := sorted(set(self.preparing.members) - members):
                self._abandon(now, f"{', '.join(map(self._name, lost))} went away while it loaded")
            self.preparing, self._planned_for = None, None
        if members == self._planned_for and self._missing == self._missing_from_disks(model, members):
            return  # already planned for this group (e.g. the model does not fit)
        if now - self._members_since < self.timing.settle:
            return
        self._planned_for, self._planned_memory = members, self._memory_of(members)
        self._missing = missing = self._missing_from_disks(model, members)
        if missing:
            reason = self._unable_reason(members, missing)
            if self.no_fit != reason:
                self._event(now, "no-fit", None, reason)
            self.no_fit, self.plan, self.preparing = reason, None, None
            return
        infos = self.node_infos()
        previous = self.plan or newest
        placement = self.planner(
            model,
            [infos[n] for n in sorted(members)],
            self.links(),
            context=self.config.context,
            previous=previous.stages if previous else None,
            parallel=self.config.parallel,
        )
        if not placement.fits:
            reason = self._unable_reason(members, placement.reason or "")
            if self.no_fit != reason:
                self._event(now, "no-fit", None, reason)
            self.no_fit, self.plan, self.preparing = reason, None, None
            return
        self.no_fit = None
        epoch = max((p.epoch for p in self._visible_plans() + self._visible_plans(True)), default=0) + 1
        plan = placement.stamp(self.term, epoch, model.name, manifest)
        if self.plan is not None and plan.stages == self.plan.stages:
            self._accept(plan, now)  # nothing moves: nothing to load, commit at once
            return
        self.preparing = plan
        self._prepare_event(now, plan, placement.why)

    def _prepare_event(self, now: float, plan: Plan, why: str | None = None) -> None:
        """`why`: the planner's reason for the shape (groups or layers), on the leader."""
        self._event(now, "prepare", None, f"epoch {plan.epoch}: {self._stages_text(plan)}"
                    + (f" ({why})" if why else ""), {"term": plan.term, "epoch": plan.epoch})

    def _eligible(self, members: frozenset[str], now: float) -> frozenset[str]:
        """The members to plan for: all but those that could not load their layers, until
        the membership changes or their back-off ends (retry_unable, doubling at each
        failure in a row): a Mac whose model copy was repaired is used again."""
        if members != self._unable_in:
            self._unable, self._unable_failures, self._unable_in = {}, {}, members
        shards = self.shards()
        for stage in self.plan.stages if self.plan is not None else ():
            held = shards.get(stage.node)
            # it loads again: the back-off restarts. Not while it waits out a failure: a Mac
            # whose directory vanished still serves the running plan's stage from memory
            # while its load of the next one fails (its count is what the back-off reads)
            if held is not None and held.serving == self.plan.epoch and stage.node not in self._unable:
                self._unable_failures.pop(stage.node, None)
        for node, since in list(self._unable.items()):
            failures = self._unable_failures[node]
            if now - since >= self._retry_wait(node):
                del self._unable[node]
                self._planned_for = None
                self._event(now, "retry", node, f"{self._name(node)} is planned for again "
                            f"({failures} failed load{'s' if failures > 1 else ''} in a row)")
        for plan in (self.preparing, self.plan):
            for stage in plan.stages if plan is not None else ():
                held = shards.get(stage.node)
                if held is not None and held.failed and stage.node not in self._unable \
                        and (held.start, held.end, held.epoch) == (stage.start, stage.end, plan.epoch):
                    self._unable[stage.node] = now
                    self._unable_failures[stage.node] = self._unable_failures.get(stage.node, 0) + 1
                    self._unable_why[stage.node] = held.failed
                    self._event(now, "load-failed", stage.node, f"{self._name(stage.node)} could not "
                                f"load layers {stage.start}-{stage.end - 1}: {held.failed}")
                    if plan is self.preparing:
                        self._abandon(now, f"{self._name(stage.node)} could not load its layers")
                    self._planned_for = None
        return members - frozenset(self._unable)

    def _retry_wait(self, node: str) -> float:
        """How long a member that could not load waits to be planned for again."""
        failures = self._unable_failures[node]
        return min(self.timing.retry_unable * 2 ** (failures - 1), self.timing.retry_unable_max)

    def _other_models(self, now: float) -> frozenset[str]:
        """The members other_models() names, with an event for each as it is first left out."""
        others = self.other_models()
        for node in sorted(others.keys() - self._others.keys()):
            self._event(now, "other-model", node, f"{others[node]}: left out of the plan")
        self._others = others
        return frozenset(others)

    def _unable_reason(self, eligible: frozenset[str], reason: str) -> str:
        """The planner's reason, led by the members left out because they could not load
        their layers (a damaged or vanished model directory) or hold another model under its
        name: that is what to repair."""
        unable = [f"{self._name(n)} could not load its layers: {self._unable_why.get(n, '')}"
                  for n in sorted(self._unable) if n in self._members]
        unable += [why for _, why in sorted(self._others.items())]
        if not unable:
            return reason
        return "; ".join(unable) + (f"; the other Macs alone: {reason}" if eligible else "")

    def _missing_from_disks(self, model: ModelSpec, members: frozenset[str]) -> str | None:
        """Why the model cannot serve when some of its layers are on no member's disk nor in
        its memory (a Mac fetches its layers from its peers' disks, or from the shards a peer
        holds whose disk lost them: a plan that needed a missing one would half-load), else
        None. Members that publish no disk state hold the whole model."""
        disks = self.disks()
        if not members or any(n not in disks for n in members):
            return None  # no one to plan for (they could not load: another reason), or unknown disks
        held = [d for n, d in disks.items() if n in members and d.model == model.name]
        missing = [i for i in range(model.num_layers) if not any(d.serves(i, i + 1) for d in held)]
        ends = [end for end in ENDS if not any(d.serves_end(end) for d in held)]
        if not missing and not ends:
            return None
        what = [f"layers {a}-{b - 1}" if b - a > 1 else f"layer {a}" for a, b in ranges_of(missing)]
        what += [{FIRST: "the embedding", LAST: "the head"}[end] for end in ends]
        return (f"{', '.join(what)} of {model.name}: on no reachable Mac's disk; start a Mac that "
                "holds them (tbmesh daemon --model DIR), or pull them (tbmesh model pull)")

    def _keep_on_disk(self) -> tuple[KeepOnDisk, ...]:
        model, disks = self.model, self.disks()
        if model is None or not disks or self.plan is None:
            return ()
        others = self.other_models()  # their copies are another model's
        return keep_on_disk(model, {n: d for n, d in disks.items() if n in self._members and n not in others},
                            self.plan.stages, self.config.replicas)

    def my_keep(self) -> KeepOnDisk | None:
        """What the leader asks us to keep on disk besides our stage."""
        return next((k for k in self.keep if k.node == self.id), None)

    def _memory_of(self, members: frozenset[str]) -> dict[str, int]:
        infos = self.node_infos()
        return {n: infos[n].memory_usable for n in members if n in infos}

    def _memory_moved(self, members: frozenset[str]) -> bool:
        """Whether a member's usable memory moved by more than MEMORY_CHANGE since we planned."""
        infos = self.node_infos()
        return any(abs(infos[n].memory_usable - held) > MEMORY_CHANGE * held
                   for n, held in self._planned_memory.items() if n in members and n in infos)

    def _abandon(self, now: float, why: str) -> None:
        self._event(now, "abandoned", None, f"epoch {self.preparing.epoch}: {why}")
        self.preparing = None

    def _visible_preparing(self, model: str, manifest: str) -> list[Plan]:
        running = self.plan.key if self.plan else (0, 0)
        return [p for p in self._visible_plans(True)
                if p.model == model and p.manifest in ("", manifest) and p.key > running]

    def _prepared(self, plan: Plan) -> bool:
        shards = self.shards()
        return all((held := shards.get(m)) is not None and held.ready
                   and (held.start, held.end, held.epoch) == (s.start, s.end, plan.epoch)
                   for s in plan.stages for m in s.members)

    def _commit(self, now: float) -> None:
        plan, self.preparing = self.preparing, None
        self._accept(plan, now)

    def _follow(self, now: float) -> None:
        if self.leader is None:
            return
        state = self.db.states.get(self.leader)
        if state is None:
            return
        if state.plan is not None:
            if self.plan is None or state.plan.key > self.plan.key:
                self._accept(state.plan, now)
            self.no_fit = None
        elif state.no_fit is not None:
            self.plan, self.no_fit = None, state.no_fit
        preparing = state.preparing
        if preparing is not None and self.plan is not None and preparing.key <= self.plan.key:
            preparing = None  # committed already, or fenced off
        if preparing is not None and preparing != self.preparing:
            self._prepare_event(now, preparing)
        self.preparing = preparing

    def _accept(self, plan: Plan, now: float) -> None:
        """Run `plan`, refusing anything older than what we run (stale terms are fenced)."""
        if self.plan is not None and plan.key < self.plan.key:
            return
        if plan != self.plan:
            self._event(now, "plan", None, f"epoch {plan.epoch} term {plan.term}: {self._stages_text(plan)}",
                        {"term": plan.term, "epoch": plan.epoch})
        self.plan = plan

    # ----- output helpers ----------------------------------------------------------------

    def _publish(self, now: float) -> None:
        """Flood our link state when anything in it changed."""
        neighbours = []
        for peer, detector in sorted(self.peers.items()):
            if detector.state is PeerState.DEAD or self._left:
                continue
            neighbours.append(
                Adjacency(peer, detector.state is PeerState.SUSPECT,
                          self._rtt_to_publish(peer, detector.rtt_s), detector.bytes_per_s, detector.rdma,
                          detector.connections)
            )
        state = LinkState(
            origin=self.id,
            incarnation=self.incarnation,
            version=self.version,
            info=self.info,
            neighbours=tuple(neighbours),
            term=self.term,
            leader=self.leader,
            plan=self.plan,
            preparing=self.preparing,
            no_fit=self.no_fit if self.is_leader else None,
            shard=self.shard,
            disk=self.disk,
            keep=self.keep if self.is_leader else (),
            left=self._left,
        )
        if self._published is not None and replace(self._published, version=self.version) == state:
            return
        if self._published is not None:
            self.version += 1
            state = replace(state, version=self.version)
        self._published = state
        self.db.offer(state)
        for peer in self._connected():
            self._send(peer, LinkStates(self.id, (state,)))

    def _rtt_to_publish(self, peer: str, rtt: float) -> float:
        # Republish only on a large change: every new version floods the whole cluster.
        held = self._published_rtt.get(peer, 0.0)
        if held == 0.0 or abs(rtt - held) > 0.5 * held + 50e-6:
            self._published_rtt[peer] = rtt
            return rtt
        return held

    def _heartbeat(self, peer: str, now: float) -> Heartbeat:
        self.seq += 1
        detector = self.peers[peer]
        hold = now - detector.echo_received if detector.echo_at else 0.0
        return Heartbeat(self.id, self.incarnation, self.seq, now, detector.echo_at, hold,
                         self.db.digest())

    def _send_summary(self, peer: str, now: float, reply: bool, force: bool = False) -> None:
        if not force and now - self._last_summary.get(peer, -1e9) < self.timing.summary_interval:
            return
        self._last_summary[peer] = now
        self._digest_mismatch[peer] = 0
        self._send(peer, DatabaseSummary(self.id, self.db.summary(), reply))

    def _connected(self) -> list[str]:
        return [p for p, d in sorted(self.peers.items())
                if d.connected and d.state is not PeerState.DEAD]

    def _send(self, peer: str, message: Message) -> None:
        self._out.append(Send(peer, message))

    def _stages_text(self, plan: Plan) -> str:
        return ", ".join(f"{'+'.join(map(self._name, s.members))} {s.start}-{s.end - 1}" for s in plan.stages)

    def _name(self, node: str) -> str:
        if node == self.id:
            return self.info.name
        state = self.db.states.get(node)
        return state.info.name if state else node

    def _event(self, now: float, kind: str, node: str | None, detail: str,
               data: dict | None = None) -> None:
        self.events.append(Event(now, kind, node, detail, data or {}))
