"""Weights over the cables, the connections' side: bulk connections dialled for a fetch's
thread, and the ones peers dial to fetch from our disk, served each in a thread of its own
(blocking sends, sendfile) within the caps of `tbmesh.weights.bulk.Served`."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from tbmesh.net import peers
from tbmesh.node.connections import Connections
from tbmesh.weights import bulk

if TYPE_CHECKING:
    from tbmesh.serving.disk import Disk

log = logging.getLogger("tbmesh")

BULK_DIAL_TIMEOUT_S = 10.0  # a fetch's dial to a peer, handshake included


class BulkService:
    def __init__(self, connections: Connections, disk: Callable[[], Disk | None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._connections = connections
        self._disk = disk  # the model's weights on our disk (None: nothing to serve)
        self._loop = loop
        self._stop = threading.Event()  # set at stop: the bulk connections we serve end
        self._served = bulk.Served()  # the bulk connections we serve, within their caps

    def connect(self, node: str) -> peers.Detached:
        """A bulk connection to `node`, from a fetch's thread (the dial runs on the loop)."""
        future = asyncio.run_coroutine_threadsafe(self._dial(node), self._loop)
        return future.result(BULK_DIAL_TIMEOUT_S)

    async def _dial(self, node: str) -> peers.Detached:
        found = self._connections.known.get(node)
        if found is None:
            raise ConnectionError(f"no address known for {node}")
        try:
            channel = await self._connections.dial(found, "bulk")
        except peers.Refused as error:
            raise ConnectionError(str(error)) from None
        return channel.detach()

    async def serve(self, channel: peers.Channel, address: str) -> None:
        """A peer fetches weights from us (an accepted connection whose purpose is "bulk"), or
        is refused at once, saying why."""
        disk = self._disk()
        local = disk.serving() if disk is not None else None
        if local is None:
            why: str | None = "refused: no weights to serve here"
            await bulk.refuse(channel, why)
        else:
            why = await bulk.serve_or_refuse(channel, local, self._served, self._stop)
        if why is not None:
            self._connections.refused(address, "refused a bulk connection from %s (%s): %s",
                                      channel.peer.name, address, why)

    def stop(self) -> None:
        """The bulk connections we serve end."""
        self._stop.set()
