"""A lab of Macs on one Linux machine: network namespaces play Macs, veth pairs play cables.

    with Lab() as lab:
        a, b = lab.add_mac("a"), lab.add_mac("b")
        cable = lab.cable(a, b, rate="1gbit")
        assert a.ping(cable.addr(b))

Addressing mirrors macOS's self-assigned link-local addresses:
- A Mac without bridge gets one IPv4 address per cable interface, 169.254.<cable>.<mac>/32,
  and a /32 route to the peer's address on that cable only. Two links of one namespace
  never share a subnet, and a chain a-b-c lets a reach b but not c, as Thunderbolt does
  without the bridge. One address per interface (not one per Mac) matters for multicast:
  IPv4 multicast sockets name their interface by address (IP_MULTICAST_IF,
  IP_ADD_MEMBERSHIP, and so python-zeroconf), and an address held by two interfaces
  resolves to only one of them, so mDNS would silently work on one cable only.
- A bridged Mac (macOS's "Thunderbolt Bridge", bridge0) has a Linux bridge br0 that
  enslaves every cable, with one address 169.254.200.<mac>/16 on br0: bridged Macs form one
  L2 segment in which every Mac reaches every other.
- Every interface has its IPv6 link-local address (duplicate-address detection off);
  bridge ports have IPv6 off, as macOS's bridge members carry no address.
No namespace has a default route or a multicast route: a program must name the interface
it sends multicast on, as on a Mac whose default route is Wi-Fi.

Everything is torn down on close, on exceptions, at interpreter exit, and namespaces left
by a crashed earlier run (their owner pid is gone) are swept when a Lab starts.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_DIR = "/run/netns"
# Namespaces are named tbm<pid><letter>-<mac>: the pid tells the sweep whether the run that
# made them is still alive (other runs may share this machine), the letter tells the Labs of
# one process apart.
PREFIX_RE = re.compile(r"^tbm(\d+)[a-z]-")
BRIDGE_OCTET = 200  # bridged Macs: 169.254.200.<mac>/16 on br0
MAX_CABLES = BRIDGE_OCTET - 1  # cable k: 169.254.<k>.<mac>/32, k = 1..199 (0 is reserved)
MAX_MACS = 254

_seq = count()
_open_labs: set[Lab] = set()


def unavailable_reason() -> str | None:
    """Why a Lab cannot run here (not root, no `ip` or `tc`), or None when it can."""
    if os.geteuid() != 0:
        return "network-namespace lab needs root (ip netns, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network-namespace lab needs `{tool}` (iproute2)"
    return None


def parse_rate(rate: str) -> int:
    """tc's rate syntax to bits per second: '1gbit', '500mbit', '0.5gbit', '125mbps' (bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(bit|bps)?\s*", rate.lower())
    if not m:
        raise ValueError(f"bad rate {rate!r} (want e.g. '1gbit', '500mbit')")
    number, prefix, unit = float(m.group(1)), m.group(2), m.group(3) or "bit"
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[prefix]
    bits = number * scale * (8 if unit == "bps" else 1)
    if bits <= 0:
        raise ValueError(f"rate must be positive: {rate!r}")
    return int(bits)


def tcp_payload_fraction(mtu: int) -> float:
    """Share of a shaped cable's rate that TCP payload gets: frames carry 14 bytes of
    Ethernet header and 52 of IPv4 + TCP (with timestamps) around mtu - 52 of payload."""
    return (mtu - 52) / (mtu + 14)


