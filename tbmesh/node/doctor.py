"""`tbmesh doctor`'s checks of this Mac, the ones that need no daemon.

Each check is a pure function over parsed command outputs that returns findings; each
finding says what is wrong in one line and the exact command that fixes it (for hardware,
what to do, since no command can). A check that cannot run here (not a Mac, a command
missing, nothing to compare with) is a finding too, "skipped", saying why. `local_findings`
runs the commands through `run_command` and calls the checks; tests call the checks on
recorded outputs of healthy and broken Macs.

What each check relies on:
- RDMA over Thunderbolt needs macOS 26.2 and Thunderbolt 5 at both ends of a cable (Apple's
  TN3205), switched on in recoveryOS (`rdma_ctl enable`), and its ports out of the
  Thunderbolt Bridge, each with its own IP network (MLX's docs, "Defining a Mesh"; exo#1390).
- A Mac's GPU may wire only so much memory (`iogpu.wired_limit_mb`, 0 = macOS's default,
  about 75% of RAM); a shard above it does not load (measure.usable_macos).
"""

from __future__ import annotations

import math
import platform as platform_module
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tbmesh.core.units import format_bytes
from tbmesh.net.interfaces import parse_ifconfig
from tbmesh.net.rdma import MACOS_WITH_RDMA, RdmaDevice, parse_ibv_devices, parse_ibv_devinfo, parse_rdma_ctl_status
from tbmesh.net.system import CommandError, run_command
from tbmesh.net.thunderbolt import ThunderboltPort, parse_thunderbolt_json
from tbmesh.node.awake import PowerSupply, parse_pmset_batt
from tbmesh.node.measure import GiB, MiB, metal_device_info, parse_sysctl, usable_macos
from tbmesh.node.power import PowerSource, power_source
from tbmesh.node.state import default_state_dir

OK, WARNING, PROBLEM, SKIPPED = "ok", "warning", "problem", "skipped"
STATUSES = (PROBLEM, WARNING, OK, SKIPPED)  # the order findings are shown in
NOT_A_MAC = "not a Mac"
BRIDGE = "bridge0"
# Memory a raised wired limit leaves macOS: we never suggest less than 6 GiB (the recorded M1
# Max with 32 GB, tests/fixtures/macos/sysctl-w-iogpu.wired_limit_mb.1.txt, was set to 26000 MB,
# leaving 6.6 GB).
MACOS_RESERVE = 6 * GiB
ENABLE_RDMA = ("rdma_ctl enable   # in recoveryOS: hold the power button, Options, Utilities > Terminal; "
               "then restart")  # fmt: skip


@dataclass(frozen=True)
class Finding:
    check: str  # "macos", "thunderbolt", "rdma", "bridge", "wired-limit", "disk", "metal", "battery", "power",
    #             "daemon", "service"
    status: str  # OK, WARNING, PROBLEM or SKIPPED
    message: str  # one line: what was found, or why the check could not run here
    fix: str = ""  # the exact command that fixes it (for hardware: what to do); "" when nothing to fix

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# --- the checks (pure) ------------------------------------------------------------------------


def check_macos(version: str | None, wants_rdma: bool) -> Finding:
    """macOS `version` ("26.2"; None: not a Mac) against RDMA's 26.2."""
    if version is None:
        return Finding("macos", SKIPPED, f"{NOT_A_MAC}: no macOS version to check")
    if _version(version) >= _version(MACOS_WITH_RDMA):
        return Finding("macos", OK, f"macOS {version} (RDMA over Thunderbolt needs {MACOS_WITH_RDMA} or later)")
    return Finding("macos", PROBLEM if wants_rdma else WARNING, f"macOS {version} is older than {MACOS_WITH_RDMA}, the first with RDMA over "
                   "Thunderbolt (pipelines run without it)",
                   "sudo softwareupdate --install --all --restart   # or System Settings > General > Software Update")


