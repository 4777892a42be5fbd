"""The interface watcher: debounce and fallback in-process, the real sources (netlink and
polling) in a child process inside a fresh network namespace, driven by real `ip` commands."""

from __future__ import annotations

import asyncio
import queue
import struct
import subprocess
import sys
import threading
import time

import pytest

from tbmesh.net import watch
from tbmesh.net.watch import InterfaceWatcher, default_method, is_interface_change, route_message_types

# --- pure parts ----------------------------------------------------------------------


def test_default_method_by_platform():
    assert default_method("linux") == "netlink"
    assert default_method("darwin") == "route"
    assert default_method("freebsd14") == "route"
    assert default_method("win32") == "poll"


def route_message(kind: int, length: int = 112) -> bytes:
    return struct.pack("=HBB", length, 5, kind) + bytes(length - 4)


def test_route_socket_keeps_interface_and_address_messages_only():
    RTM_ADD, RTM_DELETE, RTM_MISS = 0x1, 0x2, 0x7
    for kind in (watch.RTM_NEWADDR, watch.RTM_DELADDR, watch.RTM_IFINFO, watch.RTM_IFINFO2):
        assert is_interface_change(route_message(kind))
    for kind in (RTM_ADD, RTM_DELETE, RTM_MISS):  # routes and ARP entries come and go all the time
        assert not is_interface_change(route_message(kind))
    both = route_message(RTM_ADD, 92) + route_message(watch.RTM_DELADDR, 20)
    assert route_message_types(both) == [RTM_ADD, watch.RTM_DELADDR]
    assert is_interface_change(both)
    assert route_message_types(b"\x00\x00") == [] and route_message_types(bytes(8)) == [0]


def test_unknown_method_is_refused():
    async def nothing() -> None:
        pass

    with pytest.raises(ValueError, match="unknown watch method"):
        InterfaceWatcher(nothing, method="inotify")


# --- debounce and fallback, in-process ----------------------------------------------


def test_a_burst_of_changes_gives_one_call_after_the_debounce():
    async def scenario() -> list[float]:
        calls: list[float] = []

        async def on_change() -> None:
            calls.append(time.monotonic())

        # polling once an hour: only notify() below produces changes
        async with InterfaceWatcher(on_change, method="poll", poll_interval=3600, debounce=0.1) as w:
            start = time.monotonic()
            for _ in range(5):
                w.notify()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert len(calls) == 1
            assert 0.09 <= calls[0] - start <= 0.3
            w.notify()
            await asyncio.sleep(0.3)
        return calls

    assert len(asyncio.run(scenario())) == 2


def test_a_failing_callback_does_not_stop_the_watcher():
    async def scenario() -> int:
        calls = 0

        async def on_change() -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("boom")

        async with InterfaceWatcher(on_change, method="poll", poll_interval=3600, debounce=0.01) as w:
            for _ in range(2):
                w.notify()
                await asyncio.sleep(0.1)
        return calls

    assert asyncio.run(scenario()) == 2


def test_auto_falls_back_to_polling_when_the_socket_cannot_be_opened(monkeypatch):
    def refuse() -> None:
        raise PermissionError("no netlink here")

    monkeypatch.setattr(watch, "open_netlink_socket", refuse)
    monkeypatch.setattr(watch, "open_route_socket", refuse)

    async def nothing() -> None:
        pass

    async def scenario() -> None:
        async with InterfaceWatcher(nothing) as w:
            assert w.method == "poll"
        with pytest.raises(PermissionError):  # asked for by name: no silent fallback
            await InterfaceWatcher(nothing, method=default_method()).start()

    asyncio.run(scenario())


# --- the real sources, in a network namespace -----------------------------------------


class WatchProcess:
    """`python -m tbmesh.net.watch` running inside a namespace, its lines read by a thread."""

    def __init__(self, ns: str, method: str, poll_interval: float) -> None:
        command = [sys.executable, "-m", "tbmesh.net.watch", "--method", method,
                   "--poll-interval", str(poll_interval)]
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *command], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.other: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.lines.get(timeout=20)
        assert ready == f"ready {method}", f"watcher did not start: {ready!r} {self.other}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def changes_within(self, seconds: float) -> int:
        """How many change lines arrive in the next `seconds`."""
        deadline = time.monotonic() + seconds
        seen = 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith("change"):
                seen += 1
            else:
                self.other.append(line)
        return seen

    def first_change_after(self, action, limit: float) -> float:
        """Run `action`; seconds until the first change line (inf if none within `limit`)."""
        start = time.monotonic()
        action()
        while (left := start + limit - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith("change"):
                return time.monotonic() - start
            self.other.append(line)
        return float("inf")

    def settle(self, quiet: float = 0.4, limit: float = 3.0) -> None:
        """Wait until no change line came for `quiet` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self.changes_within(quiet):
            pass

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("method,poll_interval", [("netlink", 1.0), ("poll", 0.3)])
def test_watcher_fires_on_link_add_up_and_down(lab, method, poll_interval):
    mac = lab.add_mac("w")
    watcher = WatchProcess(mac.netns, method, poll_interval)
    try:
        assert watcher.changes_within(0.4) == 0, "changes reported while nothing changed"
        steps = [
            ("link add", lambda: mac.ip("link", "add", "tbA", "type", "veth", "peer", "name", "tbB")),
            ("link up", lambda: mac.ip("link", "set", "tbA", "up")),
            ("link down", lambda: mac.ip("link", "set", "tbA", "down")),
        ]
        for what, action in steps:
            watcher.settle()
            took = watcher.first_change_after(action, limit=1.0)
            assert took <= 1.0, f"{method}: no change reported within 1 s of {what} ({watcher.other})"
    finally:
        watcher.close()


def test_netlink_burst_of_kernel_messages_gives_one_change(lab):
    mac = lab.add_mac("w")
    watcher = WatchProcess(mac.netns, "netlink", 1.0)
    try:
        # one veth pair, an MTU and two addresses: half a dozen netlink messages at once
        mac.ip_batch(
            "link add tbC type veth peer name tbD\n"
            "link set tbC mtu 9000\n"
            "addr add 10.9.0.1/24 dev tbC\n"
            "addr add 10.9.1.1/24 dev tbD\n"
        )
        assert watcher.changes_within(1.0) == 1
    finally:
        watcher.close()
