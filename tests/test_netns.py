"""The network-namespace lab: reachability like Thunderbolt, mDNS over cables, no leaks."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

import pytest

import netns


def our_namespaces(prefix: str) -> list[str]:
    return [ns for ns in netns._netns_names() if ns.startswith(prefix)]


def test_chain_reaches_direct_neighbours_only(lab: netns.Lab) -> None:
    a, b, c = (lab.add_mac(n) for n in "abc")
    ab, bc = lab.cable(a, b), lab.cable(b, c)
    assert a.ping(ab.addr(b)) and b.ping(ab.addr(a)) and b.ping(bc.addr(c))
    assert not a.ping(bc.addr(c), timeout=0.3)
    assert not c.ping(ab.addr(a), timeout=0.3)
    # One address per cable interface, as macOS self-assigns on each Thunderbolt port.
    assert b.interfaces == ["tb1", "tb2"]
    assert b.addrs == ["169.254.1.2", "169.254.2.2"]
    # IPv6 link-local works on every cable.
    assert a.ping(b.ipv6_link_local("tb1") + "%tb1")


def test_bridged_chain_is_one_segment(lab: netns.Lab) -> None:
    a, b, c = (lab.add_mac(n, bridge=True) for n in "abc")
    lab.cable(a, b)
    lab.cable(b, c)
    assert a.interfaces == ["br0"] and a.addrs == [a.bridge_addr]
    assert a.ping(c.bridge_addr) and c.ping(a.bridge_addr)
    assert a.ping(c.ipv6_link_local("br0") + "%br0")


def test_bridged_mac_between_plain_ones(lab: netns.Lab) -> None:
    a, b, c = lab.add_mac("a"), lab.add_mac("b", bridge=True), lab.add_mac("c")
    ab, bc = lab.cable(a, b), lab.cable(b, c)
    assert ab.addr(b) == b.bridge_addr
    assert a.ping(b.bridge_addr) and c.ping(b.bridge_addr)
    assert not a.ping(bc.addr(c), timeout=0.3)  # a's plain port does not bridge


def test_unplug_down_and_up(lab: netns.Lab) -> None:
    a, b = lab.add_mac("a"), lab.add_mac("b")
    cable = lab.cable(a, b)
    peer = cable.addr(b)
    cable.down()
    assert a.link("tb1")["operstate"] == "DOWN"
    assert not a.ping(peer, timeout=0.3)
    cable.up()
    assert a.ping(peer)
    cable.unplug()
    assert not a.ping(peer, timeout=0.3)
    assert a.interfaces == [] and "tb1" not in a.ip("link")
    assert "tb1" not in b.ip("link")  # both ends vanish


def test_shape_installs_and_removes_tbf(lab: netns.Lab) -> None:
    a, b = lab.add_mac("a"), lab.add_mac("b")
    cable = lab.cable(a, b, rate="500mbit")
    for mac in (a, b):
        (qdisc,) = json.loads(mac.check_output(["tc", "-j", "qdisc", "show", "dev", "tb1"]))
        assert qdisc["kind"] == "tbf"
    cable.shape(None)
    assert "tbf" not in a.check_output(["tc", "qdisc", "show", "dev", "tb1"])


def test_socket_lives_in_the_namespace(lab: netns.Lab) -> None:
    a, b = lab.add_mac("a"), lab.add_mac("b")
    cable = lab.cable(a, b)
    server = b.socket()
    server.bind((cable.addr(b), 0))
    server.listen()
    client = a.socket()
    client.settimeout(2)
    client.connect(server.getsockname())
    conn, (peer_addr, _) = server.accept()
    assert peer_addr == cable.addr(a)
    for s in (client, conn, server):
        s.close()


# --- mDNS (python-zeroconf) across cables and bridges ---------------------------------------

REGISTER = r"""
import sys
from zeroconf import IPVersion, ServiceInfo, Zeroconf
name, ifaces, version, addrs = sys.argv[1:5]
interfaces = [int(i) if i.isdigit() else i for i in ifaces.split(",")]
zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V6Only if version == "6" else IPVersion.V4Only)
info = ServiceInfo("_tbmesh._tcp.local.", f"{name}._tbmesh._tcp.local.",
                   parsed_addresses=addrs.split(","), port=7000, server=f"{name}.local.")
zc.register_service(info)
print("registered", flush=True)
sys.stdin.read()  # until the test closes our stdin or the lab kills us
"""

BROWSE = r"""
import sys
from zeroconf import IPVersion, ServiceBrowser, Zeroconf
ifaces, version = sys.argv[1:3]
interfaces = [int(i) if i.isdigit() else i for i in ifaces.split(",")]
zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V6Only if version == "6" else IPVersion.V4Only)
def on_change(zeroconf, service_type, name, state_change):
    print(state_change.name, name, flush=True)
