"""Daemons in network namespaces (Macs) joined by veth pairs (Thunderbolt cables).

Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from daemons import DaemonProcess, agreed, alive_ids, start_all, state_of, tiny_model_dir, wait_for

# slow: test_chaos.py's daemons find each other over namespaced cables in every run
pytestmark = [pytest.mark.needs_root, pytest.mark.slow]


@pytest.fixture
def macs(lab, tmp_path):
    """start(mac, ...) runs a daemon in that Mac, serving on its cables ("tb*") or bridge."""
    cluster = f"n{uuid.uuid4().hex[:8]}"
    model = tiny_model_dir(tmp_path / "model")
    daemons: list[DaemonProcess] = []

    def make(mac, *extra: str) -> DaemonProcess:
        interface = "br0" if mac.bridge else "tb*"
        args = ["--interface", interface, "--memory", "4GB", "--model", str(model),
                "--cluster", cluster, *extra]
        daemon = DaemonProcess(mac.name, tmp_path / mac.name, args, mac=mac)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.kill()


def stage_order(view: dict) -> list[str]:
    names = {n["id"]: n["name"] for n in view["nodes"]}
    return [names[s["node"]] for s in view["plan"]["stages"]]


def test_a_chain_without_a_bridge_is_one_cluster_whose_plan_follows_the_cables(lab, macs):
    a, b, c = (lab.add_mac(n) for n in "abc")
    lab.cable(a, b)
    lab.cable(b, c)
    daemons = start_all([macs(m, "--no-probe") for m in (a, b, c)])
    view = wait_for(lambda: agreed(daemons), 30, "one cluster over two hops")
    # a and c have no cable between them: b sits between them in the pipeline
    assert stage_order(view)[1] == "b"
    links = {frozenset((link["a"], link["b"])) for link in view["links"]}
    ids = {n["name"]: n["id"] for n in view["nodes"]}
    assert links == {frozenset((ids["a"], ids["b"])), frozenset((ids["b"], ids["c"]))}


def test_a_ring_plan_follows_the_ring(lab, macs):
    ring = [lab.add_mac(n) for n in "abcd"]
    for x, y in zip(ring, ring[1:] + ring[:1]):
        lab.cable(x, y)
    daemons = start_all([macs(m, "--no-probe") for m in ring])
    view = wait_for(lambda: agreed(daemons), 30, "one cluster on a ring")
    order = stage_order(view)
    neighbours = {frozenset(p) for p in ["ab", "bc", "cd", "da"]}
    assert all(frozenset((x, y)) in neighbours for x, y in zip(order, order[1:]))


def test_bridged_macs_all_talk_directly(lab, macs):
    a, b, c = (lab.add_mac(n, bridge=True) for n in "abc")
    lab.cable(a, b)
    lab.cable(b, c)
    daemons = start_all([macs(m, "--no-probe") for m in (a, b, c)])
    view = wait_for(lambda: agreed(daemons), 30, "one bridged cluster")
    assert len(view["links"]) == 3  # every pair is directly connected over the bridge


def test_plugging_a_cable_joins_a_running_mac_and_pulling_it_kills_it(lab, macs):
    a, b, d = lab.add_mac("a"), lab.add_mac("b"), lab.add_mac("d")
    lab.cable(a, b)
    pair = start_all([macs(a, "--no-probe"), macs(b, "--no-probe")])
    newcomer = macs(d, "--no-probe").start()  # running, but no cable yet
    wait_for(lambda: agreed(pair), 30, "a and b")
    time.sleep(1.0)
    assert alive_ids(newcomer.status()) == {newcomer.node_id}

    plugged_at = time.monotonic()
    cable = lab.cable(b, d)
    everyone = pair + [newcomer]
    wait_for(lambda: agreed(everyone), 15, "d joining after its cable is plugged in")
    joined_after = time.monotonic() - plugged_at
    assert joined_after < 10  # (the join-latency benchmark measures it properly)
    assert newcomer.status()["node"]["incarnation"] == 1  # no restart

    d_id = newcomer.node_id
    cable.unplug()
    pulled_at = time.monotonic()
    wait_for(lambda: all(state_of(x.status(), d_id) == "dead" for x in pair), 5, "d declared dead")
    assert time.monotonic() - pulled_at < 3
    wait_for(lambda: agreed(pair), 10, "a plan without d")


def test_a_shaped_cable_is_measured_within_ten_percent(lab, macs):
    a, b = lab.add_mac("a"), lab.add_mac("b")
    lab.cable(a, b, rate="1gbit")
    daemons = start_all([macs(a), macs(b)])  # probes on: a link is measured when it appears
    wait_for(lambda: agreed(daemons), 30, "a cluster of two")

    def measured() -> float:
        links = daemons[0].status()["links"]
        return links[0]["bandwidth_bps"] if links and links[0]["bandwidth_bps"] else 0.0

    rate = wait_for(measured, 15, "the link's bandwidth")
    assert abs(rate - 1e9) / 1e9 < 0.10, rate
    # the other end sees the same figure, and heartbeats measure the round-trip time
    wait_for(lambda: daemons[1].status()["links"][0]["bandwidth_bps"] == rate, 5, "the same figure at b")
    rtt = wait_for(lambda: daemons[0].status()["links"][0]["rtt_s"], 5, "the round-trip time")
    assert 0 < rtt < 0.05

    # on request, the link is measured again
    lab.cables[0].shape("500mbit")
    answer = json.loads(daemons[1].request("POST", "/probe"))
    rate = answer["links"][0]["bandwidth_bps"]
    assert abs(rate - 0.5e9) / 0.5e9 < 0.10, rate
    wait_for(lambda: measured() == rate, 5, "the other end to publish the new figure")


def listening(mac, port: int) -> set[str]:
    """The addresses on which something in `mac` listens on TCP `port` (`ss -ltn`)."""
    lines = mac.check_output(["ss", "-ltnH", f"sport = :{port}"]).splitlines()
    return {line.split()[3].rsplit(":", 1)[0] for line in lines}


def test_the_control_port_follows_the_cables(lab, macs):
    a, b, c = lab.add_mac("a"), lab.add_mac("b"), lab.add_mac("c")
    lab.cable(a, b)
    pair = start_all([macs(a, "--no-probe"), macs(b, "--no-probe")])
    newcomer = macs(c, "--no-probe").start()  # running, but no cable yet
    wait_for(lambda: agreed(pair), 30, "a and b")
    port, port_c = pair[0].control_port, newcomer.control_port
    assert listening(a, port) == {"169.254.1.1"}  # the cable's address, nothing else
    assert port_c and listening(c, port_c) == set()  # its port is chosen; nowhere to listen yet

    cable = lab.cable(a, c)
    wait_for(lambda: listening(a, port) == {"169.254.1.1", "169.254.2.1"}, 5, "a listening on its new cable")
    wait_for(lambda: listening(c, port_c) == {"169.254.2.3"}, 5, "c listening on its first cable")
    with c.socket() as sock:  # reachable from behind the new cable
        sock.settimeout(3)
        sock.connect(("169.254.2.1", port))
    wait_for(lambda: agreed(pair + [newcomer]), 15, "c joining through the new cable")

    cable.unplug()
    wait_for(lambda: listening(a, port) == {"169.254.1.1"}, 5, "the listener of the pulled cable closed")
    assert "control port closed on 169.254.2.1" in pair[0].log()