def tbf_args(rate_bits: int) -> list[str]:
    """tbf parameters that make a shaped veth carry `rate_bits` accurately.

    tbf counts whole Ethernet frames, so TCP carries (mtu - 52) / (mtu + 14) of the rate:
    0.956 at MTU 1500, 0.993 at 9000 (the 0.956 first measured here was exactly that).
    burst: 8 ms of traffic, at least 512 KiB. The bucket must hold whole GSO packets (veth
    sends up to 64 KiB at once) and cover the timer running late on a busy machine: with 2 ms
    the rate fell 1-14% short at 5 Gbit/s, from 6 ms on it was exact (bulk TCP, MTU 1500
    and 9000). latency (the queue beyond the bucket): 20 ms, enough that a sender stalled
    for a moment never empties it, short enough to keep small messages on a busy cable
    within tens of milliseconds.
    """
    rate_bytes = rate_bits // 8
    burst = max(512 * 1024, rate_bytes * 8 // 1000)
    return ["rate", f"{rate_bits}bit", "burst", str(burst), "latency", "20ms"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns_processes(ns: str) -> None:
    """SIGKILL every process still inside one of our namespaces (only we start them)."""
    out = _ip("netns", "pids", ns, check=False).stdout
    for pid in (int(p) for p in out.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_processes(ns)
    _ip("netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces and root-namespace links of ours whose owning process is gone.

    Returns what was removed. Only names with our prefix are touched, and never those of a
    run that is still alive (another test session may share the machine).
    """
    removed = []
    for ns in _netns_names():
        m = PREFIX_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns(ns)
            removed.append(ns)
    # Cables are created directly inside namespaces, so none should ever sit in the root
    # namespace; remove any that a foreign tool left there with our prefix all the same.
    links = json.loads(_ip("-j", "link", "show", check=False).stdout or "[]")
    for link in links:
        name = link.get("ifname", "")
        m = re.match(r"^tbm(\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


# --- entering a namespace from this process -------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run fn in a short-lived thread that has joined namespace `ns`.

    setns() moves only the calling thread, and a socket stays in the namespace it was
    created in, so sockets made here can then be used from any thread (asyncio included).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_streams(client: Mac, server: Mac, addr: str) -> tuple[Streams, Streams]:
    """A TCP connection from `client` to `server` at `addr`, as asyncio streams on both ends.

    Both ends live in this process (sockets made inside the namespaces), so a test drives
    two Macs from one event loop.
    """
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    listener = server.socket(family)
    try:
        listener.bind((addr, 0))
        listener.listen(1)
        listener.setblocking(False)
        sock = client.socket(family)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _, (conn, _) = await asyncio.gather(
            loop.sock_connect(sock, listener.getsockname()), loop.sock_accept(listener))
    finally:
        listener.close()
    return await asyncio.open_connection(sock=sock), await asyncio.open_connection(sock=conn)


# --- the lab ------------------------------------------------------------------------------


@dataclass(eq=False)
class Mac:
    """One Mac: a network namespace. Made by Lab.add_mac."""

    lab: Lab
    name: str
    index: int  # 1..254, the last octet of its addresses
    netns: str
    bridge: bool
    cables: list[Cable] = field(default_factory=list)

    @property
    def bridge_addr(self) -> str:
        """The bridged Mac's address (on br0)."""
        if not self.bridge:
            raise ValueError(f"{self.name} has no bridge")
        return f"169.254.{BRIDGE_OCTET}.{self.index}"

    @property
    def interfaces(self) -> list[str]:
        """Its Thunderbolt interfaces that carry addresses: br0, or one per plugged cable."""
        if self.bridge:
            return ["br0"]
        return [c.ifname for c in self.cables if c.plugged]

    @property
    def addrs(self) -> list[str]:
        """Its IPv4 addresses, one per interface in `interfaces` order."""
        if self.bridge:
            return [self.bridge_addr]
        return [c.addr(self) for c in self.cables if c.plugged]

    def ifindex(self, ifname: str) -> int:
        return int(self.link(ifname)["ifindex"])

    def link(self, ifname: str) -> dict[str, Any]:
        """`ip -j link show` of one interface (flags, operstate, mtu, ...)."""
        return json.loads(_ip("-n", self.netns, "-j", "link", "show", "dev", ifname).stdout)[0]

    def ipv6_link_local(self, ifname: str) -> str:
        out = _ip("-n", self.netns, "-j", "-6", "addr", "show", "dev", ifname, "scope", "link").stdout
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                return str(info["local"])
        raise LookupError(f"{self.name}/{ifname} has no IPv6 link-local address")

    def ip(self, *args: str) -> str:
        """Run `ip` inside this Mac and return its output."""
        return _ip("-n", self.netns, *args).stdout

    def ip_batch(self, commands: str) -> None:
        """Several `ip` commands inside this Mac at once (`ip -batch -`): one burst of changes."""
        subprocess.run(["ip", "-n", self.netns, "-batch", "-"], input=commands, check=True,
                       capture_output=True, text=True)

    def run(self, args: list[str], **popen_kw: Any) -> subprocess.Popen:
        """Start a process inside this Mac; the Lab kills it (and its group) on close."""
        popen_kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *args], **popen_kw)
        self.lab._procs.append(proc)
        return proc

    def check_output(self, args: list[str], timeout: float = 30, **kw: Any) -> str:
        """Run a command inside this Mac to completion and return its stdout (text)."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.netns, *args],
            capture_output=True, text=True, timeout=timeout, **kw,
        )
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, args, proc.stdout, proc.stderr)
        return proc.stdout

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket that lives in this Mac's namespace, usable from this process."""
        return in_netns(self.netns, lambda: socket.socket(family, type, proto))

    def ping(self, addr: str, timeout: float = 1.0) -> bool:
        """One ICMP echo to addr (IPv4, or IPv6 'fe80::..%ifname'); True if answered.

        Done in-process with a raw socket: this machine has no `ping`. No route gives False
        at once.
        """
        v6 = ":" in addr
        family = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        sock = self.socket(family, socket.SOCK_RAW, proto)
        ident, seq = os.getpid() & 0xFFFF, next(_seq) & 0xFFFF
        try:
            if v6:
                host, _, scope = addr.partition("%")
                dest: tuple = (host, 0, 0, self.ifindex(scope) if scope else 0)
                # The kernel fills in the ICMPv6 checksum.
                packet = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"tbmesh"
            else:
                dest = (addr, 0)
                header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
                packet = struct.pack("!BBHHH", 8, 0, _checksum(header + b"tbmesh"), ident, seq) + b"tbmesh"
            try:
                sock.sendto(packet, dest)
            except OSError as exc:
                if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENODEV):
                    return False
                raise
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    return False
                data, _ = sock.recvfrom(2048)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]  # v4 raw sockets see the IP header
                kind, _code, _sum, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if kind == (129 if v6 else 0) and (rid, rseq) == (ident, seq):
                    return True
            return False
        finally:
            sock.close()


