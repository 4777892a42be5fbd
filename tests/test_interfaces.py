"""Thunderbolt interface detection: macOS parsing on recorded outputs, Linux on real sysfs
trees and a real network namespace."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from recorded import recorded

from tbmesh.net import interfaces, system
from tbmesh.net.interfaces import (
    HardwarePort,
    IfconfigInterface,
    InterfaceError,
    interface_addresses,
    parse_hardware_ports,
    parse_ifconfig,
    select_interfaces,
    thunderbolt_devices,
    thunderbolt_devices_linux,
    thunderbolt_devices_macos,
)


def ports_of(n: int) -> list[HardwarePort]:
    return parse_hardware_ports(recorded(f"networksetup-listallhardwareports.{n}.txt"))


# --- networksetup -listallhardwareports ---------------------------------------------


def test_hardware_ports_without_leading_blank_or_final_newline():
    ports = ports_of(1)
    assert [(p.port, p.device) for p in ports] == [
        ("Ethernet Adapter (en3)", "en3"),
        ("Thunderbolt Bridge", "bridge0"),
        ("Wi-Fi", "en0"),
        ("Thunderbolt 1", "en1"),
        ("Thunderbolt 2", "en6"),
        ("Thunderbolt 3", "en2"),
    ]
    assert ports[0].address == "02:00:00:00:00:04"


def test_hardware_ports_with_leading_blank_line_and_vlan_footer():
    ports = ports_of(2)
    assert [p.device for p in ports] == ["en0", "en8", "en1", "en2", "en3", "en4", "en5", "en6", "en7"]
    assert ports[-1] == HardwarePort("Thunderbolt 6", "en7", "02:00:5e:00:53:07")


def test_hardware_ports_partial_output_keeps_its_last_stanza():
    ports = ports_of(5)  # cut off after the bridge, no footer
    assert ports[-1] == HardwarePort("Thunderbolt Bridge", "bridge0", "82:f1:30:25:50:01")
    assert len(ports) == 6


def test_hardware_ports_ignore_whatever_follows_the_vlan_footer():
    text = recorded("networksetup-listallhardwareports.4.txt") + "Hardware Port: Bogus\nDevice: vlan0\n"
    assert [p.device for p in parse_hardware_ports(text)] == [p.device for p in ports_of(4)]
    assert "vlan0" not in [p.device for p in parse_hardware_ports(text)]


# --- ifconfig ------------------------------------------------------------------------


def test_ifconfig_bridge_with_spaces_instead_of_tabs():
    bridge = parse_ifconfig(recorded("ifconfig-bridge0.1.txt"))["bridge0"]
    assert bridge.flags == ("UP", "BROADCAST", "SMART", "RUNNING", "SIMPLEX", "MULTICAST")
    assert bridge.up and bridge.mtu == 9000 and bridge.status == "active"
    assert bridge.inet == ["10.25.0.1"]
    assert bridge.inet6 == ["fe80::1442:a0bf:3f10:95ba%bridge0"]
    assert bridge.members == ["en2", "en3", "en4"]


def test_ifconfig_bridge_with_address_cache_section():
    bridge = parse_ifconfig(recorded("ifconfig-bridge0.2.txt"))["bridge0"]
    assert bridge.inet == ["169.254.80.69"]
    assert bridge.members == ["en2", "en3", "en4"]  # the cache lines name en4/en2 but are not members
    assert bridge.status == "active"


def test_ifconfig_thunderbolt_port_with_tabs_and_several_interfaces():
    text = recorded("ifconfig-v-en2.1.txt") + recorded("ifconfig-bridge0.1.txt")
    found = parse_ifconfig(text)
    assert list(found) == ["en2", "bridge0"]
    en2 = found["en2"]
    assert en2.status == "inactive" and en2.mtu == 1500 and "PROMISC" in en2.flags
    assert en2.inet == [] and en2.members == []  # a bridge member has no address of its own


# --- which interfaces on macOS -------------------------------------------------------


def present(*names: str, bridge_members: tuple[str, ...] = ()) -> dict[str, IfconfigInterface]:
    found = {name: IfconfigInterface(name, ("UP",)) for name in names}
    found["bridge0"] = IfconfigInterface("bridge0", ("UP",), members=list(bridge_members))
    return found


def test_macos_bridge_with_members_is_used_instead_of_them():
    ports = ports_of(3)  # bridge0; Thunderbolt 1/2/3 = en1/en6/en2; Wi-Fi, Ethernet, USB LAN
    ifconfig = present("en0", "en1", "en2", "en3", "en6", "en10", bridge_members=("en1", "en6", "en2"))
    assert thunderbolt_devices_macos(ports, ifconfig) == ["bridge0"]


def test_macos_empty_bridge_gives_the_thunderbolt_ports():
    ports = ports_of(3)
    ifconfig = present("en0", "en1", "en2", "en3", "en6", "en10")
    assert thunderbolt_devices_macos(ports, ifconfig) == ["en1", "en6", "en2"]


def test_macos_port_taken_out_of_the_bridge_is_used_next_to_it():
    ports = ports_of(3)
    ifconfig = present("en0", "en1", "en2", "en3", "en6", "en10", bridge_members=("en2",))
    assert thunderbolt_devices_macos(ports, ifconfig) == ["bridge0", "en1", "en6"]


def test_macos_without_a_bridge_port_and_without_ifconfig():
    assert thunderbolt_devices_macos(ports_of(2)) == ["en2", "en3", "en4", "en5", "en6", "en7"]
    # membership unknown: every candidate
    assert thunderbolt_devices_macos(ports_of(4)) == ["bridge0", "en1", "en2", "en3"]


def test_macos_never_picks_wifi_ethernet_or_a_thunderbolt_ethernet_adapter():
    text = recorded("networksetup-listallhardwareports.3.txt").replace(
        "Hardware Port: USB 10/100/1000 LAN", "Hardware Port: Thunderbolt Ethernet Slot 1"
    )
    chosen = thunderbolt_devices_macos(parse_hardware_ports(text))
    assert chosen == ["bridge0", "en1", "en6", "en2"]
    for n in (1, 2, 3, 4, 5):
        others = {p.device for p in ports_of(n) if not p.port.startswith("Thunderbolt")}
        assert not others & set(thunderbolt_devices_macos(ports_of(n)))


def test_macos_ports_missing_from_ifconfig_are_skipped():
    ifconfig = present("en1", bridge_members=())
    assert thunderbolt_devices_macos(ports_of(3), ifconfig) == ["en1"]


def test_thunderbolt_devices_on_macos_runs_networksetup_and_ifconfig(monkeypatch):
    outputs = {
        ("networksetup", "-listallhardwareports"): recorded("networksetup-listallhardwareports.4.txt"),
        ("ifconfig",): recorded("ifconfig-v-en2.1.txt") + recorded("ifconfig-bridge0.1.txt"),
    }
    monkeypatch.setattr(interfaces, "run_command", lambda args: outputs[tuple(args)])
    # Thunderbolt 1/2/3 = en1/en2/en3; bridge0 holds en2 and en3; en1 is not in ifconfig
    assert thunderbolt_devices("darwin") == ["bridge0"]


def test_no_thunderbolt_devices_on_other_platforms():
    assert thunderbolt_devices("win32") == []


# --- Linux sysfs ---------------------------------------------------------------------


def fake_sysfs(root: Path) -> Path:
    """A /sys/class/net with real symlinks, laid out like the kernel's."""
    drivers = root / "bus"
    (drivers / "thunderbolt" / "drivers" / "thunderbolt-net").mkdir(parents=True)
    (drivers / "pci" / "drivers" / "igc").mkdir(parents=True)
    devices = root / "devices"
    net = root / "class" / "net"
    net.mkdir(parents=True)

    def interface(name: str, device: str | None = None, driver: Path | None = None, master: str | None = None):
        if device is None:
            place = devices / "virtual" / "net" / name
            place.mkdir(parents=True)
        else:
            dev = devices / device
            place = dev / "net" / name
            place.mkdir(parents=True)
            os.symlink(os.path.relpath(dev, place), place / "device")
            os.symlink(os.path.relpath(driver, dev), dev / "driver")
        if master is not None:
            os.symlink(os.path.relpath(devices / "virtual" / "net" / master, place), place / "master")
        os.symlink(os.path.relpath(place, net), net / name)

    tb = drivers / "thunderbolt" / "drivers" / "thunderbolt-net"
    interface("lo")
    interface("br0")
    interface("eth0", "pci0000:00/0000:00:1f.6", drivers / "pci" / "drivers" / "igc")
    interface("thunderbolt0", "pci0000:00/domain0/0-0/0-1/0-1.0", tb)
    interface("tb-left", "pci0000:00/domain0/0-0/0-3/0-3.0", tb)  # renamed by udev
    interface("thunderbolt1")  # no device link: recognised by its name
    interface("tb-right", "pci0000:00/domain1/1-0/1-1/1-1.0", tb, master="br0")
    interface("veth1")
    return net


