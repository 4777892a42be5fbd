"""RDMA over Thunderbolt 5 (macOS 26.2+): is it on, which devices a Mac has, and what MLX's
`jaccl` backend needs to join a tensor-parallel group over them.

The facts this module relies on:

- RDMA is switched on once per Mac, from recoveryOS only (`rdma_ctl enable`, then reboot);
  `rdma_ctl status` prints "enabled" or "disabled" (MLX's distributed docs, "Enabling RDMA").
- Each Thunderbolt 5 port is then an ibverbs device named after its network interface:
  en2 <-> rdma_en2 (MLX's `mlx.distributed_config` names the device of interface `iface`
  f"rdma_{iface}", mlx/_distributed_utils/config.py `configure_jaccl`). `ibv_devices` lists
  them; a Thunderbolt 4 Mac with RDMA enabled lists none (tests/fixtures/macos/ibv_devices.4.txt).
  `ibv_devinfo` says per device whether its port is PORT_ACTIVE (a cable to a Mac is in).
- jaccl connects every pair of ranks directly (a full mesh of cables). A rank finds its
  group in the environment (MLX docs, "Distributed Without mlx.launch", JACCL; the same
  variables `mlx.launch --backend jaccl` sets, mlx/_distributed_utils/launch.py `launch_jaccl`):
  MLX_RANK, MLX_JACCL_COORDINATOR (an "ip:port" of rank 0 that every rank reaches) and
  MLX_IBV_DEVICES, the path of a JSON file holding the device matrix: row i, column j is the
  device on rank i's Mac whose cable goes to rank j's Mac (null on the diagonal), or a list
  of devices when a pair has several cables (the k-th name on both sides is the k-th cable).
  MLX_METAL_FAST_SYNCH=1 is "pretty critical for low-latency communication" (MLX docs).
- The Thunderbolt Bridge must not hold the ports used, and each cable needs its own small
  IP network, though RDMA itself does not use TCP/IP (MLX docs, "Defining a Mesh").

Mac-only commands go through small functions whose parsing is tested on recorded outputs
(tests/fixtures/macos/, see SOURCES.md there).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tbmesh.net.interfaces import HardwarePort, is_thunderbolt_port
from tbmesh.net.system import CommandError, run_command

DEVICE_PREFIX = "rdma_"
PORT_ACTIVE = "PORT_ACTIVE"
MACOS_WITH_RDMA = "26.2"

ENABLE_INSTRUCTIONS = f"""\
RDMA over Thunderbolt needs macOS {MACOS_WITH_RDMA} or later and Thunderbolt 5 ports. It can only be
switched on from recoveryOS, never from a running system (not even with sudo):
  1. Shut the Mac down. Press and hold the power button until "Loading startup options"
     appears, choose Options, then Continue.
  2. In recoveryOS open Utilities > Terminal.
  3. Run: rdma_ctl enable
  4. Restart the Mac.
