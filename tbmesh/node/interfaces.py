"""The interfaces we serve on: which they are, their addresses, the control port's listeners
on each, this Mac's RDMA, and the watcher that says when any of it may have changed.

Only the chosen interfaces are served (the Thunderbolt ones unless named): listeners bind
their addresses, never 0.0.0.0, so nothing on Wi-Fi or Ethernet can even connect.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from tbmesh.net import interfaces as netif
from tbmesh.net import peers, rdma
from tbmesh.net.watch import InterfaceWatcher

log = logging.getLogger("tbmesh")

Accept = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Interfaces:
    def __init__(self, wanted: list[str] | None) -> None:
        self.wanted = wanted  # --interface patterns; None: the Thunderbolt interfaces
        self.names: list[str] = []
        self.addresses: list[str] = []  # IPv4 addresses of `names`, sorted
        self.port = 0  # the control port, the same on every address (mDNS advertises one)
        self.rdma = rdma.RdmaStatus(None)  # read at start and when interfaces change
        self._listeners: dict[str, asyncio.Server] = {}  # control port listeners, by address
        self._accept: Accept | None = None  # what a listener does with a connection
        self._watcher: InterfaceWatcher | None = None

    def select(self, strict: bool = True) -> bool:
        """Choose the interfaces again and read their addresses; whether the addresses changed.
        Raises ValueError (`strict`, at start) when a named interface does not exist."""
        self.names = netif.select_interfaces(self.wanted, strict=strict)
        found = netif.interface_addresses(self.names)
        addresses = sorted({a for addrs in found.values() for a in addrs if ":" not in a})
        changed, self.addresses = addresses != self.addresses, addresses
        return changed

    async def read_rdma(self) -> None:
        """Read this Mac's RDMA status (tbmesh.net.rdma): a cable plugged in brings its port's up."""
        status = await asyncio.to_thread(rdma.rdma_status)
        if status != self.rdma:
            active = [d.name for d in status.devices if d.active or not d.port_states]
            log.info("RDMA: %s", status.why_not or f"enabled, devices up: {', '.join(active) or 'none'}")
        self.rdma = status

    def rdma_device(self, channel: peers.Channel) -> str:
        """Our RDMA device on the cable a connection runs over ("" for none): links whose two
        ends publish one run tensor groups over jaccl."""
        local = channel.writer.get_extra_info("sockname")
        if local is None or not self.rdma.usable:
            return ""
        return rdma.link_device(local[0], netif.interface_addresses(self.names), self.rdma)

    async def listen(self, port: int, accept: Accept) -> dict[str, OSError]:
        """Settle the control port and listen on every address. mDNS advertises one port for
        all addresses, so the number is settled here, at start, even with no cable yet: the one
        asked for if nothing listens on it at any address, or with 0 one the kernel finds free
        on all of them. Addresses that appear later are listened on with that number (`follow`);
        something else may take it meanwhile, which is then logged. Raises OSError when the
        port is taken; returns the addresses that failed to bind."""
        self.port = _port_free_everywhere(port)
        self._accept = accept
        return await self.follow()

    async def follow(self) -> dict[str, OSError]:
        """Listen on each of our addresses and on no other; returns those that failed to bind
        (tried again at the next interface change)."""
        for address in [a for a in self._listeners if a not in self.addresses]:
            # its connections are closed by the daemon (close() leaves them open)
            self._listeners.pop(address).close()
            log.info("control port closed on %s", address)
        failed: dict[str, OSError] = {}
        for address in self.addresses:
            if address not in self._listeners:
                try:
                    self._listeners[address] = await asyncio.start_server(self._accept, host=address, port=self.port)
                except OSError as error:
                    failed[address] = error
        return failed

    async def watch(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Call `changed` whenever an interface may have changed (netlink, the routing socket)."""
        self._watcher = InterfaceWatcher(changed)
        await self._watcher.start()

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()

    def close(self) -> None:
        """No new connection from now on."""
        for listener in self._listeners.values():
            listener.close()


def _port_free_everywhere(port: int) -> int:
    """`port` when no socket listens on it at any address, or with 0 a port no socket does
    (the kernel's choice); raises OSError (EADDRINUSE). Bound with SO_REUSEADDR as asyncio's
    listeners are: connections of an earlier run left in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # the wildcard conflicts with a listener on any address
        return sock.getsockname()[1]