def test_linux_thunderbolt_net_interfaces_from_sysfs(tmp_path):
    net = fake_sysfs(tmp_path)
    assert (net / "tb-left" / "device" / "driver").resolve().name == "thunderbolt-net"  # the fake is sound
    assert thunderbolt_devices_linux(net) == ["tb-left", "br0", "thunderbolt0", "thunderbolt1"]


def test_linux_missing_sysfs_gives_nothing(tmp_path):
    assert thunderbolt_devices_linux(tmp_path / "nope") == []


def test_linux_real_sysfs_never_picks_ethernet_or_loopback():
    chosen = thunderbolt_devices_linux()
    assert "lo" not in chosen and "eth0" not in chosen


# --- selection and addresses ---------------------------------------------------------


def test_select_explicit_interfaces_that_exist():
    assert select_interfaces(["lo", "lo"]) == ["lo"]


def test_select_a_missing_interface_is_a_one_line_error():
    with pytest.raises(InterfaceError) as caught:
        select_interfaces(["lo", "tbnope0"])
    message = str(caught.value)
    assert "'tbnope0'" in message and "lo" in message and "\n" not in message
    assert isinstance(caught.value, ValueError)


def test_select_without_names_uses_the_thunderbolt_interfaces(monkeypatch):
    monkeypatch.setattr(interfaces, "thunderbolt_devices", lambda: ["thunderbolt0"])
    assert select_interfaces(None) == ["thunderbolt0"]
    assert select_interfaces([]) == ["thunderbolt0"]


