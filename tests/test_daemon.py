"""Real daemons on loopback: discovery, election, plan, failure detection, restarts, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import msgpack
import psutil
import pytest
from daemons import DaemonProcess, agreed, alive_ids, state_of, tiny_model_dir, wait_for

from tbmesh.net import peers, wire


@pytest.fixture
def cluster(tmp_path):
    """Start daemons on `lo` in a cluster of their own (tests never see each other)."""
    name = f"t{uuid.uuid4().hex[:8]}"
    model = tiny_model_dir(tmp_path / "model")
    started: list[DaemonProcess] = []

    def start(node: str, *extra: str, memory: str = "4GB", cluster_name: str = name) -> DaemonProcess:
        args = ["--interface", "lo", "--memory", memory, "--model", str(model),
                "--cluster", cluster_name, *extra]
        daemon = DaemonProcess(node, tmp_path / node, args).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def test_three_daemons_form_one_cluster_survive_a_kill_and_take_back_a_restart(cluster):
    a, b, c = cluster("a"), cluster("b"), cluster("c")
    view = wait_for(lambda: agreed([a, b, c]), 20, "one leader and one plan")
    plan_nodes = {s["node"] for s in view["plan"]["stages"]}
    assert plan_nodes == {a.node_id, b.node_id, c.node_id}
    assert [s["start"] for s in view["plan"]["stages"]][0] == 0
    assert view["plan"]["stages"][-1]["end"] == 8
    b_id = b.node_id

    b.kill()  # kill -9
    killed_at = time.monotonic()
    wait_for(lambda: all(state_of(d.status(), b_id) == "dead" for d in (a, c)), 5, "b declared dead")
    detected = time.monotonic() - killed_at
    assert detected < 2.0
    view = wait_for(lambda: agreed([a, c]), 10, "a plan without b")
    assert {s["node"] for s in view["plan"]["stages"]} == {a.node_id, c.node_id}

    b.start()  # same state dir: the same node, a new incarnation
    assert b.node_id == b_id
    assert b.status()["node"]["incarnation"] == 2
    view = wait_for(lambda: agreed([a, b, c]), 20, "b back in the plan")
    assert {s["node"] for s in view["plan"]["stages"]} == {a.node_id, b_id, c.node_id}
    assert sum(1 for n in view["nodes"] if n["id"] == b_id) == 1


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_sigterm_says_goodbye_and_cleans_up(cluster):
    a, b = cluster("a"), cluster("b")
    wait_for(lambda: agreed([a, b]), 20, "a cluster of two")
    b_id = b.node_id
    started = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: b_id not in alive_ids(a.status()), 5, "b gone")
    # a goodbye is faster than any timeout
    assert time.monotonic() - started < a_timing_bound()
    assert b.proc.wait(15) == 0
    assert not (b.state_dir / "api.json").exists()
    events = [e for e in a.status()["events"] if e["node"] == b_id]
    assert any(e["kind"] == "left" for e in events)
    assert "stopped" in b.log()


def a_timing_bound() -> float:
    from tbmesh.core.membership import Timing

    t = Timing()
    return t.suspect_after + t.dead_after


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_two_clusters_on_one_cable_stay_apart(cluster):
    a = cluster("a", cluster_name="red")
    b = cluster("b", cluster_name="blue")
    c = cluster("c", cluster_name="red")
    wait_for(lambda: agreed([a, c]), 20, "the red cluster")
    time.sleep(1.0)
    assert {n["name"] for n in a.status()["nodes"]} == {"a", "c"}
    assert {n["name"] for n in b.status()["nodes"]} == {"b"}


def _frame(header: dict, payload: bytes = b"") -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">II", len(head), len(payload)) + head + payload


def _hello(version: int = wire.PROTOCOL_VERSION, cluster_name: str = "x") -> bytes:
    hello = wire.Hello(version, "stranger", 1, "stranger", cluster_name, "m", "peer")
    return b"".join(bytes(p) for p in wire.encode(hello))


def _send_and_read(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes to the control port; return what comes back before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, OSError):
            pass
    return b"".join(chunks)


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_bad_input_is_refused_and_the_daemon_keeps_serving(cluster):
    a = cluster("a")
    b = cluster("b")
    cluster_name = a.status()["cluster"]
    wait_for(lambda: agreed([a, b]), 20, "a cluster of two")
    port = a.control_port
    bad_inputs = {
        "garbage": os.urandom(4096),
        "oversized length prefix": struct.pack(">II", 0xFFFFFFFF, 0xFFFFFFFF) + b"x" * 100,
        "truncated frame": _hello(cluster_name=cluster_name)[:20],
        "not a map": struct.pack(">II", 3, 0) + msgpack.packb([1, 2]),
        "unknown type": _frame({"t": "launch-missiles"}),
        "wrong version": _hello(version=7, cluster_name=cluster_name),
        "another cluster": _hello(cluster_name="not-" + cluster_name),
    }
    for what, data in bad_inputs.items():
        answer = _send_and_read(port, data)
        if what in ("wrong version", "another cluster"):
            refusal = next(iter(_decode_all(answer)), None)
            assert isinstance(refusal, wire.Refuse), what
            assert ("protocol version 7" in refusal.reason) == (what == "wrong version")
    # still serving: its API answers and its peer is still alive and connected
    status = a.status()
    assert alive_ids(status) == {a.node_id, b.node_id}
    assert a.alive() and b.alive()
    log = a.log()
    assert "refused a connection" in log and "protocol version 7" in log


def _decode_all(data: bytes) -> list:
    decoder = wire.FrameDecoder()
    decoder.feed(data)
    return list(decoder)


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_stranger_without_the_secret_is_refused(cluster, tmp_path):
    a = cluster("a", "--secret", "s3cret")
    b = cluster("b", "--secret", "s3cret")
    stranger = cluster("mallory")  # same cluster name, no secret
    wait_for(lambda: agreed([a, b]), 20, "the two with the secret")
    time.sleep(1.5)
    names = {n["name"] for n in a.status()["nodes"]}
    assert names == {"a", "b"}
    assert {n["name"] for n in stranger.status()["nodes"]} == {"mallory"}
    assert "has a secret" in a.log() + b.log()  # the stranger dialled them in plain TCP

    # a client that knows the protocol but not the secret gets the same answer
    me = peers.Me("intruder", 1, "intruder", a.status()["cluster"], "m", b"guess")

    async def dial():
        with pytest.raises(peers.Refused, match="secret"):
            await peers.dial("127.0.0.1", a.control_port, me)

    asyncio.run(dial())
    assert alive_ids(a.status()) == {a.node_id, b.node_id}


def test_the_control_port_listens_on_the_served_addresses_only(cluster):
    a = cluster("a")  # --interface lo: 127.0.0.1
    port = a.control_port
    # every other address of this machine: 127.0.0.2 (lo answers all of 127/8), eth0's, ...
    others = {"127.0.0.2"} | {address.address for addresses in psutil.net_if_addrs().values()
                              for address in addresses
                              if address.family == socket.AF_INET and address.address != "127.0.0.1"}
    for address in sorted(others):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=3).close()
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert [word for word in listening if word.endswith(f":{port}")] == [f"127.0.0.1:{port}"]

    # on 127.0.0.1 the daemon answers a handshake (here, refusing a stranger's cluster)
    me = peers.Me("visitor", 1, "visitor", "not-" + a.status()["cluster"], "m")

    async def dial():
        with pytest.raises(peers.Refused, match="cluster"):
            await peers.dial("127.0.0.1", port, me)

    asyncio.run(dial())


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "tbmesh", "daemon", "--interface", "lo", "--port", str(port),
             "--api-port", "0", "--state-dir", str(tmp_path / "s"), "--memory", "1GB"],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: control port {port} is in use (another tbmesh daemon?); choose another with --port")
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_second_daemon_on_a_state_dir_in_use_is_a_one_line_error(tmp_path):
    state_dir = tmp_path / "s"
    args = ["--interface", "lo", "--memory", "1GB", "--cluster", f"t{uuid.uuid4().hex[:8]}"]
    first = DaemonProcess("a", state_dir, args).start()
    try:
        # it stops before it measures or listens: a TimeoutExpired here is a second daemon running
        second = subprocess.run(
            [sys.executable, "-m", "tbmesh", "daemon", "--name", "a", "--state-dir", str(state_dir),
             "--port", "0", "--api-port", "0", *args], capture_output=True, text=True, timeout=20)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [(
            f"error: the state directory {state_dir} is in use by another tbmesh daemon "
            f"(pid {first.proc.pid}); give each daemon its own --state-dir")]
        assert first.alive() and first.status()["node"]["incarnation"] == 1  # untouched by the second

        # the lock goes with its process, however it ends
        assert first.terminate() == 0
        assert first.start().status()["node"]["incarnation"] == 2
        first.kill()  # kill -9: the kernel releases the lock
        assert first.start().status()["node"]["incarnation"] == 3
    finally:
        first.kill()


def test_bad_flags_are_one_line_errors(tmp_path):
    for args, expected in [
        (["--interface", "nosuch0"], "nosuch0"),
        (["--port", "70000"], "bad --port 70000"),
        (["--memory", "lots"], "bad size"),
        # no secret on an interface other machines share: refused (eth0 here is no cable)
        (["--interface", "lo", "--interface", "eth*"], "not Thunderbolt: without a cluster secret"),
        (["--api-allow-host", "http://studio.example"], "bad --api-allow-host"),
        (["--api-allow-host", "studio.example:7471"], "without scheme or port"),
    ]:
        result = subprocess.run([sys.executable, "-m", "tbmesh", "daemon", "--state-dir",
                                 str(tmp_path / "s"), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


def test_status_json_and_the_no_daemon_message(cluster):
    a = cluster("a")
    out = subprocess.run([sys.executable, "-m", "tbmesh", "status", "--json", "--api", a.api_url()],
                         capture_output=True, text=True, timeout=30)
    data = json.loads(out.stdout)
    assert data["node"]["name"] == "a" and data["nodes"][0]["memory_usable"] == 4 * 10**9
    for key in ("leader", "term", "links", "plan"):
        assert key in data
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "tbmesh", "status", "--api", f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "no tbmesh daemon answers" in out.stderr and "tbmesh daemon" in out.stderr
    assert "Traceback" not in out.stderr


def test_status_shows_a_groups_members():
    from tbmesh.core.jsonform import to_json
    from tbmesh.core.types import Plan, Stage

    plan = Plan(1, 2, "m", (Stage("a", 0, 4, 10, ("a", "b")), Stage("c", 4, 8, 10)))
    assert to_json(plan)["stages"] == [{"node": "a", "start": 0, "end": 4, "bytes": 10, "group": ["a", "b"]},
                                          {"node": "c", "start": 4, "end": 8, "bytes": 10}]