ServiceBrowser(zc, "_tbmesh._tcp.local.", handlers=[on_change])
sys.stdin.read()
"""


def zeroconf_interfaces(mac: netns.Mac, version: str) -> str:
    """IPv4: the interface addresses. IPv6: interface indexes (zeroconf joins ff02::fb by index)."""
    if version == "6":
        return ",".join(str(mac.ifindex(i)) for i in mac.interfaces)
    return ",".join(mac.addrs)


def start_script(mac: netns.Mac, script: str, *args: str) -> subprocess.Popen:
    return mac.run([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("version", ["4", "6"])
@pytest.mark.parametrize("bridge", [False, True], ids=["plain", "bridged"])
def test_mdns_crosses_cables_and_bridges(lab: netns.Lab, version: str, bridge: bool) -> None:
    """A service registered on a is seen from b; from c only when the Macs bridge."""
    a, b, c = (lab.add_mac(n, bridge=bridge) for n in "abc")
    lab.cable(a, b)
    lab.cable(b, c)
    browsers = {m.name: start_script(m, BROWSE, zeroconf_interfaces(m, version), version) for m in (b, c)}
    register = start_script(a, REGISTER, "svc-a", zeroconf_interfaces(a, version), version, ",".join(a.addrs))

    seen: dict[str, list[str]] = {"a": [], "b": [], "c": []}  # lines each script printed
    sel = selectors.DefaultSelector()
    for name, proc in browsers.items():
        sel.register(proc.stdout, selectors.EVENT_READ, name)
    sel.register(register.stdout, selectors.EVENT_READ, "a")
    expected = {"b", "c"} if bridge else {"b"}
    deadline = time.monotonic() + 20
    quiet_until = None  # after registration: how long c must stay silent
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            line = key.fileobj.readline()
            if line:
                seen[key.data].append(line.strip())
        found = {n for n in ("b", "c") if "Added svc-a._tbmesh._tcp.local." in seen[n]}
        if seen["a"] and found >= expected:
            if bridge:
                break
            # Registration announces for ~1 s after probing; had c been able to hear a,
            # it would have by then.
            quiet_until = quiet_until or time.monotonic() + 1.5
            if time.monotonic() >= quiet_until:
                break
    sel.close()
    assert seen["a"] == ["registered"]
    found = {n for n in ("b", "c") if "Added svc-a._tbmesh._tcp.local." in seen[n]}
    assert found == expected, seen


# --- cleanup --------------------------------------------------------------------------------


@pytest.mark.needs_root
def test_close_kills_processes_and_removes_namespaces() -> None:
    with netns.Lab() as lab:
        a, b = lab.add_mac("a"), lab.add_mac("b", bridge=True)
        lab.cable(a, b, rate="1gbit")
        tracked = a.run(["sleep", "60"])
        # A process the lab did not start itself, inside the namespace: still ours to end.
        stray = subprocess.Popen(["ip", "netns", "exec", b.netns, "sleep", "60"])
    try:
        assert our_namespaces(lab.prefix) == []
        assert tracked.returncode is not None
        assert stray.wait(timeout=5) != 0
    finally:
        if stray.poll() is None:
            stray.kill()


@pytest.mark.needs_root
def test_close_on_exception() -> None:
    with pytest.raises(ZeroDivisionError):
        with netns.Lab() as lab:
            lab.add_mac("a")
            1 / 0
    assert our_namespaces(lab.prefix) == []


@pytest.mark.needs_root
def test_sweep_removes_namespaces_of_dead_runs_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names a crashed run
    stale = f"tbm{dead.pid}a-x"
    alive = f"tbm{os.getpid()}z-x"  # a live run's namespace: must survive the sweep
    for ns in (stale, alive):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        time.sleep(0.2)  # let it enter the namespace
        removed = netns.sweep_stale()
        assert stale in removed and alive not in removed
        assert stale not in netns._netns_names()
        assert sleeper.wait(timeout=5) != 0
    finally:
        subprocess.run(["ip", "netns", "del", alive], check=False)
        subprocess.run(["ip", "netns", "del", stale], check=False)
        if sleeper.poll() is None:
            sleeper.kill()


def test_parse_rate() -> None:
    assert netns.parse_rate("1gbit") == 10**9
    assert netns.parse_rate("0.5gbit") == 5 * 10**8
    assert netns.parse_rate("500mbit") == 5 * 10**8
    assert netns.parse_rate("125mbps") == 10**9  # tc's bps is bytes per second
    with pytest.raises(ValueError):
        netns.parse_rate("fast")