def addr(family: int, address: str) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address, netmask=None, broadcast=None, ptp=None)


def test_addresses_keep_ipv4_and_link_local_ipv6_with_scope(monkeypatch):
    link = psutil.AF_LINK
    fake = {
        "en2": [addr(link, "36:32:70:3f:d9:04"), addr(socket.AF_INET6, "fe80::1")],
        "bridge0": [
            addr(socket.AF_INET, "169.254.80.69"),
            addr(socket.AF_INET6, "fe80::1096:5fe7:adbf:e70c%bridge0"),
            addr(socket.AF_INET6, "fd00::5"),
        ],
    }
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: fake)
    assert interface_addresses(["bridge0", "en2", "en9"]) == {
        "bridge0": ["169.254.80.69", "fe80::1096:5fe7:adbf:e70c%bridge0"],
        "en2": ["fe80::1%en2"],
        "en9": [],
    }


def test_addresses_of_loopback():
    assert interface_addresses(["lo"])["lo"] == ["127.0.0.1"]  # ::1 is not link-local


def test_addresses_and_selection_inside_a_network_namespace(lab):
    """Real interfaces, as a cluster test uses them: a veth pair in a namespace."""
    script = (
        "import json; from tbmesh.net.interfaces import interface_addresses, select_interfaces\n"
        "chosen = select_interfaces(['tbA'])\n"
        "try:\n    select_interfaces(['eth0']); missing = ''\nexcept ValueError as e:\n    missing = str(e)\n"
        "print(json.dumps([chosen, interface_addresses(['tbA', 'tbB']), missing]))"
    )
    mac = lab.add_mac("w")
    mac.ip_batch(
        "link add tbA type veth peer name tbB\n"
        "addr add 10.5.0.1/24 dev tbA\n"
        "addr add fe80::1/64 dev tbA nodad\n"
        "addr add fd00::1/64 dev tbA nodad\n"
    )
    chosen, found, missing = json.loads(mac.check_output([sys.executable, "-c", script]))
    assert chosen == ["tbA"]
    assert found == {"tbA": ["10.5.0.1", "fe80::1%tbA"], "tbB": []}
    assert "'eth0'" in missing  # the root namespace's eth0 is not visible in there


def test_run_command_returns_output_and_fails_in_one_line():
    assert system.run_command(["echo", "hello"]) == "hello\n"
    with pytest.raises(system.CommandError) as failed:
        system.run_command(["sh", "-c", "echo first >&2; echo 'no such key' >&2; exit 3"])
    assert str(failed.value).endswith("no such key")
    with pytest.raises(system.CommandError):
        system.run_command(["tbmesh-no-such-command"])


def test_interface_patterns_match_what_exists_now_and_missing_names_are_skipped_when_not_strict():
    assert "lo" in select_interfaces(["l*"])
    assert select_interfaces(["nosuch*"]) == []  # a pattern may match nothing yet
    assert select_interfaces(["lo", "gone0"], strict=False) == ["lo"]
    with pytest.raises(InterfaceError, match="gone0"):
        select_interfaces(["lo", "gone0"])


def test_interfaces_exposed_without_a_secret_are_those_beyond_thunderbolt_and_loopback():
    """Without a cluster secret the daemon serves only where no stranger reaches: a Thunderbolt
    cable or loopback. Anything else, or a pattern that could match anything later, is exposed."""
    existing = sorted(name for _, name in socket.if_nameindex())
    others = [n for n in existing if n != "lo"]
    assert interfaces.exposed_interfaces(["lo"], thunderbolt=[]) == []
    assert interfaces.exposed_interfaces(others, thunderbolt=others) == []  # all Thunderbolt
    assert interfaces.exposed_interfaces(["lo", *others], thunderbolt=[]) == others
    assert interfaces.exposed_interfaces(["nomatch*"], thunderbolt=[]) == ["nomatch*"]
    assert interfaces.exposed_interfaces(["nosuch0"], thunderbolt=[]) == []  # refused elsewhere
