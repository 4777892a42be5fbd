"""What the data plane sees of the daemon (tbmesh.serving.host.Host): the serving engine and
the disk are handed this, never the daemon, and reach the cluster only through it."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Protocol

from tbmesh.core.messages import DiskState, ShardState
from tbmesh.net import peers
from tbmesh.serving.view import ClusterView

if TYPE_CHECKING:
    from tbmesh.core.cluster import ClusterNode
    from tbmesh.core.types import LinkInfo
    from tbmesh.node.bulk_service import BulkService
    from tbmesh.node.connections import Connections
    from tbmesh.node.control import ControlPlane


class Parts(Protocol):
    """The daemon's parts a host reads (tbmesh.node.daemon.Daemon), each made at start."""

    loop: asyncio.AbstractEventLoop
    core: ClusterNode
    control: ControlPlane
    connections: Connections
    bulk: BulkService

    def view(self) -> ClusterView: ...


class NodeHost:
    """A Host over a daemon's parts, read when called: the disk is handed it at start, before
    the core and the connections are made."""

    def __init__(self, daemon: Parts) -> None:
        self._daemon = daemon
        self.loop = daemon.loop

    @property
    def me(self) -> str:
        return self._daemon.core.id

    @property
    def name(self) -> str:
        return self._daemon.core.info.name

    def view(self) -> ClusterView:
        return self._daemon.view()

    def send(self, node: str, message: object) -> bool:
        """Send to `node` directly, or through the neighbour on the shortest path to it
        (a chain of Macs without a bridge: the entry and stage 0 may be two cables apart)."""
        channels = self._daemon.connections.channels
        core = self._daemon.core
        channel = channels.get(node) or channels.get(next_hop(core.id, core.links(), channels, node) or "")
        return channel is not None and channel.send(message)

    def shard_changed(self, state: ShardState | None) -> None:
        self._daemon.control.set_shard(state)

    def disk_changed(self, state: DiskState | None) -> None:
        self._daemon.control.set_disk(state)

    def record(self, kind: str, node: str | None, detail: str) -> None:
        self._daemon.control.record(kind, node, detail)

    def group_addresses(self, members: Sequence[str]) -> list[str]:
        """The IP address each member of a tensor group is reached at, from here: a member's,
        the far end of our connection to it; ours, the near end of our connection to the
        member before us (the ring's neighbour that dials us; a group's members are cabled
        all to all). Raises ConnectionError when we have no connection to a member."""
        me, channels = self.me, self._daemon.connections.channels
        behind = members[(members.index(me) - 1) % len(members)]
        found = []
        for member in members:
            channel = channels.get(behind if member == me else member)
            name = "sockname" if member == me else "peername"
            address = channel.writer.get_extra_info(name) if channel is not None else None
            if not address:
                other = behind if member == me else member
                raise ConnectionError(f"no direct connection to {self.view().name(other)}, a member of the group")
            found.append(address[0])
        return found

    def bulk_connect(self, node: str) -> peers.Detached:
        return self._daemon.bulk.connect(node)


def next_hop(me: str, links: Sequence[LinkInfo], connected: Container[str], node: str) -> str | None:
    """The neighbour (one of `connected`) on the shortest path from `me` to `node` over
    `links`, the smaller id among equals; None when no path leads there."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for link in links:
        graph[link.a].add(link.b)
        graph[link.b].add(link.a)
    first_hop = {n: n for n in graph[me] if n in connected}
    queue = collections.deque(sorted(first_hop))
    while queue:
        here = queue.popleft()
        if here == node:
            return first_hop[here]
        for there in sorted(graph[here]):
            if there not in first_hop and there != me:
                first_hop[there] = first_hop[here]
                queue.append(there)
    return None