def check_thunderbolt(ports: Sequence[ThunderboltPort] | None, wants_rdma: bool, why_not: str = "") -> list[Finding]:
    """Each port cabled to another Mac: its link speed, and whether it can carry RDMA."""
    if ports is None:
        return [Finding("thunderbolt", SKIPPED, why_not or f"{NOT_A_MAC}: no Thunderbolt ports to list")]
    macs = [p for p in ports if p.connected and p.peer_is_mac]
    tb5_ports = [p for p in ports if p.thunderbolt_5]
    findings = []
    if not tb5_ports and wants_rdma:
        speeds = ", ".join(sorted({p.speed for p in ports})) or "none"
        findings.append(Finding("thunderbolt", PROBLEM, f"no Thunderbolt 5 port on this Mac ({speeds}): RDMA needs "
                                "Thunderbolt 5; groups here use TCP over Thunderbolt",
                                "use a Mac with Thunderbolt 5 (M4 Pro, M4 Max, M3 Ultra or later) for RDMA"))
    if not macs:
        findings.append(Finding("thunderbolt", WARNING, f"no Mac is cabled to this one over Thunderbolt "
                                f"({len(ports)} ports, none to a Mac)",
                                "cable this Mac to another with a Thunderbolt cable (Thunderbolt 5 for 80 Gb/s)"))
    for port in macs:
        what = f"{port.name} ({port.bus}) links to {port.peer} {port.peer_model} at {port.speed}".replace("  ", " ")
        if port.gbps is not None and port.gbps >= 80:
            rdma = "; that Mac has RDMA on" if port.peer_rdma else "; that Mac does not offer RDMA"
            findings.append(Finding("thunderbolt", OK, f"{what}, Thunderbolt 5{rdma}"))
        else:
            findings.append(Finding("thunderbolt", PROBLEM if wants_rdma else WARNING,
                                    f"{what}: a Thunderbolt 4 or 3 link (half of Thunderbolt 5's 80 Gb/s; no RDMA)",
                                    "use a Thunderbolt 5 port at both ends and a Thunderbolt 5 cable "
                                    "(a Thunderbolt 4 cable or port halves the link)"))  # fmt: skip
    return findings


def check_rdma(enabled: bool | None, devices: Sequence[RdmaDevice], is_mac: bool, wants_rdma: bool) -> Finding:
    """`rdma_ctl status` (None: no such command) and the RDMA devices, one per TB5 port."""
    if not is_mac:
        return Finding("rdma", SKIPPED, f"{NOT_A_MAC}: RDMA over Thunderbolt is macOS's (groups here use the ring backend)")
    if enabled is None:
        return Finding("rdma", PROBLEM if wants_rdma else WARNING,
                       f"this Mac has no rdma_ctl: RDMA over Thunderbolt needs macOS {MACOS_WITH_RDMA} or later",
                       "sudo softwareupdate --install --all --restart")  # fmt: skip
    if not enabled:
        return Finding("rdma", PROBLEM if wants_rdma else WARNING, "RDMA over Thunderbolt is disabled on this Mac "
                       "(tensor groups run over TCP, slower)", ENABLE_RDMA)  # fmt: skip
    if not devices:
        return Finding("rdma", PROBLEM, "RDMA is enabled but this Mac has no RDMA device: it needs Thunderbolt 5 ports",
                       "use a Mac with Thunderbolt 5 ports for RDMA")  # fmt: skip
    named = ", ".join(f"{d.name} ({'cabled' if d.active else 'no cable'})" if d.port_states else d.name
                      for d in devices)  # fmt: skip
    return Finding("rdma", OK, f"RDMA is enabled on {len(devices)} ports: {named}")


def check_bridge(bridge_members: Sequence[str] | None, rdma_interfaces: Sequence[str], wants_rdma: bool,
                 why_not: str = "") -> Finding:  # fmt: skip
    """The Thunderbolt Bridge's members (`ifconfig bridge0`; None: no bridge) against the
    interfaces RDMA would use (empty: unknown, then every member counts)."""
    if bridge_members is None:
        return Finding("bridge", SKIPPED if why_not else OK, why_not or "no Thunderbolt Bridge: each port has its own network")
    caught = [m for m in bridge_members if not rdma_interfaces or m in rdma_interfaces]
    if not caught:
        return Finding("bridge", OK, f"the Thunderbolt Bridge holds no RDMA port ({', '.join(bridge_members) or 'empty'})")
    if not wants_rdma:
        return Finding("bridge", OK, f"the Thunderbolt Bridge holds {', '.join(caught)} (fine without RDMA)")
    fix = "; ".join([f"sudo ifconfig {BRIDGE} deletem {m}" for m in caught]
                    + ['sudo networksetup -setnetworkserviceenabled "Thunderbolt Bridge" off'])  # fmt: skip
    return Finding("bridge", PROBLEM, f"{', '.join(caught)} {'is' if len(caught) == 1 else 'are'} inside the "
                   "Thunderbolt Bridge: RDMA needs its ports out of it, each with its own network", fix)


