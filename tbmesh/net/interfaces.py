"""Which network interfaces are Thunderbolt links, and which addresses they carry.

tbmesh only ever talks on Thunderbolt interfaces unless the user names others: Wi-Fi and
Ethernet are never picked by themselves.

macOS: `networksetup -listallhardwareports` names the ports. "Thunderbolt Bridge" is the
bridge (bridge0) and "Thunderbolt N" are the enX links. By default macOS puts every enX into
bridge0, and then the address (self-assigned 169.254/16 or manual) lives on bridge0 while the
members carry none (see tests/fixtures/macos/ifconfig-bridge0.*.txt). So when the bridge
exists and has members we advertise on the bridge and skip its members; an enX outside the
bridge (a bridge emptied to use RDMA, or one port taken out of it) is advertised itself.
`ifconfig` tells us the members.

Linux: interfaces driven by `thunderbolt-net`, found in sysfs; one enslaved to a bridge is
replaced by that bridge, for the same reason as on macOS.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tbmesh.net.system import run_command

THUNDERBOLT_BRIDGE_PORT = "Thunderbolt Bridge"
# "Thunderbolt 1" .. "Thunderbolt N"; not "Thunderbolt Ethernet Slot 1", which is an
# Ethernet adapter plugged into a Thunderbolt port.
_THUNDERBOLT_PORT = re.compile(r"Thunderbolt \d+")
LINUX_DRIVER = "thunderbolt-net"


class InterfaceError(ValueError):
    """A named interface does not exist; the message is one line for the user."""


@dataclass(frozen=True)
class HardwarePort:
    """One stanza of `networksetup -listallhardwareports`."""

    port: str  # "Thunderbolt 1", "Thunderbolt Bridge", "Wi-Fi"
    device: str  # "en2", "bridge0"
    address: str = ""  # the Ethernet Address line ("N/A" on some ports)


@dataclass
class IfconfigInterface:
    """What tbmesh needs from one interface of `ifconfig` output."""

    name: str
    flags: tuple[str, ...] = ()
    mtu: int | None = None
    status: str | None = None  # "active" / "inactive"; None when ifconfig prints no status
    inet: list[str] = field(default_factory=list)  # "169.254.80.69"
    inet6: list[str] = field(default_factory=list)  # "fe80::1%bridge0"
    members: list[str] = field(default_factory=list)  # a bridge's member interfaces

    @property
    def up(self) -> bool:
        return "UP" in self.flags


# --- macOS ---------------------------------------------------------------------------


def parse_hardware_ports(text: str) -> list[HardwarePort]:
    """Parse `networksetup -listallhardwareports`.

    Read line by line rather than by blank-line stanzas, so a missing blank line or final
    newline does not matter; stop at the "VLAN Configurations" footer.
    """
    ports: list[HardwarePort] = []
    port = device = address = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("VLAN Configurations"):
            break
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "Hardware Port":
            if port is not None and device:
                ports.append(HardwarePort(port, device, address or ""))
            port, device, address = value, None, None
        elif key == "Device":
            device = value
        elif key == "Ethernet Address":
            address = value
    if port is not None and device:
        ports.append(HardwarePort(port, device, address or ""))
    return ports


_IFCONFIG_HEADER = re.compile(r"(?P<name>[^\s:]+): flags=[0-9a-fA-F]+<(?P<flags>[^>]*)>(?P<rest>.*)")


def parse_ifconfig(text: str) -> dict[str, IfconfigInterface]:
    """Parse `ifconfig` (one interface or all of them) into interfaces by name.

    A header line starts in column 0 ("bridge0: flags=8863<UP,...> mtu 9000"); every other
    line belongs to the interface above it, whatever its indentation (tabs on a Mac, spaces
    once pasted somewhere).
    """
    found: dict[str, IfconfigInterface] = {}
    current: IfconfigInterface | None = None
    for line in text.splitlines():
        header = _IFCONFIG_HEADER.fullmatch(line.rstrip())
        if header:
            flags = tuple(f for f in header["flags"].split(",") if f)
            mtu = re.search(r"\bmtu (\d+)", header["rest"])
            current = IfconfigInterface(header["name"], flags, int(mtu[1]) if mtu else None)
            found[current.name] = current
            continue
        words = line.split()
        if current is None or len(words) < 2:
            continue
        key, value = words[0], words[1]
        if key == "inet":
            current.inet.append(value)
        elif key == "inet6":
            current.inet6.append(value)
        elif key == "member:":
            current.members.append(value)
        elif key == "status:":
            current.status = value
    return found


def is_thunderbolt_port(port: str) -> bool:
    """Whether a hardware port is a Thunderbolt link ("Thunderbolt 2"), not the bridge."""
    return _THUNDERBOLT_PORT.fullmatch(port) is not None


def thunderbolt_devices_macos(
    ports: list[HardwarePort], interfaces: dict[str, IfconfigInterface] | None = None
) -> list[str]:
    """The interfaces to advertise on, from the hardware ports and `ifconfig` output.

    With `interfaces` (parsed `ifconfig`): a bridge with members, plus every Thunderbolt enX
    that is not one of its members; only interfaces that exist. Without it membership is
    unknown, so every candidate is returned: the bridge and all the enX.
    Interfaces are kept whether or not a cable is in: the watcher reports when one comes up.
    """
    bridges = [p.device for p in ports if p.port == THUNDERBOLT_BRIDGE_PORT]
    links = [p.device for p in ports if is_thunderbolt_port(p.port)]
    if interfaces is None:
        return _unique(bridges + links)
    members = {m for b in bridges if b in interfaces for m in interfaces[b].members}
    chosen = [b for b in bridges if b in interfaces and interfaces[b].members]
    chosen += [d for d in links if d in interfaces and d not in members]
    return _unique(chosen)


# --- Linux ---------------------------------------------------------------------------


def thunderbolt_devices_linux(sys_class_net: str | os.PathLike[str] = "/sys/class/net") -> list[str]:
    """Interfaces driven by thunderbolt-net (or named thunderbolt*), bridges for members."""
    root = Path(sys_class_net)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    chosen = []
    for name in names:
        if not _is_thunderbolt_linux(root / name):
            continue
        master = root / name / "master"  # symlink to the bridge an interface is enslaved to
        chosen.append(os.path.basename(os.readlink(master)) if master.is_symlink() else name)
    return _unique(chosen)


def _is_thunderbolt_linux(interface: Path) -> bool:
    if interface.name.startswith("thunderbolt"):
        return True
    driver = interface / "device" / "driver"
    return driver.exists() and driver.resolve().name == LINUX_DRIVER


# --- both ----------------------------------------------------------------------------


def thunderbolt_devices(platform: str = sys.platform) -> list[str]:
    """The Thunderbolt interfaces of this machine (empty on platforms without them)."""
    if platform == "darwin":
        ports = parse_hardware_ports(run_command(["networksetup", "-listallhardwareports"]))
        return thunderbolt_devices_macos(ports, parse_ifconfig(run_command(["ifconfig"])))
    if platform.startswith("linux"):
        return thunderbolt_devices_linux()
    return []


def select_interfaces(explicit: list[str] | None = None, strict: bool = True) -> list[str]:
    """The interfaces tbmesh talks on: the ones named with --interface, else Thunderbolt's.

    A name may be a shell pattern ("tb*", "en[2-7]"): it takes whichever interfaces match
    now, so cables plugged later are picked up on the next call. A plain name that does not
    exist is an error (InterfaceError, a ValueError) when `strict`, else skipped (a cable
    pulled since start-up).
    """
    if not explicit:
        return thunderbolt_devices()
    existing = sorted({name for _, name in socket.if_nameindex()})
    chosen = []
    for name in explicit:
        if any(c in name for c in "*?["):
            chosen += fnmatch.filter(existing, name)
        elif name in existing:
            chosen.append(name)
        elif strict:
            raise InterfaceError(
                f"no network interface named {name!r} on this machine (there are: {', '.join(existing)})"
            )
    return _unique(chosen)


def exposed_interfaces(explicit: list[str], thunderbolt: list[str] | None = None) -> list[str]:
    """What `explicit` (--interface names and patterns) serves on that is neither a Thunderbolt
    interface nor loopback: a network other machines share (Wi-Fi, Ethernet), where without a
    cluster secret anyone could join the cluster and read its traffic. A pattern that matches
    nothing yet could match anything later, so it counts as exposed (a plain name that does
    not exist is left to select_interfaces to refuse)."""
    thunderbolt = thunderbolt_devices() if thunderbolt is None else thunderbolt
    exposed = []
    for name in explicit:
        matched = select_interfaces([name], strict=False)
        if not matched and any(c in name for c in "*?["):
            exposed.append(name)
        exposed += [m for m in matched if m not in thunderbolt and not _is_loopback(m)]
    return _unique(exposed)


def _is_loopback(name: str) -> bool:
    addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in interface_addresses([name])[name]]
    return bool(addresses) and all(a.is_loopback for a in addresses)


def interface_addresses(names: list[str]) -> dict[str, list[str]]:
    """IPv4 and IPv6 link-local addresses of each interface ("fe80::1%en2", with its scope).

    Global IPv6 addresses are left out: a Thunderbolt cable between two Macs only ever has
    self-assigned ones, and a global one would be reachable by other routes too.
    """
    all_addresses = psutil.net_if_addrs()
    result: dict[str, list[str]] = {}
    for name in names:
        found = []
        for entry in all_addresses.get(name, []):
            if entry.family == socket.AF_INET:
                found.append(entry.address)
            elif entry.family == socket.AF_INET6:
                bare = entry.address.split("%", 1)[0]
                if ipaddress.IPv6Address(bare).is_link_local:
                    found.append(f"{bare}%{name}")
        result[name] = found
    return result


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
