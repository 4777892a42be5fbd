"""A deterministic discrete-event simulator for clusters of core nodes.

It plays the shell's part for N `ClusterNode`s against a virtual clock: connections over
cables, message delays (FIFO per direction, as TCP), random drops, network partitions,
crashes (with or without a connection reset reaching the peers), restarts with a new
incarnation, graceful leaves, and joins. The same seed gives the same run.

Each node is ticked on a fixed interval, or with `timers` as the daemon runs it: one timer
armed for `ClusterNode.next_deadline()` after every call into the node, and no tick besides.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tbmesh.core.assignment import Assignment, Range
from tbmesh.core.cluster import ClusterNode, CoreConfig, Planner
from tbmesh.core.messages import Action, Disconnect, DiskState, Event, Message, Send
from tbmesh.core.types import NodeInfo
from tbmesh.serving import keeper as k

GB = 10**9


def make_info(node_id: str, memory_usable: int = 64 * GB) -> NodeInfo:
    return NodeInfo(node_id, node_id, "sim", memory_usable * 4 // 3, memory_usable, 1e13)


@dataclass
class NetworkModel:
    delay: float = 0.0005  # one-way latency of a message, seconds
    jitter: float = 0.0005  # uniform extra delay
    drop: float = 0.0  # probability that a message is lost
    connect_delay: float = 0.005  # TCP + hello
    reconnect_interval: float = 0.5  # how often the shell retries a missing connection
    flush_delay: float = 0.001  # the shell runs the core's flush this soon after a receive
    load_delay: float = 0.05  # a node's runtime takes this long to load a shard
    load_retry: float = k.LOAD_RETRY_S  # a load that failed is tried again after this


@dataclass
class Stats:
    messages: int = 0
    dropped: int = 0
    events: list[tuple[str, Event]] = field(default_factory=list)


class Simulator:
    TIMERS = False  # the default of `timers` (a test module may run all its scenarios both ways)

    def __init__(
        self,
        seed: int = 0,
        config: CoreConfig | None = None,
        network: NetworkModel | None = None,
        keep_events: bool = True,
        planner: Planner | None = None,
        timers: bool | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.timers = self.TIMERS if timers is None else timers
        self.ticks = 0  # the nodes' ticks (fixed or timed), for comparing the two
        self.planner = planner
        self.config = config or CoreConfig()
        self.net = network or NetworkModel()
        self.now = 0.0
        self.nodes: dict[str, ClusterNode] = {}  # running nodes
        self.infos: dict[str, NodeInfo] = {}  # every node ever added, for restarts
        self.configs: dict[str, CoreConfig] = {}  # nodes configured apart from `config`
        self.incarnations: dict[str, int] = {}
        self.cables: set[frozenset[str]] = set()
        self.rdma: set[frozenset[str]] = set()  # cables whose two ports have an RDMA device
        self.blocked: set[frozenset[str]] = set()
        self.connections: set[frozenset[str]] = set()
        self.stats = Stats()
        self.keep_events = keep_events
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._fifo: dict[tuple[str, str], float] = {}
        self._flush_pending: set[str] = set()
        self.keepers: dict[str, k.Keeper] = {}  # node -> its runtime's keeper (as the daemon's engine)
        self.loads: dict[str, list[Range]] = {}  # node -> every range it loaded
        self.unloadable: set[str] = set()  # nodes whose loads fail (a damaged model copy)
        self._followed: dict[str, tuple] = {}
        self._armed: dict[str, tuple[ClusterNode, float | None]] = {}  # node -> (its core, its timer's deadline)
        self._schedule(self.net.reconnect_interval, self._reconnect_loop)

    # ----- scenario verbs ------------------------------------------------------------

    def add_node(self, info: NodeInfo | str, config: CoreConfig | None = None) -> ClusterNode:
        if isinstance(info, str):
            info = make_info(info)
        self.infos[info.id] = info
        if config is not None:
            self.configs[info.id] = config
        return self._start(info.id)

    def set_disk(self, node: str, disk: DiskState | None) -> None:
        """What `node` keeps on disk changed (a fetch ended, a Mac with weights came)."""
        self._carry_out(node, self.nodes[node].set_disk(disk, self.now))

    def cable(self, a: str, b: str, rdma: bool = False) -> None:
        """Plug a cable; the shells connect at once (as on a link-up event). With `rdma` both
        ends publish their port's RDMA device ("rdma_<peer>" here), as a daemon does."""
        self.cables.add(frozenset((a, b)))
        if rdma:
            self.rdma.add(frozenset((a, b)))
        self._connect(a, b)

    def unplug(self, a: str, b: str) -> None:
        """Pull a cable: the connection dies silently; only heartbeats notice."""
        pair = frozenset((a, b))
        self.cables.discard(pair)
        self.rdma.discard(pair)
        self.connections.discard(pair)

    def crash(self, node: str, reset: bool = True) -> None:
        """Kill a node. With `reset` its peers' connections close (kill -9);
        without, they hear nothing more (power cut)."""
        self.nodes.pop(node, None)
        for pair in [p for p in self.connections if node in p]:
            self.connections.discard(pair)
            (peer,) = pair - {node}
            if reset and self._usable(pair):
                self._later(self.net.delay, peer, lambda n, p=node: n.peer_disconnected(p, self.now))

    def restart(self, node: str) -> ClusterNode:
        return self._start(node)

    def leave(self, node: str) -> None:
        running = self.nodes.get(node)
        if running is None:
            return
        self._carry_out(node, running.leave(self.now))
        self._schedule(self.net.delay * 4, lambda: self.crash(node, reset=True))

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every cable between different groups (silently, like a dead switch)."""
        sets = [set(g) for g in groups]
        for pair in self.cables:
            a, b = tuple(pair)
            if not any(a in g and b in g for g in sets):
                self.blocked.add(pair)

    def heal(self) -> None:
        self.blocked.clear()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(self, until: float) -> None:
        while self._queue and self._queue[0][0] <= until:
            at, _, action = heapq.heappop(self._queue)
            self.now = at
            action()
        self.now = until

    def run_until_true(self, condition: Callable[[], bool], limit: float, step: float = 0.01) -> float | None:
        """Run until `condition()` holds; returns the virtual time, or None at the limit."""
        end = self.now + limit
        while self.now < end:
            if condition():
                return self.now
            self.run_until(min(end, self.now + step))
        return self.now if condition() else None

    # ----- checks ----------------------------------------------------------------------

    def components(self) -> list[set[str]]:
        """Groups of running nodes joined by usable cables."""
        seen: set[str] = set()
        groups = []
        for start in sorted(self.nodes):
            if start in seen:
                continue
            group, stack = {start}, [start]
            while stack:
                here = stack.pop()
                for pair in self.cables:
                    if here in pair and self._usable(pair):
                        (there,) = pair - {here}
                        if there in self.nodes and there not in group:
                            group.add(there)
                            stack.append(there)
            seen |= group
            groups.append(group)
        return groups

    def leaders(self, group: set[str]) -> set[str | None]:
        return {self.nodes[n].leader for n in group}

    def converged(self) -> bool:
        """Each group follows exactly one leader of its own, which knows it leads,
        and every member sees exactly the group."""
        for group in self.components():
            leaders = self.leaders(group)
            if len(leaders) != 1:
                return False
            (leader,) = leaders
            if leader not in group or not self.nodes[leader].is_leader:
                return False
            if any(set(self.nodes[n].members()) != group for n in group):
                return False
        return True

    def plans_agree(self) -> bool:
        """Each group runs one committed plan, made for exactly that group (or knows why
        the model does not fit it), and prepares nothing more."""
        for group in self.components():
            plans = {self.nodes[n].plan for n in group}
            if len(plans) != 1:
                return False
            (plan,) = plans
            if plan is not None and plan.considered != group:
                return False
            if any(self.nodes[n].preparing is not None for n in group):
                return False  # still loading the next one
            if plan is None and any(self.nodes[n].model is not None for n in group) \
                    and not any(self.nodes[n].no_fit for n in group):
                return False  # not planned yet
        return True

    # ----- the shell ---------------------------------------------------------------------

    def _start(self, node: str) -> ClusterNode:
        incarnation = self.incarnations.get(node, 0) + 1
        self.incarnations[node] = incarnation
        core = ClusterNode(self.infos[node], incarnation, self.now, self.configs.get(node, self.config),
                           self.planner)
        self.nodes[node] = core
        self.keepers[node] = k.Keeper(retry_s=self.net.load_retry)  # a restart loses what was in memory
        self._followed.pop(node, None)
        phase = self.rng.random() * self.config.timing.heartbeat_interval / 2  # drawn either way: the same run
        if self.timers:
            self._arm(node, core)
        else:
            self._schedule(phase, lambda: self._tick(node, core))
        for pair in sorted(self.cables, key=sorted):
            if node in pair:
                (peer,) = pair - {node}
                self._connect(node, peer)
        return core

    def _tick(self, node: str, core: ClusterNode) -> None:
        if self.nodes.get(node) is not core:
            return  # crashed or restarted since this tick was scheduled
        self.ticks += 1
        self._carry_out(node, core.tick(self.now))
        self._schedule(self.config.timing.heartbeat_interval / 2, lambda: self._tick(node, core))

    def _arm(self, node: str, core: ClusterNode) -> None:
        """Arm the node's one timer for its core's next deadline (the one armed before, if
        another, will find itself superseded)."""
        deadline = core.next_deadline()
        if self._armed.get(node) == (core, deadline):
            return
        self._armed[node] = (core, deadline)
        if deadline is None:
            return

        def fire() -> None:
            if self.nodes.get(node) is not core or self._armed.get(node) != (core, deadline):
                return  # crashed, restarted, or re-armed since
            del self._armed[node]
            self.ticks += 1
            self._carry_out(node, core.tick(self.now))

        self._schedule_at(deadline, fire)

    def _usable(self, pair: frozenset[str]) -> bool:
        return pair in self.cables and pair not in self.blocked

    def _connect(self, a: str, b: str) -> None:
        pair = frozenset((a, b))
        if pair in self.connections or a not in self.nodes or b not in self.nodes:
            return
        if not self._usable(pair):
            return
        self.connections.add(pair)
        inc_a, inc_b = self.nodes[a].incarnation, self.nodes[b].incarnation  # the hello
        self._later(self.net.connect_delay, a, lambda n: n.peer_connected(b, inc_b, self.now), pair)
        self._later(self.net.connect_delay, b, lambda n: n.peer_connected(a, inc_a, self.now), pair)
        # each end's device, set on every connection as the daemon does (the cable may have moved)
        at_a, at_b = (f"rdma_{b}", f"rdma_{a}") if pair in self.rdma else ("", "")
        self._later(self.net.connect_delay, a, lambda n: n.set_link_rdma(b, at_a, self.now), pair)
        self._later(self.net.connect_delay, b, lambda n: n.set_link_rdma(a, at_b, self.now), pair)

    def _reconnect_loop(self) -> None:
        for pair in sorted(self.cables, key=sorted):
            a, b = sorted(pair)
            self._connect(a, b)
        self._schedule(self.net.reconnect_interval, self._reconnect_loop)

    def _carry_out(self, node: str, actions: list[Action]) -> None:
        core = self.nodes.get(node)
        if core is not None and self.keep_events:
            self.stats.events.extend((node, e) for e in core.drain_events())
        elif core is not None:
            core.events.clear()
        for action in actions:
            if isinstance(action, Send):
                self._transmit(node, action.to, action.message)
            elif isinstance(action, Disconnect):
                pair = frozenset((node, action.peer))
                if pair in self.connections:
                    self.connections.discard(pair)
                    if self._usable(pair):
                        peer = action.peer
                        self._later(self.net.delay, peer,
                                    lambda n, p=node: n.peer_disconnected(p, self.now))

        if core is not None and core.model is not None:
            self._follow_plan(node, core)
        if core is not None and self.timers:
            self._arm(node, core)

    @property
    def held(self) -> dict[str, set[Range]]:
        """node -> the layer ranges its runtime holds."""
        return {node: keeper.held for node, keeper in self.keepers.items()}

    def _follow_plan(self, node: str, core: ClusterNode) -> None:
        """The runtime's part, by the daemon's own rules (serving.keeper): load the stage the
        plans give us (taking load_delay), drop what no plan wants, publish what we hold."""
        seen = (core.plan, core.preparing)
        if self._followed.get(node) == seen:
            return
        self._followed[node] = seen
        assignment = Assignment.of(node, core.model.name, core.plan, core.preparing,
                                   core.model, core.info.memory_usable, core.config.context)
        self._keep(node, core, self.keepers[node].assign(assignment, self.now, set()))

    def _keep(self, node: str, core: ClusterNode, actions: list[k.Action]) -> None:
        keeper = self.keepers[node]

        def running() -> bool:
            return self.nodes.get(node) is core and self.keepers.get(node) is keeper

        for action in actions:
            if isinstance(action, k.Load):
                def loaded(target: Range = action.target) -> None:
                    if not running():
                        return
                    if keeper.loading != target:
                        keeper.load_abandoned(target)  # a newer plan wants other layers
                    elif node in self.unloadable:
                        self._keep(node, core, keeper.load_failed(target, "unreadable", self.now, set()))
                    else:
                        self.loads.setdefault(node, []).append(target)
                        self._keep(node, core, keeper.loaded(target, self.now, set()))

                self._schedule(self.net.load_delay, loaded)
            elif isinstance(action, k.Publish):
                if action.state != core.shard:
                    self._carry_out(node, core.set_shard(action.state, self.now))
            elif isinstance(action, k.WakeAt):
                self._schedule(max(0.0, action.at - self.now),
                               lambda: running() and self._keep(node, core, keeper.tick(self.now, set())))

    def _transmit(self, src: str, dst: str, message: Message) -> None:
        pair = frozenset((src, dst))
        if pair not in self.connections or not self._usable(pair):
            return
        self.stats.messages += 1
        if self.net.drop and self.rng.random() < self.net.drop:
            self.stats.dropped += 1
            return
        at = self.now + self.net.delay + self.rng.random() * self.net.jitter
        at = max(at, self._fifo.get((src, dst), 0.0))
        self._fifo[(src, dst)] = at
        self._schedule(at - self.now, lambda: self._deliver(src, dst, message, pair))

    def _deliver(self, src: str, dst: str, message: Message, pair: frozenset[str]) -> None:
        core = self.nodes.get(dst)
        if core is None or pair not in self.connections or not self._usable(pair):
            return
        self._carry_out(dst, core.receive(src, message, self.now))
        if core.dirty and dst not in self._flush_pending and not self.timers:  # timed: the flush is its deadline
            self._flush_pending.add(dst)
            self._schedule(self.net.flush_delay, lambda: self._flush(dst, core))

    def _flush(self, node: str, core: ClusterNode) -> None:
        self._flush_pending.discard(node)
        if self.nodes.get(node) is core:
            self._carry_out(node, core.flush(self.now))

    def _later(self, delay: float, node: str, call: Callable[[ClusterNode], list[Action]],
               pair: frozenset[str] | None = None) -> None:
        target = self.nodes.get(node)

        def run() -> None:
            core = self.nodes.get(node)
            if core is None or core is not target:
                return
            if pair is not None and pair not in self.connections:
                return
            self._carry_out(node, call(core))

        self._schedule(delay, run)

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._order), action))

    def _schedule_at(self, at: float, action: Callable[[], None]) -> None:
        """At `at` exactly (now + (at - now) may round below it), or now if it is past."""
        heapq.heappush(self._queue, (max(at, self.now), next(self._order), action))
