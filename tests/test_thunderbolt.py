"""A Mac's Thunderbolt ports from every recorded `system_profiler -json SPThunderboltDataType`."""

from __future__ import annotations

import pytest
from recorded import recorded

from tbmesh.net.thunderbolt import ThunderboltPort, parse_thunderbolt_json


def ports(name: str) -> list[ThunderboltPort]:
    return parse_thunderbolt_json(recorded(name))


def test_a_macbook_cabled_to_a_mac_studio_over_thunderbolt_5():
    found = ports("system_profiler-SPThunderboltDataType-json.1.txt")
    assert [(p.bus, p.receptacle, p.connected) for p in found] == [
        ("thunderboltusb4_bus_2", "3", False), ("thunderboltusb4_bus_1", "2", False),
        ("thunderboltusb4_bus_0", "1", True)]  # fmt: skip
    link = found[2]
    assert (link.peer, link.peer_model, link.peer_is_mac, link.peer_rdma) == ("Mac Studio", "Mac15,14", True, False)
    assert (link.gbps, link.thunderbolt_5, link.name) == (80, True, "port 1")
    assert (found[0].gbps, found[0].thunderbolt_5) == (120, True)  # an idle TB5 port: "Up to 120 Gb/s"


def test_a_mac_studio_tells_a_drive_from_a_mac():
    found = ports("system_profiler-SPThunderboltDataType-json.2.txt")
    assert len(found) == 6 and sum(p.connected for p in found) == 2
    drive, mac = (p for p in found if p.connected)
    assert (drive.peer, drive.peer_is_mac, drive.gbps) == ("Envoy Ultra", False, 80)
    assert (mac.peer_model, mac.peer_is_mac, mac.peer_rdma) == ("Mac17,7", True, True)  # offers protocol 64087


@pytest.mark.parametrize("n, peer_rdma", [(3, True), (4, False)])
def test_a_pair_of_macbooks_where_one_has_rdma_on(n, peer_rdma):
    # json.3 is the Mac with RDMA off: it sees its peer's RDMA service; json.4 (RDMA on) sees none from it
    mac = [p for p in ports(f"system_profiler-SPThunderboltDataType-json.{n}.txt") if p.peer_is_mac]
    assert [(m.peer_model, m.speed, m.peer_rdma) for m in mac] == [("Mac17,6", "80 Gb/s", peer_rdma)]


def test_a_thunderbolt_3_device_on_a_slower_link_does_not_say_the_ports_generation():
    dock = ports("system_profiler-SPThunderboltDataType-json.4.txt")[0]
    assert (dock.peer, dock.gbps, dock.connected, dock.thunderbolt_5) == ("TBU405Pro", 40, True, None)


def test_thunderbolt_4_ports_derived_from_a_real_output():
    found = ports("system_profiler-SPThunderboltDataType-json.1.tb4-derived.txt")
    assert [p.thunderbolt_5 for p in found] == [False, False, None]
    assert found[2].speed == "40 Gb/s" and found[2].peer_is_mac


def test_output_that_is_not_thunderbolt_json_is_an_error():
    with pytest.raises(ValueError, match="Thunderbolt JSON"):
        parse_thunderbolt_json('{"SPUSBDataType": []}')
