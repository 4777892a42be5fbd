"""Bandwidth probes: a link's bandwidth measured on a connection of its own (purpose "probe")
whenever a link appears, and again on POST /probe. Both ends publish the figure the
receiver measured."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tbmesh.net import peers, probe, wire
from tbmesh.node.connections import Connections

log = logging.getLogger("tbmesh")

PROBE_SECONDS = 0.5  # how long the dialer streams
GO_TIMEOUT_S = 2.0  # how long the dialer waits for the answer's go-ahead


class Probes:
    def __init__(self, connections: Connections, me: Callable[[], peers.Me],
                 measured: Callable[[str, float], None]) -> None:
        self._connections = connections
        self._me = me
        self._measured = measured  # (peer, bytes per second): the core's set_link_bandwidth
        self._lock = asyncio.Lock()  # one probe at a time: two would share the cables

    async def probe(self, peer: str) -> None:
        """Measure the link to `peer` (connected, with a record), dialling the address its
        connection runs over."""
        async with self._lock:
            found = self._connections.known.get(peer)
            channel = self._connections.channels.get(peer)
            if found is None or channel is None:
                return
            try:
                host = channel.writer.get_extra_info("peername")[0]
                probe_channel = await peers.dial(host, found.port, self._me(), "probe", expect=peer)
                try:
                    if not await asyncio.wait_for(probe_channel.read(), GO_TIMEOUT_S):  # "go"
                        raise ConnectionError("the peer closed before the probe")
                    result = await probe.probe_send(probe_channel, PROBE_SECONDS)
                finally:
                    probe_channel.close("probe done")
            except (peers.Refused, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    probe.ProbeError, wire.ProtocolError) as error:
                log.info("bandwidth probe to %s failed: %s", peer, error)
                return
            self._measured(peer, result.bytes_per_s)
            log.info("link to %s: %.2f Gbit/s", found.name, result.bytes_per_s * 8 / 1e9)

    async def answer(self, channel: peers.Channel, address: str) -> None:
        """A peer probes the link to us (an accepted connection whose purpose is "probe")."""
        try:
            channel.write([b"G"])  # the dialer streams only after this: nothing is buffered
            result = await probe.probe_receive(channel)
            self._measured(channel.peer_id, result.bytes_per_s)  # both ends publish the receiver's figure
        except (OSError, asyncio.TimeoutError, probe.ProbeError, wire.ProtocolError) as error:
            log.info("bandwidth probe from %s failed: %s", channel.peer.name, error)
        finally:
            channel.close("probe done")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(p) for p in list(self._connections.channels)))
