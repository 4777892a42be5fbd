"""RDMA over Thunderbolt (jaccl): parsing on recorded macOS outputs, the device matrix, the
environment of a rank, and what a user is told."""

from __future__ import annotations

import pytest
from recorded import recorded

from tbmesh.net.interfaces import parse_hardware_ports
from tbmesh.net.rdma import (
    ENABLE_INSTRUCTIONS,
    Cable,
    RdmaDevice,
    RdmaError,
    assess,
    device_matrix,
    device_of,
    interface_of,
    jaccl_environment,
    link_device,
    parse_ibv_devices,
    parse_ibv_devinfo,
    parse_rdma_ctl_status,
    rdma_status,
    thunderbolt_rdma_devices,
)


def test_rdma_ctl_status():
    assert parse_rdma_ctl_status(recorded("rdma_ctl-status.1.txt")) is True
    assert parse_rdma_ctl_status("disabled\n") is False
    with pytest.raises(ValueError, match="not enabled or disabled"):
        parse_rdma_ctl_status("rdma_ctl: command not found")


def test_ibv_devices_of_an_m3_ultra_without_the_tab():
    devices = parse_ibv_devices(recorded("ibv_devices.1.txt"))
    assert [d.name for d in devices] == [f"rdma_en{i}" for i in range(2, 8)]
    assert devices[0].guid == "d0b5e9ab23cfac05"
    assert [d.interface for d in devices] == [f"en{i}" for i in range(2, 8)]


def test_ibv_devices_with_the_real_tab_layout_and_no_final_newline():
    devices = parse_ibv_devices(recorded("ibv_devices.2.txt"))
    assert [(d.name, d.guid) for d in devices] == [
        ("rdma_en1", "0000000000000001"), ("rdma_en6", "0000000000000002"), ("rdma_en2", "0000000000000003")]


@pytest.mark.parametrize("name", ["ibv_devices.3.txt", "ibv_devices.4.txt"])
def test_ibv_devices_header_only(name):
    # .3: RDMA disabled; .4: RDMA enabled on a Thunderbolt 4 Mac
    assert parse_ibv_devices(recorded(name)) == []


def test_ibv_devinfo_blocks_and_port_states():
    devices = parse_ibv_devinfo(recorded("ibv_devinfo.1.txt"))
    assert [d.name for d in devices] == ["rdma_en1", "rdma_en6", "rdma_en2"]
    assert devices[0].guid == "0000:0000:0000:0002"
    assert all(d.port_states == ("PORT_DOWN",) and not d.active for d in devices)
    active = recorded("ibv_devinfo.1.txt").replace("PORT_DOWN (1)", "PORT_ACTIVE (4)", 1)
    assert [d.active for d in parse_ibv_devinfo(active)] == [True, False, False]


def test_thunderbolt_interfaces_map_to_their_rdma_devices():
    # the same M5 Max MacBook Pro: Thunderbolt 1/2/3 = en1/en6/en2 and rdma_en1/en6/en2
    ports = parse_hardware_ports(recorded("networksetup-listallhardwareports.1.txt"))
    devices = parse_ibv_devices(recorded("ibv_devices.2.txt"))
    assert thunderbolt_rdma_devices(ports, devices) == {"en1": "rdma_en1", "en6": "rdma_en6", "en2": "rdma_en2"}
    # Mac A (Thunderbolt 1-6 = en2-en7) with an M3 Ultra's six devices; Ethernet en0 and Wi-Fi en1 have none
    ports = parse_hardware_ports(recorded("networksetup-listallhardwareports.2.txt"))
    devices = parse_ibv_devices(recorded("ibv_devices.1.txt"))
    assert thunderbolt_rdma_devices(ports, devices) == {f"en{i}": f"rdma_en{i}" for i in range(2, 8)}
    assert thunderbolt_rdma_devices(ports, []) == {}
    assert device_of("en5") == "rdma_en5" and interface_of("rdma_en5") == "en5"


def test_assess_says_why_rdma_cannot_be_used():
    six = parse_ibv_devices(recorded("ibv_devices.1.txt"))
    assert assess(True, six).usable
    assert "disabled" in assess(False, []).why_not and "recoveryOS" in assess(False, []).why_not
    assert "no RDMA device" in assess(True, parse_ibv_devices(recorded("ibv_devices.4.txt"))).why_not
    assert "26.2" in assess(None, []).why_not
    for status in (assess(False, []), assess(True, []), assess(None, [])):
        assert "\n" not in status.why_not


