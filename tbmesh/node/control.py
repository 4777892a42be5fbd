"""The control plane on the event loop: the pure core (`tbmesh.core.cluster.ClusterNode`)
fed with the time, its actions carried out, and one timer armed for its next deadline.

Every call into the core goes through `carry_out`, which sends what the core returns, tells
the data plane what changed for it, and re-arms the timer from `ClusterNode.next_deadline()`
(a heartbeat received moves a suspicion, a member joining restarts the leader's settling).
There is no fixed tick: an idle node wakes for its heartbeats and nothing else. A message
received owes a flush, due at once: the timer then runs soon after the burst it came in
(every message already read), one recomputation for all of them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Protocol

from tbmesh.core.cluster import ClusterNode
from tbmesh.core.messages import Action, Disconnect, DiskState, Event, Send, ShardState
from tbmesh.core.status import StatusEvent

if TYPE_CHECKING:
    from tbmesh.node.telemetry import Telemetry
    from tbmesh.serving.engine import Engine

log = logging.getLogger("tbmesh")

# Events after which messages to or from the node may have been lost with its connection.
LOSSY = frozenset({"suspect", "dead", "left", "restarted"})
EVENTS_KEPT = 200  # the event log /status shows the end of
# A timer fires this much after its deadline rather than a hair before it (uvloop counts
# whole milliseconds): early, the core would have nothing to do yet and the timer re-armed.
TIMER_SLACK_S = 0.001
RETRY_AFTER_FAILURE_S = 1.0  # after the core's tick raised (a bug), its timer fires again this late


class Links(Protocol):
    """Where the core's messages go (tbmesh.node.connections.Connections)."""

    def send_direct(self, peer: str, message: object) -> bool: ...

    def close(self, peer: str, reason: str) -> None: ...


def now() -> float:
    """The core's clock. Not loop.time(): uvloop's counts whole milliseconds, too coarse for
    a Thunderbolt RTT."""
    return time.monotonic()


class ControlPlane:
    def __init__(self, core: ClusterNode, links: Links, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.links = links
        self.loop = loop
        self.engine: Engine | None = None  # the data plane, once made: told of trouble and plans
        self.telemetry: Telemetry | None = None  # told of every event, when --mqtt
        self.events: collections.deque[StatusEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self.ticks = 0  # times the timer fired (tests, benchmarks)
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None  # the deadline the timer is armed for
        self._running = False  # between start() and stop(): the timer is armed only then
        self._sound_links: dict[frozenset[str], dict[str, int]] = {}  # as the engine last heard
        self._last_view: tuple | None = None  # (plan, preparing) the engine last saw

    now = staticmethod(now)

    def carry_out(self, actions: list[Action]) -> None:
        """Carry out what a call into the core returned, then arm the timer for its next deadline."""
        core = self.core
        for action in actions:
            if isinstance(action, Send):
                self.links.send_direct(action.to, action.message)
            elif isinstance(action, Disconnect):
                self.links.close(action.peer, "declared dead")
        for event in core.drain_events():
            self._record(event)
            if event.kind in LOSSY and event.node is not None and self.engine is not None:
                self.engine.on_node_trouble(event.node, gone=event.kind != "suspect")
        sound = core.sound_links()
        if sound != self._sound_links:
            troubled, self._sound_links = core.troubled_links(self._sound_links, sound), sound
            for pair in troubled if self.engine is not None else ():
                self.engine.on_link_trouble(*sorted(pair))
        view = (core.plan, core.preparing)
        if self.engine is not None and view != self._last_view:
            self._last_view = view
            self.engine.on_view(*view)
        elif self.engine is not None:
            self.engine.on_cluster_change()  # a member's shard, a suspicion: waiting requests look again
        self._arm(core.next_deadline())

    def set_shard(self, state: ShardState | None) -> None:
        """What our runtime holds or loads changed: published when it differs."""
        if state != self.core.shard:
            self.carry_out(self.core.set_shard(state, self.now()))

    def set_disk(self, state: DiskState | None) -> None:
        """What our disk keeps (or fetches) changed: published when it differs."""
        if state != self.core.disk:
            self.carry_out(self.core.set_disk(state, self.now()))

    def record(self, kind: str, node: str | None, detail: str) -> None:
        """An event of the data plane (a request resumed, ...) for the event log."""
        self._record(Event(self.now(), kind, node, detail))

    def start(self) -> None:
        """Arm the timer from now on: once the node listens and discovery runs, as its start-up
        grace (its election alone) means to count while it can hear from peers."""
        self._running = True
        self._arm(self.core.next_deadline())

    def stop(self) -> None:
        """No timer any more (the core has left)."""
        self._running = False
        self._arm(None)

    def _record(self, event: Event) -> None:
        self.events.append(StatusEvent(event.at, event.kind, event.node, event.detail))
        log.info("%s %s", event.kind, event.detail)
        if self.telemetry is not None:
            self.telemetry.event(self.events[-1])

    def _arm(self, deadline: float | None) -> None:
        if not self._running:
            deadline = None
        if deadline == self._armed_for:  # None: no timer
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.now())
            self._timer = self.loop.call_later(delay + TIMER_SLACK_S if delay else 0.0, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_for = None, None
        self.ticks += 1
        try:
            self.carry_out(self.core.tick(self.now()))
        except Exception:  # a bug must not stop the heartbeats for good: try again later
            log.exception("the core's timer failed: trying again in %g s", RETRY_AFTER_FAILURE_S)
            self._arm(self.now() + RETRY_AFTER_FAILURE_S)
