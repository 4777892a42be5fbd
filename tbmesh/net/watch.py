"""Notice network interface changes (a cable plugged or pulled, an address gained or lost).

Sources, in order of preference:
- Linux: an rtnetlink socket subscribed to link and address changes;
- macOS: a PF_ROUTE socket, keeping only interface and address messages (routes and ARP
  entries change all the time and would wake us for nothing);
- anywhere: polling psutil once a second and comparing snapshots.

The kernel sends a burst of messages for one event (link, then each address), so the
callback is debounced: the first message arms a short timer, everything arriving before it
fires is folded into the same single call. Whoever gets the call re-reads the interfaces:
the messages themselves are not parsed.

`python -m tbmesh.net.watch` prints one line per change: handy on a Mac to check that
plugging a cable is seen, and used by the tests inside a network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

log = logging.getLogger(__name__)

OnChange = Callable[[], Awaitable[None]]

# <linux/rtnetlink.h> multicast groups
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100

# <net/route.h> on macOS: message types that concern interfaces and their addresses
RTM_NEWADDR = 0xC
RTM_DELADDR = 0xD
RTM_IFINFO = 0xE
RTM_IFINFO2 = 0x12
_INTERFACE_MESSAGES = {RTM_NEWADDR, RTM_DELADDR, RTM_IFINFO, RTM_IFINFO2}
_ROUTE_HEADER = struct.Struct("=HBB")  # rtm_msglen, rtm_version, rtm_type: every message starts so

METHODS = ("auto", "netlink", "route", "poll")


def default_method(platform: str = sys.platform) -> str:
    # By platform, not by hasattr(socket, "AF_ROUTE"): on Linux AF_ROUTE exists and is AF_NETLINK.
    if platform.startswith("linux"):
        return "netlink"
    if platform == "darwin" or "bsd" in platform:
        return "route"
    return "poll"


def open_netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_ROUTE, socket.SOCK_RAW, 0)  # type: ignore[attr-defined]
    sock.setblocking(False)
    return sock


def route_message_types(data: bytes) -> list[int]:
    """The rtm_type of each PF_ROUTE message in `data` (normally one per read)."""
    types = []
    offset = 0
    while offset + _ROUTE_HEADER.size <= len(data):
        length, _version, kind = _ROUTE_HEADER.unpack_from(data, offset)
        types.append(kind)
        if length < _ROUTE_HEADER.size:
            break
        offset += length
    return types


def is_interface_change(route_message: bytes) -> bool:
    """Whether a PF_ROUTE read concerns an interface or an address (not a route or ARP)."""
    return any(t in _INTERFACE_MESSAGES for t in route_message_types(route_message))


def interface_snapshot() -> dict[str, Any]:
    """Everything a poll compares: each interface's flags, MTU and addresses."""
    stats = psutil.net_if_stats()
    addresses = psutil.net_if_addrs()
    snapshot: dict[str, Any] = {}
    for name in sorted(set(stats) | set(addresses)):
        st = stats.get(name)
        state = (st.isup, st.flags, st.mtu) if st else None
        snapshot[name] = (state, sorted((int(a.family), a.address) for a in addresses.get(name, [])))
    return snapshot


class InterfaceWatcher:
    """Calls `on_change()` (debounced) whenever an interface or address changes.

    `await start()` returns once the source is listening; `await stop()` closes it. A failing
    callback is logged and the watcher keeps going. `method` after start says which source
    is in use: asking for "auto" falls back to polling when the socket cannot be opened.
    """

    def __init__(
        self,
        on_change: OnChange,
        *,
        method: str = "auto",
        debounce: float = 0.2,
        poll_interval: float = 1.0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown watch method {method!r} (use one of {', '.join(METHODS)})")
        self.on_change = on_change
        self.method = method
        self.debounce = debounce
        self.poll_interval = poll_interval
        self._changed = asyncio.Event()
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        wanted = default_method() if self.method == "auto" else self.method
        if wanted in ("netlink", "route"):
            try:
                self._sock = open_netlink_socket() if wanted == "netlink" else open_route_socket()
            except (OSError, AttributeError) as error:
                if self.method != "auto":
                    raise
                log.warning("cannot watch interfaces with %s (%s); polling every %.1f s",
                            wanted, error, self.poll_interval)
                wanted = "poll"
            else:
                loop.add_reader(self._sock.fileno(), self._read)
        self.method = wanted
        if wanted == "poll":
            self._tasks.append(asyncio.create_task(self._poll(interface_snapshot())))
        self._tasks.append(asyncio.create_task(self._deliver()))

    async def stop(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def __aenter__(self) -> InterfaceWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def notify(self) -> None:
        """Something changed: call back after the debounce (sources use this; so can callers)."""
        self._changed.set()

    def _read(self) -> None:
        # Drain everything queued: one wake-up per burst, not per message.
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as error:
                # ENOBUFS: the kernel dropped messages because we were slow; we only need
                # to know that something changed, and that we do.
                if error.errno == errno.ENOBUFS:
                    self.notify()
                    continue
                log.warning("interface watch socket: %s", error)
                return
            if self.method != "route" or is_interface_change(data):
                self.notify()

    async def _poll(self, previous: dict[str, Any]) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            current = interface_snapshot()
            if current != previous:
                previous = current
                self.notify()

    async def _deliver(self) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(self.debounce)
            self._changed.clear()  # changes from here on start the next round
            try:
                await self.on_change()
            except Exception:
                log.exception("interface change callback failed")


async def _print_changes(method: str, debounce: float, poll_interval: float) -> None:
    async def on_change() -> None:
        print(f"change {time.monotonic():.3f}", flush=True)

    async with InterfaceWatcher(on_change, method=method, debounce=debounce,
                                poll_interval=poll_interval) as watcher:
        print(f"ready {watcher.method}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tbmesh.net.watch",
                                     description="Print a line each time a network interface changes.")
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument("--debounce", type=float, default=0.2, help="seconds (default 0.2)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds (default 1.0)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_print_changes(args.method, args.debounce, args.poll_interval))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