@dataclass(eq=False)
class Cable:
    """A veth pair between two Macs. Made by Lab.cable."""

    lab: Lab
    index: int  # 1..199: its interfaces are tb<index> on both Macs
    a: Mac
    b: Mac
    rate: str | None
    mtu: int
    plugged: bool = True

    @property
    def ifname(self) -> str:
        return f"tb{self.index}"

    def peer(self, mac: Mac) -> Mac:
        return self.b if mac is self.a else self.a

    def addr(self, mac: Mac) -> str:
        """The address `mac` is reached at through this cable (its br0 address if bridged)."""
        if mac is not self.a and mac is not self.b:
            raise ValueError(f"{mac.name} is not on cable {self.ifname}")
        return mac.bridge_addr if mac.bridge else f"169.254.{self.index}.{mac.index}"

    def unplug(self) -> None:
        """Pull the cable: the veth pair is deleted, both ends vanish."""
        if self.plugged:
            _ip("-n", self.a.netns, "link", "del", self.ifname, check=False)
            self.plugged = False

    def plug(self) -> None:
        """Plug the cable (back) in: the veth pair is made again, addressed, routed and shaped."""
        if self.plugged:
            return
        a, b = self.a, self.b
        # Created directly inside both namespaces, so nothing ever sits in the root namespace.
        # The two ends get different ifindexes: the kernel treats a veth whose ifindex equals
        # its peer's (both would be 3 in fresh namespaces) as a non-urgent link event, so its
        # operstate, and a bridge port on it, would come up only after up to a second.
        _ip("link", "add", self.ifname, "netns", a.netns, "index", str(100 + 2 * self.index),
            "mtu", str(self.mtu), "type", "veth", "peer", "name", self.ifname, "netns", b.netns,
            "index", str(101 + 2 * self.index), "mtu", str(self.mtu))
        self.plugged = True
        for mac in (a, b):
            if mac.bridge:
                # Bridge members carry no address on macOS; keep IPv6 off them here too.
                mac.check_output(["sysctl", "-q", "-w", f"net.ipv6.conf.{self.ifname}.disable_ipv6=1"])
            self._bring_up(mac)
        if self.rate is not None:
            self.shape(self.rate)

    def down(self) -> None:
        """Both ends go down (routes through them go with them); up() restores them."""
        self._require_plugged()
        for mac in (self.a, self.b):
            _ip("-n", mac.netns, "link", "set", self.ifname, "down")

    def up(self) -> None:
        self._require_plugged()
        for mac in (self.a, self.b):
            self._bring_up(mac)

    def shape(self, rate: str | None) -> None:
        """Limit both directions to `rate` with tbf ('1gbit'); None removes the limit."""
        self._require_plugged()
        for mac in (self.a, self.b):
            if rate is None:
                _tc("-n", mac.netns, "qdisc", "del", "dev", self.ifname, "root", check=False)
            else:
                _tc("-n", mac.netns, "qdisc", "replace", "dev", self.ifname, "root", "tbf",
                    *tbf_args(parse_rate(rate)))
        self.rate = rate

    def _require_plugged(self) -> None:
        if not self.plugged:
            raise RuntimeError(f"cable {self.ifname} ({self.a.name}-{self.b.name}) is unplugged")

    def _bring_up(self, mac: Mac) -> None:
        """Address, route and raise this cable's end in `mac` (idempotent)."""
        ns, dev = mac.netns, self.ifname
        if mac.bridge:
            _ip("-n", ns, "link", "set", dev, "master", "br0")
            _ip("-n", ns, "link", "set", dev, "up")
            return
        _ip("-n", ns, "addr", "replace", f"{self.addr(mac)}/32", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        peer = self.peer(mac)
        # Routes through a link vanish when it goes down: (re)add the one to the peer.
        _ip("-n", ns, "route", "replace", f"{self.addr(peer)}/32", "dev", dev,
            "src", self.addr(mac), "scope", "link")


class Lab:
    """A set of namespaced Macs and veth cables, all removed on close."""

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        sweep_stale()
        self.prefix = f"tbm{os.getpid()}{chr(ord('a') + next(_seq) % 26)}-"
        self.macs: dict[str, Mac] = {}
        self.cables: list[Cable] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        _open_labs.add(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_mac(self, name: str, bridge: bool = False) -> Mac:
        """A new Mac (namespace): lo up, IPv6 DAD off, and with bridge=True a bridge br0."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,31}", name) or name in self.macs:
            raise ValueError(f"bad or duplicate Mac name {name!r} (lower-case letters, digits, _)")
        if len(self.macs) >= MAX_MACS:
            raise ValueError(f"at most {MAX_MACS} Macs per lab")
        mac = Mac(self, name, len(self.macs) + 1, self.prefix + name, bridge)
        _ip("netns", "add", mac.netns)
        self.macs[name] = mac
        ns = mac.netns
        _ip("-n", ns, "link", "set", "lo", "up")
        # Without DAD, IPv6 link-local addresses are usable as soon as a link is up
        # (otherwise mDNS over IPv6 waits about 2 s after every plug).
        mac.check_output(["sysctl", "-q", "-w",
                          "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
        if bridge:
            # No STP (a cable chain has no loops; STP would hold ports 30 s in learning) and no
            # multicast snooping (macOS's bridge floods multicast; with snooping mDNS would
            # depend on IGMP/MLD reports and queriers).
            _ip("-n", ns, "link", "add", "br0", "type", "bridge",
                "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
            _ip("-n", ns, "addr", "add", f"{mac.bridge_addr}/16", "dev", "br0")
            _ip("-n", ns, "link", "set", "br0", "up")
        return mac

    def cable(self, a: Mac, b: Mac, rate: str | None = None, mtu: int = 1500) -> Cable:
        """Plug a cable between two Macs; rate ('1gbit') shapes both directions with tbf.

        mtu: 1500 is macOS's default for Thunderbolt Bridge; users often set 9000.
        """
        if a is b:
            raise ValueError("a cable needs two different Macs")
        if len(self.cables) >= MAX_CABLES:
            raise ValueError(f"at most {MAX_CABLES} cables per lab")
        cable = Cable(self, len(self.cables) + 1, a, b, rate, mtu, plugged=False)
        self.cables.append(cable)
        a.cables.append(cable)
        b.cables.append(cable)
        cable.plug()
        return cable

    def close(self) -> None:
        """Kill every process started in the lab, then delete every namespace (and cable)."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        for proc in self._procs:
            _terminate(proc)
        for mac in self.macs.values():
            _delete_netns(mac.netns)  # also kills processes started other ways
        leftover = [ns for ns in _netns_names() if ns.startswith(self.prefix)]
        for ns in leftover:
            _delete_netns(ns)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started and reap its leader.

    Killed while the leader is not yet reaped (alive or a zombie), so the group id is still
    ours. Tests that want a graceful stop send SIGTERM themselves before the lab closes.
    """
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()  # not a group leader (start_new_session=False): the process alone
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


class Loop:
    """An asyncio event loop in a thread of its own, as the daemon's; in namespace `ns` when
    given (the sockets it makes live there). `kind` "uvloop" for the loop the daemon runs."""

    def __init__(self, ns: str | None = None, kind: str = "asyncio") -> None:
        if kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        run = self.loop.run_forever if ns is None else lambda: in_netns(ns, self.loop.run_forever)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


PING_BYTES = 100  # a heartbeat's or a token's message, about


def connected_pair(client: Mac, server: Mac, addr: str) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from `client` to `server` (listening at `addr`, one of its addresses):
    (the client's socket, the server's), both blocking."""
    listener = server.socket()
    listener.bind((addr, 0))
    listener.listen(1)
    dialer = client.socket()
    dialer.connect(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    return dialer, accepted


def control_pings(a: Mac, b: Mac, addr: str, stop: threading.Event, delays: list[float]) -> None:
    """Small request/response pairs every 10 ms, as heartbeats and tokens, on a TCP connection
    of their own from `a` to `b` (at `addr`), until `stop` is set; each round trip's seconds go
    to `delays`. Each side reads the whole message before it answers (a read may be short)."""
    client, server = connected_pair(a, b, addr)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while not stop.is_set():
            sent = time.perf_counter()
            client.sendall(b"p" * PING_BYTES)
            _read_exact(server, PING_BYTES)
            server.sendall(b"q" * PING_BYTES)
            _read_exact(client, PING_BYTES)
            delays.append(time.perf_counter() - sent)
            time.sleep(0.01)
    finally:
        client.close()
        server.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)