def test_a_connection_has_the_device_of_the_port_it_runs_over():
    # the M5 Max MacBook Pro: Thunderbolt 1/2/3 = en1/en6/en2, its three devices; the cable on
    # en1 is up (PORT_ACTIVE), en6's port is down. Addresses as interface_addresses gives them.
    up = recorded("ibv_devinfo.1.txt").replace("PORT_DOWN (1)", "PORT_ACTIVE (4)", 1)
    status = assess(True, parse_ibv_devinfo(up))
    addresses = {"en1": ["169.254.10.1", "fe80::1%en1"], "en6": ["169.254.20.1"], "bridge0": ["169.254.30.1"]}
    assert link_device("169.254.10.1", addresses, status) == "rdma_en1"
    assert link_device("fe80::1%en1", addresses, status) == "rdma_en1"
    assert link_device("169.254.20.1", addresses, status) == ""  # its port is down
    assert link_device("169.254.30.1", addresses, status) == ""  # over the Thunderbolt Bridge: no device
    assert link_device("10.0.0.9", addresses, status) == ""  # on no served interface
    # ibv_devices says nothing of ports: a device on the interface is enough
    listed = assess(True, parse_ibv_devices(recorded("ibv_devices.2.txt")))
    assert link_device("169.254.20.1", addresses, listed) == "rdma_en6"
    # RDMA disabled (its ibv_devices lists no device), or not a Mac: none
    assert link_device("169.254.10.1", addresses, assess(False, parse_ibv_devices(recorded("ibv_devices.3.txt")))) == ""
    assert link_device("169.254.10.1", addresses, rdma_status("linux")) == ""


def test_rdma_status_off_a_mac_is_unusable_without_running_anything():
    status = rdma_status("linux")
    assert not status.usable and "ring" in status.why_not


def test_enable_instructions_name_the_steps_and_the_checks():
    text = ENABLE_INSTRUCTIONS
    for words in ("26.2", "recoveryOS", "rdma_ctl enable", "rdma_ctl status", "ibv_devices", "PORT_ACTIVE",
                  "Thunderbolt Bridge"):
        assert words in text
    assert text.index("rdma_ctl enable") < text.index("Restart")


# --- the device matrix -------------------------------------------------------------------

# Four M3 Ultra Studios in a full mesh, cabled as in MLX's docs' example matrix
# ("Distributed Without mlx.launch", JACCL).
MESH4 = [
    Cable("m1", "en5", "m2", "en5"), Cable("m1", "en4", "m3", "en4"), Cable("m1", "en3", "m4", "en3"),
    Cable("m2", "en3", "m3", "en3"), Cable("m2", "en4", "m4", "en4"), Cable("m3", "en5", "m4", "en5"),
]


def test_matrix_of_a_four_mac_mesh_is_mlx_docs_example():
    assert device_matrix(["m1", "m2", "m3", "m4"], MESH4) == [
        [None, "rdma_en5", "rdma_en4", "rdma_en3"],
        ["rdma_en5", None, "rdma_en3", "rdma_en4"],
        ["rdma_en4", "rdma_en3", None, "rdma_en5"],
        ["rdma_en3", "rdma_en4", "rdma_en5", None],
    ]


def test_matrix_follows_the_rank_order():
    matrix = device_matrix(["m3", "m1"], MESH4)  # rank 0 on m3
    assert matrix == [[None, "rdma_en4"], ["rdma_en4", None]]


def test_two_cables_per_pair_are_listed_in_the_same_order_at_both_ends():
    cables = [Cable("a", "en3", "b", "en7"), Cable("a", "en2", "b", "en6")]
    assert device_matrix(["a", "b"], cables) == [[None, ["rdma_en2", "rdma_en3"]], [["rdma_en6", "rdma_en7"], None]]
    assert device_matrix(["b", "a"], cables) == [[None, ["rdma_en6", "rdma_en7"]], [["rdma_en2", "rdma_en3"], None]]


def test_every_pair_uses_as_many_cables_as_the_least_cabled_pair():
    cables = [Cable("a", "en2", "b", "en2"), Cable("a", "en3", "b", "en3"),
              Cable("a", "en4", "c", "en2"), Cable("b", "en4", "c", "en3")]
    assert device_matrix(["a", "b", "c"], cables)[0] == [None, "rdma_en2", "rdma_en4"]


def test_a_pair_without_a_cable_is_refused_by_name():
    cables = [c for c in MESH4 if {c.a, c.b} != {"m1", "m2"}]
    with pytest.raises(RdmaError, match="none between m1 and m2"):
        device_matrix(["m1", "m2", "m3", "m4"], cables)


def test_a_cable_into_a_port_without_a_device_is_refused():
    devices = {"m1": {"rdma_en2", "rdma_en5"}, "m2": {"rdma_en5"}}
    assert device_matrix(["m1", "m2"], MESH4, devices) == [[None, "rdma_en5"], ["rdma_en5", None]]
    with pytest.raises(RdmaError, match="m2 has no RDMA device for en5"):
        device_matrix(["m1", "m2"], MESH4, {"m1": {"rdma_en5"}, "m2": set()})


def test_a_node_twice_is_refused():
    with pytest.raises(RdmaError, match="twice"):
        device_matrix(["m1", "m1"], MESH4)


def test_jaccl_environment():
    env = jaccl_environment(2, "192.168.0.1:32323", "/tmp/devices.json")
    assert env == {"MLX_RANK": "2", "MLX_JACCL_COORDINATOR": "192.168.0.1:32323",
                   "MLX_IBV_DEVICES": "/tmp/devices.json", "MLX_METAL_FAST_SYNCH": "1"}
    with pytest.raises(RdmaError, match="ip:port"):
        jaccl_environment(0, "192.168.0.1", "/tmp/devices.json")


def test_rdma_device_defaults():
    device = RdmaDevice("rdma_en3")
    assert device.interface == "en3" and not device.active and device.guid == ""
