"""Hot re-assignment with Macs as network namespaces and cables as veth pairs: cables pulled,
flapping, and a cluster cut in two that heals, while answers stream; every answer is still
mlx-lm's, token for token.

Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import time
import uuid

import pytest

from daemons import DaemonProcess, serving_view, start_all, wait_for
from serving import Stream

# slow: test_chaos.py pulls, flaps and partitions cables in namespaces in every run
pytestmark = [pytest.mark.needs_root, pytest.mark.slow]

PROMPT = "Thunderbolt cables link the Macs"  # no end-of-sequence in its first 1500 tokens


@pytest.fixture
def macs(lab, tmp_path, model_dir):
    """start(mac) makes a daemon for that Mac, serving on its cables and the test model."""
    cluster = f"h{uuid.uuid4().hex[:8]}"
    daemons: list[DaemonProcess] = []

    def make(mac) -> DaemonProcess:
        daemon = DaemonProcess(mac.name, tmp_path / mac.name, [
            "--interface", "tb*", "--memory", "4GB", "--model", str(model_dir), "--cluster", cluster,
            "--no-probe"], mac=mac)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.kill()


def serving(daemons: list[DaemonProcess], timeout: float = 30) -> dict:
    """One leader and one committed plan over exactly these daemons, every stage serving it."""
    return wait_for(lambda: serving_view(daemons), timeout, "a committed plan that every stage serves")


@pytest.mark.parametrize("victim", ["middle", "leader"])
def test_pulling_a_stages_cables_mid_generation_and_the_answer_goes_on(lab, macs, reference, victim):
    a, b, c = (lab.add_mac(n) for n in "abc")
    cables = [lab.cable(a, b), lab.cable(b, c), lab.cable(a, c)]
    daemons = start_all([macs(m) for m in (a, b, c)])
    view = serving(daemons)
    ids = {d.node_id: d for d in daemons}
    gone = ids[view["plan"]["stages"][1]["node"] if victim == "middle" else view["leader"]]
    entry = next(d for d in daemons if d is not gone)
    expected, _ = reference(PROMPT, 300)
    stream = Stream(entry, PROMPT, 300, temperature=0)
    stream.wait_pieces(40)
    for cable in cables:
        if gone.mac in (cable.a, cable.b):
            cable.unplug()
    assert stream.result() == expected
    survivors = [d for d in daemons if d is not gone]
    view = serving(survivors)
    assert gone.node_id not in {s["node"] for s in view["plan"]["stages"]}
    assert any(e["kind"] == "resumed" for e in entry.status()["events"])


def test_a_cable_flapping_five_times_in_ten_seconds_loses_nothing(lab, macs, reference):
    a, b, c = (lab.add_mac(n) for n in "abc")
    lab.cable(a, b)
    flapping = lab.cable(b, c)  # c hangs off b: each flap takes c out of the cluster and back
    daemons = start_all([macs(m) for m in (a, b, c)])
    serving(daemons)
    expected, _ = reference(PROMPT, 800)
    stream = Stream(daemons[0], PROMPT, 800, temperature=0, timeout=180)
    stream.wait_pieces(20)
    for _ in range(5):
        flapping.down()
        time.sleep(1.0)
        flapping.up()
        time.sleep(1.0)
    assert stream.is_alive(), "the answer ended before the flapping did"
    assert stream.result(180) == expected
    assert all(d.alive() for d in daemons)
    view = serving(daemons, timeout=60)  # settles on one plan with all three
    assert len(view["plan"]["stages"]) == 3


def test_two_partitions_heal_into_one_cluster_and_both_sides_answers_complete(lab, macs, reference):
    a, b, c, d = (lab.add_mac(n) for n in "abcd")
    lab.cable(a, b)
    lab.cable(c, d)
    bridge = lab.cable(b, c)
    daemons = start_all([macs(m) for m in (a, b, c, d)])
    serving(daemons)
    bridge.down()  # two halves, each able to hold the model
    left, right = daemons[:2], daemons[2:]
    serving(left)
    serving(right)
    expected, _ = reference(PROMPT, 500)
    streams = [Stream(left[0], PROMPT, 500, temperature=0), Stream(right[1], PROMPT, 500, temperature=0)]
    for stream in streams:
        stream.wait_pieces(20)
    bridge.up()
    view = serving(daemons, timeout=60)
    assert len({d.status()["leader"] for d in daemons}) == 1
    assert len(view["plan"]["stages"]) == 4
    for stream in streams:
        assert stream.result(120) == expected


def test_a_mac_that_ran_alone_joins_without_reading_again_the_layers_it_holds(lab, macs):
    a, b, d = (lab.add_mac(n) for n in "abd")
    lab.cable(a, b)
    pair = start_all([macs(a), macs(b)])
    serving(pair)
    loner = macs(d).start()  # no cable yet: it plans the whole model for itself and loads it
    alone = serving([loner])
    assert alone["plan"]["stages"][0]["start"] == 0 and len(alone["plan"]["stages"]) == 1
    read_alone = loner.status()["runtime"]["layers_read"]
    lab.cable(b, d)
    view = serving(pair + [loner])
    assert loner.node_id in {s["node"] for s in view["plan"]["stages"]}
    # its new stage came out of the layers it held: nothing read from disk again
    assert loner.status()["runtime"]["layers_read"] == read_alone
