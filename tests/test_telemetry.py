"""MQTT telemetry (`tbmesh daemon --mqtt`) against a real mosquitto and real daemons."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from daemons import DaemonProcess, agreed, start_all, tiny_model_dir, wait_for

from tbmesh.core.jsonform import from_json
from tbmesh.core.status import Status, StatusEvent
from tbmesh.node import telemetry
from tbmesh.node.telemetry import Telemetry, parse_url, retained_state

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """A broker of our own on a free port; no persistence, so a restart forgets retained messages."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.config = tmp_path / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log_path = tmp_path / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is None and _accepts(self.port), 10, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        wait_for(lambda: not _accepts(self.port), 5, "mosquitto to stop listening")


@pytest.fixture
def broker(tmp_path):
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (./dev setup installs it)")
    the_broker = Mosquitto(tmp_path).start()
    yield the_broker
    if the_broker.proc is not None and the_broker.proc.poll() is None:
        the_broker.proc.kill()
        the_broker.proc.wait(5)


class Subscriber:
    """Everything under tbmesh/# as a dashboard sees it (paho in its own thread)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, str, bool]] = []  # (topic, payload, retained)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda client, *_: client.subscribe("tbmesh/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload.decode(), bool(message.retain)))

    def on(self, topic: str) -> list[tuple[str, bool]]:
        with self.lock:
            return [(payload, retained) for t, payload, retained in self.messages if t == topic]

    def last(self, topic: str) -> str | None:
        got = self.on(topic)
        return got[-1][0] if got else None

    def json(self, topic: str) -> Any:
        payload = self.last(topic)
        return json.loads(payload) if payload else None

    def close(self) -> None:
        self.client.disconnect()  # first: it wakes the network thread, which then ends quickly
        self.client.loop_stop()


@pytest.fixture
def subscribers():
    made: list[Subscriber] = []

    def make(port: int) -> Subscriber:
        made.append(Subscriber(port))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


KEEPALIVE = 2  # seconds: short, so that a hung daemon's will comes quickly


@pytest.fixture
def daemons(tmp_path):
    """Make `tbmesh daemon --mqtt URL` processes on `lo` (not started); killed after the test."""
    made: list[DaemonProcess] = []

    def make(name: str, cluster: str, url: str, *extra: str) -> DaemonProcess:
        args = ["--interface", "lo", "--memory", "4GB", "--cluster", cluster, "--no-probe", "--mqtt", url, *extra]
        made.append(DaemonProcess(name, tmp_path / name, args))
        return made[-1]

    yield make
    for daemon in made:
        daemon.kill()


# ----- real daemons -------------------------------------------------------------------


def test_a_late_dashboard_sees_nodes_leader_and_plan_and_wills_mark_dead_nodes_offline(
        broker, subscribers, daemons, tmp_path):
    cluster = f"t{uuid.uuid4().hex[:8]}"
    prefix = f"tbmesh/{cluster}"
    model = tiny_model_dir(tmp_path / "model")
    live = subscribers(broker.port)  # a dashboard that was there all along: sees the events
    a, b = start_all([daemons(n, cluster, broker.url + f"?keepalive={KEEPALIVE}", "--model", str(model))
                      for n in ("a", "b")])
    view = wait_for(lambda: agreed([a, b]), 20, "one leader and one plan")
    ids = {"a": a.node_id, "b": b.node_id}
    stages = [{"node": s["node"], "start": s["start"], "end": s["end"]} for s in view["plan"]["stages"]]

    def caught_up(sub: Subscriber) -> bool:
        plan = sub.json(f"{prefix}/plan")
        return (plan is not None and [{k: s[k] for k in ("node", "start", "end")} for s in plan["stages"]] == stages
                and (sub.json(f"{prefix}/leader") or {}).get("id") == view["leader"]
                and all((sub.json(f"{prefix}/nodes/{i}") or {}).get("shard") for i in ids.values()))

    wait_for(lambda: caught_up(live), 10, "telemetry to publish the formed cluster")

    def records() -> list:
        return [live.json(f"{prefix}/nodes/{i}") for i in ids.values()]

    def settled() -> bool:  # the records stopped changing (a disk hashed, a stage serving)
        before = records()
        time.sleep(0.5)
        return records() == before

    wait_for(settled, 10, "the node records to settle")
    # a dashboard connecting now gets all of it from the broker's retained messages
    late = subscribers(broker.port)
    wait_for(lambda: caught_up(late), 5, "the retained state")
    for name, node_id in ids.items():
        record = late.json(f"{prefix}/nodes/{node_id}")
        assert record["name"] == name and record["state"] == "alive" and record["memory_usable"] == 4 * 10**9
        assert record["role"] == ("leader" if node_id == view["leader"] else "follower")
        assert record["leader"] == view["leader"] and record["alive_nodes"] == 2
        assert late.on(f"{prefix}/nodes/{node_id}/status") == [("online", True)]
        assert all(retained for _, retained in late.on(f"{prefix}/nodes/{node_id}"))
        links = late.json(f"{prefix}/nodes/{node_id}/links")
        assert [link["peer_name"] for link in links] == ["b" if name == "a" else "a"]
    leader = late.json(f"{prefix}/leader")
    assert {m["id"]: m["state"] for m in leader["members"]} == {i: "alive" for i in ids.values()}
    plan = late.json(f"{prefix}/plan")
    assert plan["fits"] and {s["name"] for s in plan["stages"]} == {"a", "b"}
    assert all(retained for _, retained in late.on(f"{prefix}/plan"))
    assert not late.on(f"{prefix}/events")  # events are not retained
    events = [json.loads(p) for p, _ in live.on(f"{prefix}/events")]
    assert {"kind": "joined", "node": ids["b"], "by": ids["a"]}.items() <= next(
        e for e in events if e["kind"] == "joined" and e["by"] == ids["a"]).items()
    assert any(e["kind"] == "plan" for e in events) and all(e["time"] > 1e9 for e in events)

    # kill -9: the broker publishes b's will
    b.kill()  # its socket closes with it: the broker need not even wait for the keepalive
    wait_for(lambda: late.last(f"{prefix}/nodes/{ids['b']}/status") == "offline", KEEPALIVE * 1.5,
             "b's last will")
    wait_for(lambda: {m["id"]: m["state"] for m in late.json(f"{prefix}/leader")["members"]}.get(ids["b"])
             == "dead" and late.json(f"{prefix}/leader")["id"] == ids["a"], 15, "a leading, b dead")
    assert any(json.loads(p)["kind"] == "dead" and json.loads(p)["node"] == ids["b"]
               for p, _ in live.on(f"{prefix}/events"))

    # a clean stop says "offline" itself, at once
    assert late.last(f"{prefix}/nodes/{ids['a']}/status") == "online"
    a.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: late.last(f"{prefix}/nodes/{ids['a']}/status") == "offline", 3, "a's goodbye")
    assert time.monotonic() - stopped < 3
    # (its exit status is test_daemon's business: a SIGTERM right after a shard load can
    # currently end in "terminate called without an active exception", with or without MQTT)
    a.proc.wait(10)
    assert "stopped" in a.log()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_broker_restart_is_ridden_out_and_a_hung_daemon_goes_offline(broker, subscribers, daemons):
    cluster = f"t{uuid.uuid4().hex[:8]}"
    prefix = f"tbmesh/{cluster}"
    solo = daemons("solo", cluster, broker.url + f"?keepalive={KEEPALIVE}").start()
    node_id = solo.node_id
    status_topic = f"{prefix}/nodes/{node_id}/status"

    def published(sub: Subscriber) -> bool:
        return (sub.last(status_topic) == "online"
                and (sub.json(f"{prefix}/nodes/{node_id}") or {}).get("role") == "leader"
                and (sub.json(f"{prefix}/leader") or {}).get("id") == node_id)

    before = subscribers(broker.port)
    wait_for(lambda: published(before), 15, "the solo node's state")
    assert before.json(f"{prefix}/plan") is None  # no --model: no plan

    broker.stop()
    outage_end = time.monotonic() + 2.0
    while time.monotonic() < outage_end:  # the daemon keeps serving while the broker is gone
        asked = time.monotonic()
        assert solo.status()["node"]["id"] == node_id
        assert time.monotonic() - asked < 1.0
        time.sleep(0.2)

    broker.start()  # same port, nothing retained (no persistence)
    after = subscribers(broker.port)
    wait_for(lambda: published(after), 12, "the state published again after the restart")
    late = subscribers(broker.port)  # and retained again, for whoever comes next
    wait_for(lambda: published(late), 10, "the retained state after the restart")  # a subscriber's connect, on a busy machine
    assert all(retained for _, retained in late.on(f"{prefix}/nodes/{node_id}"))
    assert solo.alive() and "Traceback" not in solo.log()

    # hung (a Mac asleep or wedged): its socket stays open, and only the keepalive tells
    solo.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    # mosquitto 2.0's keepalive check is coarser than 1.5 x keepalive: 3-5 s measured for 2 s
    wait_for(lambda: late.last(status_topic) == "offline", 10, "the keepalive to expire")
    assert time.monotonic() - stopped > 0.5  # nobody said goodbye: the broker waited


def test_a_bad_mqtt_url_is_a_one_line_error(tmp_path):
    for args, expected in [
        (["--mqtt", "http://broker:1883"], "bad MQTT URL 'http://broker:1883': use mqtt://host[:port]"),
        (["--mqtt", "mqtt://broker:99999"], "the port is 1 to 65535"),
        (["--mqtt", "mqtt://broker", "--cluster", "a/b"], "cannot be an MQTT topic level"),
    ]:
        result = subprocess.run([sys.executable, "-m", "tbmesh", "daemon", "--interface", "lo",
                                 "--state-dir", str(tmp_path / "s"), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


# ----- the module on its own ----------------------------------------------------------


def _status_json(me: str = "n1", leader: str | None = "n1", model: str | None = "m") -> dict[str, Any]:
    """GET /status of a node of two."""
    def node(node_id: str, name: str, start: int, end: int) -> dict[str, Any]:
        return {"id": node_id, "name": name, "chip": "Apple M3 Ultra", "state": "alive",
                "memory_total": 512 * 10**9, "memory_usable": 384 * 10**9, "flops": 1e13,
                "role": "leader" if node_id == leader else "follower",
                "shard": {"start": start, "end": end, "epoch": 1, "bytes": 10**9, "progress": 1.0, "loaded": True}}

    plan = {"term": 1, "epoch": 1, "model": model, "left_out": [],
            "stages": [{"node": "n1", "start": 0, "end": 4, "bytes": 10**9},
                       {"node": "n2", "start": 4, "end": 8, "bytes": 10**9}]} if model else None
    return {"node": {"id": me, "name": "one", "incarnation": 1, "port": 7470, "interfaces": ["lo"],
                     "addresses": ["127.0.0.1"]},
            "cluster": "unit", "now": 12.5, "leader": leader, "term": 1, "model": model,
            "nodes": [node("n1", "one", 0, 4), node("n2", "two", 4, 8)],
            "links": [{"a": "n1", "b": "n2", "bandwidth_bps": 8e10, "rtt_s": 1e-4}],
            "plan": plan, "preparing": None, "no_fit": None, "runtime": {"requests": 0, "stage_requests": 0,
                                                      "weight_bytes": 0, "active_memory": 0},
            "events": [{"at": 1.0, "kind": "joined", "node": "n2", "detail": "two"}]}


def _status(me: str = "n1", leader: str | None = "n1", model: str | None = "m", **changed: Any) -> Status:
    """Daemon.status() of a node of two (its JSON: _status_json, with `changed` keys)."""
    return from_json(Status, _status_json(me, leader, model) | changed)


def test_only_the_leader_writes_leader_and_plan_and_only_with_a_model():
    leader = retained_state(_status())
    assert set(leader) == {"tbmesh/unit/nodes/n1", "tbmesh/unit/nodes/n1/links", "tbmesh/unit/nodes/n1/runtime",
                           "tbmesh/unit/leader", "tbmesh/unit/plan"}
    plan = json.loads(leader["tbmesh/unit/plan"])
    assert [s["name"] for s in plan["stages"]] == ["one", "two"] and plan["fits"]
    assert json.loads(leader["tbmesh/unit/nodes/n1/links"]) == [
        {"peer": "n2", "peer_name": "two", "bandwidth_bps": 8e10, "rtt_s": 1e-4}]
    follower = retained_state(_status(me="n2", leader="n1"))
    assert set(follower) == {"tbmesh/unit/nodes/n2", "tbmesh/unit/nodes/n2/links", "tbmesh/unit/nodes/n2/runtime"}
    assert "tbmesh/unit/plan" not in retained_state(_status(model=None))
    no_fit = json.loads(retained_state(_status(plan=None, no_fit="needs 700 GB"))["tbmesh/unit/plan"])
    assert no_fit["reason"] == "needs 700 GB" and not no_fit["fits"] and no_fit["stages"] == []
    # the first plan, still loading: published with its progress
    preparing = {"term": 1, "epoch": 1, "model": "m", "left_out": [], "progress": {"n1": 0.5},
                 "stages": [{"node": "n1", "start": 0, "end": 8, "bytes": 10**9}]}
    first = json.loads(retained_state(_status(plan=None, preparing=preparing))["tbmesh/unit/plan"])
    assert first["fits"] and first["stages"] == [] and first["preparing"]["progress"] == {"n1": 0.5}
    assert first["preparing"]["stages"][0]["name"] == "one"
    # the clock and the event list are not state: a status that differs only there is the same
    assert retained_state(_status(now=99.0, events=[])) == leader


def test_the_urls_it_takes():
    assert parse_url("mqtt://broker") == telemetry.Broker("broker", 1883)
    assert parse_url("mqtt://u:p%40ss@10.0.0.2:1884/?keepalive=5") == telemetry.Broker(
        "10.0.0.2", 1884, "u", "p@ss", 5)
    for bad in ("broker:1883", "mqtts://broker", "mqtt://", "mqtt://b:0", "mqtt://b/topic",
                "mqtt://b?keepalive=0", "mqtt://b?qos=1"):
        with pytest.raises(ValueError, match="bad MQTT URL"):
            parse_url(bad)


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def test_only_what_changed_is_published_and_close_says_offline(broker, subscribers):
    sub = subscribers(broker.port)
    wait_for(lambda: sub.client.is_connected(), 5, "the subscriber")

    async def main() -> None:
        t = Telemetry(broker.url, "unit", "n1")
        t.start()
        status = _status()
        t.update(status)
        await _until(lambda: sub.last("tbmesh/unit/plan") is not None, 5, "the first publish")
        await asyncio.sleep(0.3)
        counts = {topic: len(sub.on(topic)) for topic in retained_state(status)}
        assert set(counts.values()) == {1}
        assert sub.on("tbmesh/unit/nodes/n1/status") == [("online", False)]

        for _ in range(5):  # the same state again (a new clock): nothing to say
            t.update(replace(status, now=time.monotonic()))
            await asyncio.sleep(0.05)
        changed = _status_json()
        changed["nodes"][0]["shard"]["progress"] = 0.5
        t.update(from_json(Status, changed))
        t.event(StatusEvent(13.0, "dead", "n2", "two"))
        await _until(lambda: len(sub.on("tbmesh/unit/nodes/n1")) == 2, 5, "the changed record")
        await asyncio.sleep(0.3)
        assert {topic: len(sub.on(topic)) for topic in counts} == {**counts, "tbmesh/unit/nodes/n1": 2}
        assert sub.json("tbmesh/unit/nodes/n1")["shard"]["progress"] == 0.5
        [(event, retained)] = sub.on("tbmesh/unit/events")
        assert not retained and json.loads(event) == {
            **json.loads(event), "kind": "dead", "node": "n2", "detail": "two", "by": "n1"}

        await t.close()  # a clean DISCONNECT: the broker drops the will, so this "offline" is ours
        await _until(lambda: sub.last("tbmesh/unit/nodes/n1/status") == "offline", 2, "offline")

    asyncio.run(main())


def test_a_missing_broker_never_blocks_the_caller():
    async def main() -> None:
        t = Telemetry(f"mqtt://127.0.0.1:{_free_port()}", "unit", "n1")  # nobody listens there
        t.start()
        started = time.monotonic()
        for i in range(telemetry.EVENT_BACKLOG * 2):
            t.update(_status())
            t.event(StatusEvent(float(i), "joined", "n2", "two"))
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(1.0)  # a few failed attempts
        assert not t.connected and len(t._events) == telemetry.EVENT_BACKLOG  # bounded
        started = time.monotonic()
        await t.close()
        assert time.monotonic() - started < telemetry.CLOSE_TIMEOUT + 0.5

    asyncio.run(main())


def test_a_tensor_groups_members_are_published_with_their_names():
    status = _status_json()
    status["plan"]["stages"] = [{"node": "n2", "start": 0, "end": 8, "bytes": 2 * 10**9, "group": ["n2", "n1"]}]
    plan = json.loads(retained_state(from_json(Status, status))["tbmesh/unit/plan"])
    assert plan["stages"] == [{"node": "n2", "name": "two", "start": 0, "end": 8, "bytes": 2 * 10**9,
                               "group": ["n2", "n1"], "group_names": ["two", "one"]}]
    assert "group" not in json.loads(retained_state(_status())["tbmesh/unit/plan"])["stages"][0]
