"""The narrow interface the serving engine is handed instead of the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from tbmesh.core.messages import DiskState, ShardState
from tbmesh.net.peers import Detached
from tbmesh.serving.view import ClusterView


class Host(Protocol):
    me: str  # our node id
    name: str  # and name
    loop: asyncio.AbstractEventLoop

    def view(self) -> ClusterView:
        """The cluster as the control plane sees it now."""

    def send(self, node: str, message: object) -> bool:
        """Send a data-plane message to `node` (directly, or through a neighbour); False when
        no connection leads there."""

    def shard_changed(self, state: ShardState | None) -> None:
        """What we hold or load changed: publish it to the cluster."""

    def record(self, kind: str, node: str | None, detail: str) -> None:
        """An event for the event log (a request resumed, ...)."""

    def disk_changed(self, state: DiskState | None) -> None:
        """What we keep on disk (or fetch) changed: publish it to the cluster."""

    def group_addresses(self, members: Sequence[str]) -> list[str]:
        """The IP address of each member of a tensor group (ours among them) for its ranks to
        listen on and dial. Raises ConnectionError when a member is not directly connected."""

    def bulk_connect(self, node: str) -> Detached:
        """A handshaken bulk connection to `node` for fetching weights, taken out of asyncio
        (a blocking socket, the bytes already read from it, its TLS session). Blocking: call it from a thread, never the loop.
        Raises OSError when `node` cannot be reached."""