Check it is on: `rdma_ctl status` prints "enabled", `ibv_devices` lists one rdma_enX per
Thunderbolt 5 port, and `ibv_devinfo` shows "state: PORT_ACTIVE" on the ports cabled to
another Mac. Take those ports out of the Thunderbolt Bridge (System Settings > Network)."""


class RdmaError(ValueError):
    """A group that jaccl cannot run (a pair of Macs without a cable, a missing device); one line."""


@dataclass(frozen=True)
class RdmaDevice:
    """One ibverbs device: a Thunderbolt port of this Mac."""

    name: str  # "rdma_en2"
    guid: str = ""  # node GUID as the command prints it
    port_states: tuple[str, ...] = ()  # per port, "PORT_ACTIVE", "PORT_DOWN" (ibv_devinfo only)

    @property
    def interface(self) -> str:
        """The network interface of the same port: rdma_en2 -> en2."""
        return interface_of(self.name)

    @property
    def active(self) -> bool:
        return PORT_ACTIVE in self.port_states


@dataclass(frozen=True)
class RdmaStatus:
    """What this Mac offers for jaccl: whether RDMA is on, its devices, and if unusable why."""

    enabled: bool | None  # `rdma_ctl status`; None where the command does not exist
    devices: tuple[RdmaDevice, ...] = ()
    why_not: str = ""  # one line; "" when RDMA can be used

    @property
    def usable(self) -> bool:
        return not self.why_not


# --- parsing ---------------------------------------------------------------------------


def parse_rdma_ctl_status(text: str) -> bool:
    """`rdma_ctl status`: "enabled" or "disabled" (ValueError for anything else)."""
    word = text.strip().lower()
    if word not in ("enabled", "disabled"):
        raise ValueError(f"rdma_ctl status printed {text.strip()[:60]!r}, not enabled or disabled")
    return word == "enabled"


def parse_ibv_devices(text: str) -> list[RdmaDevice]:
    """`ibv_devices`: a header ("device  node GUID"), a dashes line, then one device a line.

    Split on any whitespace: the real output separates the columns with padding and a tab,
    copies pasted elsewhere lose the tab (tests/fixtures/macos/ibv_devices.1.txt)."""
    devices = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] == "device" or words[0].startswith("-"):
            continue
        devices.append(RdmaDevice(words[0], words[1] if len(words) > 1 else ""))
    return devices


def parse_ibv_devinfo(text: str) -> list[RdmaDevice]:
    """`ibv_devinfo`: a block per device from "hca_id: <name>", its port states within."""
    devices: list[RdmaDevice] = []
    name = guid = None
    states: list[str] = []

    def close() -> None:
        if name is not None:
            devices.append(RdmaDevice(name, guid or "", tuple(states)))

    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "hca_id":
            close()
            name, guid, states = value, None, []
        elif key == "node_guid":
            guid = value
        elif key == "state" and value:
            states.append(value.split()[0])  # "PORT_DOWN (1)"
    close()
    return devices


# --- interfaces and devices --------------------------------------------------------------


def device_of(interface: str) -> str:
    """The RDMA device of a Thunderbolt interface: en2 -> rdma_en2."""
    return DEVICE_PREFIX + interface


def interface_of(device: str) -> str:
    """The interface of an RDMA device: rdma_en2 -> en2."""
    return device.removeprefix(DEVICE_PREFIX)


def thunderbolt_rdma_devices(ports: Sequence[HardwarePort], devices: Iterable[RdmaDevice]) -> dict[str, str]:
    """{Thunderbolt interface: its RDMA device} for the ports that have one (networksetup's
    "Thunderbolt N" ports; the bridge has no device)."""
    names = {d.name for d in devices}
    return {p.device: device_of(p.device) for p in ports
            if is_thunderbolt_port(p.port) and device_of(p.device) in names}


def assess(enabled: bool | None, devices: Sequence[RdmaDevice]) -> RdmaStatus:
    """Whether RDMA can be used, from `rdma_ctl status` (None: no such command) and the devices."""
    if enabled is None:
        why = f"RDMA over Thunderbolt needs macOS {MACOS_WITH_RDMA} or later (this Mac has no rdma_ctl)"
    elif not enabled:
        why = "RDMA is disabled on this Mac: start it in recoveryOS and run `rdma_ctl enable` there, then restart"
    elif not devices:
        why = "RDMA is enabled but this Mac has no RDMA device (it needs Thunderbolt 5 ports)"
    else:
        why = ""
    return RdmaStatus(enabled, tuple(devices), why)


def rdma_status(platform: str = sys.platform) -> RdmaStatus:
    """This machine's RDMA status, from `rdma_ctl status` and `ibv_devinfo` (`ibv_devices`
    when ibv_devinfo fails). Not a Mac: not usable, saying so."""
    if platform != "darwin":
        return RdmaStatus(None, (), "RDMA over Thunderbolt is for Macs (jaccl); here groups use the ring backend")
    try:
        enabled: bool | None = parse_rdma_ctl_status(run_command(["rdma_ctl", "status"]))
    except CommandError:
        enabled = None
    except ValueError as error:
        return RdmaStatus(None, (), str(error))
    devices: list[RdmaDevice] = []
    if enabled:
        try:
            devices = parse_ibv_devinfo(run_command(["ibv_devinfo"]))
        except CommandError:
            try:
                devices = parse_ibv_devices(run_command(["ibv_devices"]))
            except CommandError:
                devices = []
    return assess(enabled, devices)


def link_device(local_address: str, addresses: Mapping[str, Sequence[str]], status: RdmaStatus) -> str:
    """The RDMA device of the port a connection runs over, "" when it has none: the interface
    holding the connection's local address (`addresses`: interface_addresses of the served
    interfaces) must have a device, and its port must not be known to be down (ibv_devices
    says nothing of ports: unknown counts as up). A connection over the Thunderbolt Bridge
    has none: RDMA needs the port out of the bridge."""
    if not status.usable:
        return ""
    bare = local_address.split("%", 1)[0]  # "fe80::1%en2" from either side
    interface = next((name for name, found in addresses.items()
                      if any(a.split("%", 1)[0] == bare for a in found)), None)
    device = next((d for d in status.devices if interface is not None and d.interface == interface), None)
    if device is None or (device.port_states and not device.active):
        return ""
    return device.name


# --- the group -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cable:
    """One Thunderbolt cable between two Macs: the interface it plugs into at each end."""

    a: str  # node id
    a_interface: str  # "en2"
    b: str
    b_interface: str


DeviceMatrix = list[list[str | list[str] | None]]


def device_matrix(members: Sequence[str], cables: Iterable[Cable],
                  devices: Mapping[str, Collection[str]] | None = None) -> DeviceMatrix:
    """jaccl's device matrix for a group whose rank i runs on node members[i].

    Every pair needs a cable (jaccl's mesh); with several cables between every pair, all
    pairs use as many as the least cabled pair has, as `mlx.distributed_config` does.
    `devices`, when given, is each node's RDMA devices (from its RdmaStatus): a cable into
    a port without one (not Thunderbolt 5, or RDMA off) is refused, naming it.
    """
    if len(set(members)) != len(members):
        raise RdmaError(f"a node appears twice in the group {list(members)}")
    rank = {node: i for i, node in enumerate(members)}
    ends: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for cable in cables:
        if cable.a in rank and cable.b in rank and cable.a != cable.b:
            i, j = rank[cable.a], rank[cable.b]
            ends.setdefault((i, j), []).append((cable.a_interface, cable.b_interface))
            ends.setdefault((j, i), []).append((cable.b_interface, cable.a_interface))
    for (i, j), pair in ends.items():
        if devices is not None:
            missing = [iface for iface, _ in pair if device_of(iface) not in devices.get(members[i], ())]
            if missing:
                raise RdmaError(f"{members[i]} has no RDMA device for {missing[0]} (the cable to {members[j]}): "
                                "RDMA off, or not a Thunderbolt 5 port")
        pair.sort(key=lambda e: e[0] if i < j else e[1])  # the same cable order seen from both ends
    n = len(members)
    lonely = [(members[i], members[j]) for i in range(n) for j in range(i + 1, n) if (i, j) not in ends]
    if lonely:
        a, b = lonely[0]
        raise RdmaError(f"jaccl needs a cable between every two Macs of the group: none between {a} and {b}"
                        + (f" (and {len(lonely) - 1} more pairs)" if len(lonely) > 1 else ""))
    count = min((len(pair) for pair in ends.values()), default=0)
    matrix: DeviceMatrix = []
    for i in range(n):
        row: list[str | list[str] | None] = []
        for j in range(n):
            if i == j:
                row.append(None)
                continue
            names = [device_of(iface) for iface, _ in ends[(i, j)][:count]]
            row.append(names[0] if count == 1 else names)
        matrix.append(row)
    return matrix


def jaccl_environment(rank: int, coordinator: str, devices_file: str) -> dict[str, str]:
    """The environment of a jaccl rank: MLX_IBV_DEVICES names a file holding the matrix
    (write `json.dumps(device_matrix(...))` there, as mlx.launch does)."""
    if not re.fullmatch(r"[^\s:]+:\d+", coordinator):
        raise RdmaError(f"the coordinator must be ip:port, not {coordinator!r}")
    return {"MLX_RANK": str(rank), "MLX_JACCL_COORDINATOR": coordinator,
            "MLX_IBV_DEVICES": devices_file, "MLX_METAL_FAST_SYNCH": "1"}