def check_wired_limit(shard_bytes: int | None, total: int | None, device_info: dict[str, Any] | None,
                      wired_limit_mb: int | None, is_mac: bool) -> Finding:  # fmt: skip
    """The shard this Mac is to hold against what its GPU may wire."""
    if not is_mac:
        return Finding("wired-limit", SKIPPED, f"{NOT_A_MAC}: no GPU wired-memory limit (iogpu.wired_limit_mb)")
    if total is None:
        return Finding("wired-limit", SKIPPED, "the memory size could not be read")
    usable = usable_macos(total, device_info, wired_limit_mb)
    limit = f"iogpu.wired_limit_mb={wired_limit_mb}" if wired_limit_mb else "macOS's default limit"
    if shard_bytes is None:
        return Finding("wired-limit", SKIPPED, f"the GPU may wire {format_bytes(usable)} ({limit}); no shard size to "
                       "compare (give --shard-size)")  # fmt: skip
    if shard_bytes <= usable:
        return Finding("wired-limit", OK, f"a {format_bytes(shard_bytes)} shard fits the {format_bytes(usable)} the GPU "
                       f"may wire ({limit})")  # fmt: skip
    if shard_bytes > total - MACOS_RESERVE:
        return Finding("wired-limit", PROBLEM, f"a {format_bytes(shard_bytes)} shard does not fit this Mac's "
                       f"{format_bytes(total)} of memory with {format_bytes(MACOS_RESERVE)} left for macOS",
                       "give this Mac fewer layers: add a Mac to the cluster, or use a smaller quantization")
    needed_mb = math.ceil(shard_bytes / GiB) * 1024  # whole GiB, in MB as sysctl takes it
    needed_mb = min(needed_mb, (total - MACOS_RESERVE) // MiB)
    return Finding("wired-limit", PROBLEM, f"a {format_bytes(shard_bytes)} shard is more than the "
                   f"{format_bytes(usable)} the GPU may wire ({limit})",
                   f"sudo sysctl iogpu.wired_limit_mb={needed_mb}   # until restart; to keep it, add "
                   f"iogpu.wired_limit_mb={needed_mb} to /etc/sysctl.conf")  # fmt: skip


def check_disk(free_bytes: int | None, needed_bytes: int | None, where: Path) -> Finding:
    """Free space where the layers go, against what they take."""
    if free_bytes is None:
        return Finding("disk", SKIPPED, f"the free space of {where} could not be read")
    if needed_bytes is None:
        return Finding("disk", SKIPPED, f"{format_bytes(free_bytes)} free in {where}; no shard size to compare "
                       "(give --shard-size)")  # fmt: skip
    if free_bytes >= needed_bytes:
        return Finding("disk", OK, f"{format_bytes(free_bytes)} free in {where} for a {format_bytes(needed_bytes)} shard")
    return Finding("disk", PROBLEM, f"{format_bytes(free_bytes)} free in {where}, a {format_bytes(needed_bytes)} "
                   "shard does not fit",
                   f"free {format_bytes(needed_bytes - free_bytes)} there, or run the daemon with --state-dir on a "
                   "bigger disk")  # fmt: skip


def check_metal(device_info: dict[str, Any] | None, is_mac: bool, why_not: str = "") -> Finding:
    """MLX's Metal device (mx.device_info())."""
    if not is_mac:
        return Finding("metal", SKIPPED, f"{NOT_A_MAC}: MLX runs on the CPU here")
    if device_info is None:
        return Finding("metal", PROBLEM, f"MLX finds no Metal GPU{f' ({why_not})' if why_not else ''}: it needs a "
                       "native arm64 Python on Apple silicon",
                       "python3 -c 'import platform; print(platform.machine())'   # must print arm64; then: "
                       "pip install --force-reinstall mlx")  # fmt: skip
    name = device_info.get("device_name") or device_info.get("architecture", "a Metal GPU")
    working_set = device_info.get("max_recommended_working_set_size")
    extra = f", recommended working set {format_bytes(int(working_set))}" if working_set else ""
    return Finding("metal", OK, f"MLX uses {name}{extra}")


def check_daemon(problem: str | None, api: str) -> Finding:
    """Whether a daemon answers at `api` (`problem`: why not, in one line; None: it answers)."""
    if problem is None:
        return Finding("daemon", OK, f"a tbmesh daemon answers at {api}")
    return Finding("daemon", WARNING, f"no tbmesh daemon answers at {api} ({problem})",
                   "tbmesh daemon   # or once, as a service that starts at boot: sudo tbmesh install")


def check_battery(supply: PowerSupply | None, is_mac: bool, why_not: str = "") -> Finding:
    """Where this Mac's power comes from (`pmset -g batt`): a MacBook on battery may be slowed
    and is put to sleep when the battery runs low, in the middle of an answer. (The lid is not
    in pmset's output; it is not checked yet.)"""
    if not is_mac:
        return Finding("battery", SKIPPED, f"{NOT_A_MAC}: pmset is macOS's")
    if supply is None:
        return Finding("battery", SKIPPED, why_not or "pmset -g batt could not be read")
    battery = supply.battery
    charge = f"battery {battery.percent}%, {battery.state}" if battery else "no battery"
    if supply.on_battery:
        left = f", {battery.remaining} left" if battery and battery.remaining else ""
        return Finding("battery", WARNING, f"on battery ({charge}{left}): macOS may slow this Mac and puts it to "
                       "sleep when the battery runs low", "plug this Mac in to power")  # fmt: skip
    return Finding("battery", OK, f"on {supply.source} ({charge})")


def check_power(source: str, why_not: str, is_mac: bool) -> Finding:
    """Whether this machine's power can be read (node/power.py's source, or why not)."""
    if not why_not:
        return Finding("power", OK, f"power is read from {source}")
    if is_mac:
        return Finding("power", WARNING, why_not, "brew install macmon")
    return Finding("power", SKIPPED, why_not)


def parse_launchctl_print(text: str) -> dict[str, str]:
    """The `key = value` lines at the top level of `launchctl print <target>` ("state",
    "pid", "path", "last exit code"...); nested blocks are skipped."""
    found: dict[str, str] = {}
    depth = 0
    for line in text.splitlines()[1:]:  # the first line opens the service's block
        stripped = line.strip()
        if stripped == "}":
            depth -= 1
            continue
        key, sep, value = stripped.partition(" = ")
        if sep and depth == 0:
            found.setdefault(key, value)
        if stripped.endswith("{"):
            depth += 1
    return found


def check_service(printed: dict[str, str] | None, target: str, is_mac: bool) -> Finding:
    """The launchd service (`launchctl print` parsed; None: launchd does not know it)."""
    if not is_mac:
        return Finding("service", SKIPPED, f"{NOT_A_MAC}: the service is launchd's (tbmesh install)")
    if printed is None:
        return Finding("service", WARNING, "tbmesh is not installed as a service: it will not start at boot",
                       "sudo tbmesh install   # with the flags you give tbmesh daemon")  # fmt: skip
    state = printed.get("state", "unknown")
    if state == "running":
        return Finding("service", OK, f"the service {target} is running (pid {printed.get('pid', '?')})")
    last = printed.get("last exit code", "")
    return Finding("service", PROBLEM, f"the service {target} is {state}" + (f" (last exit: {last})" if last else ""),
                   f"sudo launchctl kickstart -k {target}   # its log: ~/Library/Logs/tbmesh/daemon.log")


# --- running them here --------------------------------------------------------------------------


def local_findings(
    shard_bytes: int | None = None,
    wants_rdma: bool | None = None,
    layers_dir: Path | None = None,
    daemon_problem: str | None = "not asked",
    api: str = "",
    service_targets: Sequence[str] = (),
    platform: str = sys.platform,
    run: Callable[[list[str]], str] = run_command,
    mac_version: Callable[[], str] = lambda: platform_module.mac_ver()[0],
    device_info: Callable[[], dict[str, Any] | None] = metal_device_info,
    power: Callable[[str], PowerSource] = power_source,
) -> list[Finding]:
    """Every local check of this machine, in the order shown. `wants_rdma` None: RDMA is
    wanted when it is enabled. `daemon_problem`: why no daemon answers at `api`, None when one
    does (the caller asks it). `service_targets`: the launchd targets tbmesh may be installed
    as ("system/com.tbmesh.daemon", "gui/501/com.tbmesh.daemon"). `layers_dir`: where the
    layers go, the daemon's state directory by default."""
    layers_dir = default_state_dir() if layers_dir is None else layers_dir
    is_mac = platform == "darwin"
    enabled: bool | None = None
    devices: list[RdmaDevice] = []
    if is_mac:
        enabled, devices = _rdma(run)
    wants = bool(enabled) if wants_rdma is None else wants_rdma
    findings = [check_macos((mac_version() or None) if is_mac else None, wants)]

    ports: list[ThunderboltPort] | None = None
    why_not = ""
    if is_mac:
        try:
            ports = parse_thunderbolt_json(run(["system_profiler", "-json", "SPThunderboltDataType"]))
        except (CommandError, ValueError) as error:
            why_not = f"the Thunderbolt ports could not be listed: {error}"
    findings += check_thunderbolt(ports, wants, why_not)
    findings.append(check_rdma(enabled, devices, is_mac, wants))

    members: list[str] | None = None
    why_not = "" if is_mac else f"{NOT_A_MAC}: no Thunderbolt Bridge"
    if is_mac:
        try:
            bridge = parse_ifconfig(run(["ifconfig", BRIDGE])).get(BRIDGE)
            members = bridge.members if bridge else None
        except CommandError:
            members = None  # `ifconfig bridge0` fails when there is no bridge: nothing to take out
    findings.append(check_bridge(members, [d.interface for d in devices], wants, why_not))

    total = wired = None
    info = None
    metal_why = ""
    if is_mac:
        total = _sysctl_int(run, "hw.memsize")
        wired = _sysctl_int(run, "iogpu.wired_limit_mb")  # missing before macOS 14 (debug.iogpu then)
        try:
            info = device_info()
        except (ImportError, OSError, RuntimeError) as error:  # MLX missing or broken: that is the finding
            metal_why = f"{type(error).__name__}: {error}"
    findings.append(check_wired_limit(shard_bytes, total, info, wired, is_mac))
    try:
        free: int | None = shutil.disk_usage(_existing(layers_dir)).free
    except OSError:
        free = None
    findings.append(check_disk(free, shard_bytes, layers_dir))
    findings.append(check_metal(info, is_mac, metal_why))
    supply = None
    why_not = ""
    if is_mac:
        try:
            supply = parse_pmset_batt(run(["pmset", "-g", "batt"]))
        except (CommandError, ValueError) as error:
            why_not = str(error)
    findings.append(check_battery(supply, is_mac, why_not))
    source = power(platform)  # made, not started: a stream starts at its first sample
    findings.append(check_power(source.name, source.why_not, is_mac))
    source.close()
    findings.append(check_daemon(daemon_problem, api))
    findings.append(_service(service_targets, is_mac, run))
    return findings


def _rdma(run: Callable[[list[str]], str]) -> tuple[bool | None, list[RdmaDevice]]:
    try:
        enabled = parse_rdma_ctl_status(run(["rdma_ctl", "status"]))
    except (CommandError, ValueError):
        return None, []
    if not enabled:
        return False, []
    for command, parse in ((["ibv_devinfo"], parse_ibv_devinfo), (["ibv_devices"], parse_ibv_devices)):
        try:
            return True, parse(run(command))
        except CommandError:
            continue
    return True, []


def _service(targets: Sequence[str], is_mac: bool, run: Callable[[list[str]], str]) -> Finding:
    if not is_mac or not targets:
        return check_service(None, "", is_mac)
    for target in targets:
        try:
            return check_service(parse_launchctl_print(run(["launchctl", "print", target])), target, is_mac)
        except CommandError:
            continue  # "Could not find service": not loaded in that domain
    return check_service(None, targets[0], is_mac)


def _sysctl_int(run: Callable[[list[str]], str], name: str) -> int | None:
    try:
        value = parse_sysctl(run(["sysctl", name])).get(name, "")
    except CommandError:
        return None
    return int(value) if value.isdigit() else None


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (the state directory may not exist yet)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())
