"""Optional MQTT telemetry for dashboards (`tbmesh daemon --mqtt mqtt://host[:port]`).

Every daemon publishes its own state to one broker under `tbmesh/<cluster>/`:

    topic                                 retained  writer      payload
    tbmesh/<cluster>/nodes/<id>           yes       the node    {"id","name","chip","state","role","incarnation",
                                                                 "memory_total","memory_usable","flops",
                                                                 "shard","disk","model","leader","term","alive_nodes"}
                                                                 ("disk": the model's bytes and layers on its disk,
                                                                 and a fetch under way: {"done","total","bytes_per_s","from"})
    tbmesh/<cluster>/nodes/<id>/status    yes       the node    "online" / "offline" (the last will)
    tbmesh/<cluster>/nodes/<id>/links     yes       the node    [{"peer","peer_name","bandwidth_bps","rtt_s"}]
    tbmesh/<cluster>/nodes/<id>/runtime   yes       the node    /status's "runtime": {"requests","weight_bytes",
                                                                 "tokens_per_s",...} (the data plane)
    tbmesh/<cluster>/leader               yes       the leader  {"id","name","term","members":[{"id","name","state"}]}
    tbmesh/<cluster>/plan                 yes       the leader  {"model","fits","reason","term","epoch",
                                                                 "stages":[{"node","name","start","end","bytes"}],
                                                                 a tensor group's stage also "group" (its
                                                                 members' ids, `node` first), "group_names",
                                                                 "left_out","preparing","replicas"}  (only with --model;
                                                                 "preparing": the next plan while it loads,
                                                                 with "progress" per node, or null; "replicas": how
                                                                 many disks hold each layer)
    tbmesh/<cluster>/events               no        every node  {"time","kind","node","detail","by"}

- Each retained topic has one writer, so a dashboard never sees two daemons fight over it.
  The leader's `members` is the cluster's view of who is alive, suspect or dead; a node's
  own record only says what the node itself knows.
- Availability is the separate `.../status` topic (Home Assistant's `availability_topic`
  pattern): the broker publishes the will "offline" when the connection drops without a
  goodbye (a crash: at once; a pulled cable or a hung Mac: after 1.5 x keepalive); a clean
  stop publishes "offline" itself. The node record has no "online" field on purpose: a
  retained `"online": true` could not be taken back by a will and would lie after a crash.
- Events carry wall-clock `time` (Unix seconds) and `by`, the id of the node that saw them
  (several nodes report the same peer dying).
- Only what changed is published (payloads compared as canonical JSON); after every
  (re)connection all retained state is published again, since a broker without
  persistence forgets it on restart.
- The broker is never allowed to stall the daemon: publishing runs in its own task,
  reconnects with exponential backoff (0.5 s doubling to 10 s), and `update()`/`event()`
  only store and wake it. Events produced while the broker is unreachable are kept in a
  bounded queue (the newest EVENT_BACKLOG); older ones are dropped.

The URL is `mqtt://[user[:password]@]host[:port][?keepalive=SECONDS]` (port 1883,
keepalive 15 s by default: the broker marks a silent node offline after 1.5 x keepalive, or
a little later, as mosquitto checks coarsely).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt

from tbmesh.core.jsonform import to_json
from tbmesh.core.status import Status, StatusEvent
from tbmesh.core.types import Stage

log = logging.getLogger("tbmesh.node.telemetry")

DEFAULT_PORT = 1883
DEFAULT_KEEPALIVE = 15  # seconds; the broker declares us gone after 1.5x this
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
EVENT_BACKLOG = 200
OPERATION_TIMEOUT = 5.0  # a CONNACK or PUBACK slower than this means the broker is gone
CLOSE_TIMEOUT = 2.0  # how long a clean stop waits to say "offline"


@dataclass(frozen=True)
class Broker:
    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    keepalive: int = DEFAULT_KEEPALIVE


def parse_url(url: str) -> Broker:
    """`mqtt://[user[:password]@]host[:port][?keepalive=N]`; ValueError with a one-line reason."""
    usage = f"bad MQTT URL {url!r}: use mqtt://host[:port]"
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken [IPv6] host
        raise ValueError(usage) from None
    try:
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"bad MQTT URL {url!r}: the port is 1 to 65535")
    if parts.scheme == "mqtts":
        raise ValueError(f"bad MQTT URL {url!r}: TLS (mqtts://) is not supported; use mqtt://host[:port]")
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/") or parts.fragment:
        raise ValueError(usage)
    keepalive = DEFAULT_KEEPALIVE
    query = parse_qs(parts.query, keep_blank_values=True)
    for key, values in query.items():
        if key != "keepalive":
            raise ValueError(f"bad MQTT URL {url!r}: unknown option {key!r} (only keepalive=SECONDS)")
        try:
            keepalive = int(values[-1])
        except ValueError:
            keepalive = 0
        if not 1 <= keepalive <= 65535:
            raise ValueError(f"bad MQTT URL {url!r}: keepalive is 1 to 65535 seconds")
    return Broker(parts.hostname, port or DEFAULT_PORT,
                  unquote(parts.username) if parts.username is not None else None,
                  unquote(parts.password) if parts.password is not None else None, keepalive)


def check_topic_level(what: str, value: str) -> None:
    """A cluster name or node id becomes one topic level: no wildcards, no separators."""
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} {value!r} cannot be an MQTT topic level (no '/', '+', '#')")


def _canonical(payload: Any) -> bytes:
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def retained_state(status: Status) -> dict[str, bytes]:
    """The retained topics this node writes, and their payloads, from the daemon's status."""
    me = status.node.id
    prefix = f"tbmesh/{status.cluster}"
    names = {n.id: n.name for n in status.nodes}
    mine = next((n for n in status.nodes if n.id == me), None)
    out: dict[str, Any] = {}
    if mine is not None:
        out[f"{prefix}/nodes/{me}"] = {
            "id": me, "name": mine.name, "chip": mine.chip, "state": mine.state,
            "role": mine.role, "incarnation": status.node.incarnation,
            "memory_total": mine.memory_total, "memory_usable": mine.memory_usable,
            "flops": mine.flops, "shard": to_json(mine.shard), "disk": to_json(mine.disk), "model": status.model,
            "leader": status.leader, "term": status.term,
            "alive_nodes": sum(1 for n in status.nodes if n.state == "alive"),
        }
    links = []
    for link in status.links:
        if me in (link.a, link.b):
            peer = link.b if link.a == me else link.a
            links.append({"peer": peer, "peer_name": names.get(peer), "bandwidth_bps": link.bandwidth_bps,
                          "rtt_s": link.rtt_s})
    out[f"{prefix}/nodes/{me}/links"] = sorted(links, key=lambda link: link["peer"])
    if status.runtime is not None:
        out[f"{prefix}/nodes/{me}/runtime"] = to_json(status.runtime)
    if status.leader == me:  # one writer per cluster-wide topic: the leader
        out[f"{prefix}/leader"] = {
            "id": me, "name": names.get(me), "term": status.term,
            "members": [{"id": n.id, "name": n.name, "state": n.state} for n in status.nodes],
        }
        plan, preparing, no_fit = status.plan, status.preparing, status.no_fit

        def named(stages: tuple[Stage, ...]) -> list[dict[str, Any]]:
            return [to_json(s) | {"name": names.get(s.node)}
                    | ({"group_names": [names.get(m) for m in s.group]} if s.group else {})
                    for s in stages]

        if plan is not None or preparing is not None or no_fit:
            out[f"{prefix}/plan"] = {
                "model": status.model, "fits": not no_fit, "reason": no_fit,
                "term": plan.term if plan else status.term, "epoch": plan.epoch if plan else None,
                "stages": named(plan.stages) if plan else [],
                "left_out": list(plan.left_out) if plan else [],
                # the next plan while its shards load (the running one serves meanwhile)
                "preparing": None if preparing is None else
                to_json(preparing) | {"stages": named(preparing.plan.stages)},
                "replicas": to_json(status.replicas),
            }
    return {topic: _canonical(payload) for topic, payload in out.items()}


class _Reconnect(Exception):
    """Start a new connection (our node id changed, so the last will must change too)."""


class Telemetry:
    """Publishes one daemon's state and events to an MQTT broker, from its own task."""

    def __init__(self, url: str, cluster: str, node_id: str) -> None:
        self.broker = parse_url(url)
        check_topic_level("cluster name", cluster)
        check_topic_level("node id", node_id)
        self.url = url
        self.cluster = cluster
        self.node_id = node_id
        self.connected = False
        self._status: Status | None = None
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_BACKLOG)
        self._sent: dict[str, bytes] = {}  # what the broker holds from us on this connection
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ----- what the daemon calls (cheap, never blocks) ---------------------------------

    def update(self, status: Status) -> None:
        """The daemon's latest status (Daemon.status()); only what changed gets published."""
        self._status = status
        self._wake.set()

    def event(self, event: StatusEvent) -> None:
        """One event of the daemon's log (its `at` is the daemon's monotonic clock: ours is `time`)."""
        self._events.append({"time": round(time.time(), 3), "kind": event.kind, "node": event.node,
                             "detail": event.detail, "by": self.node_id})
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Publish what is pending and "offline", then disconnect; give up after `timeout`."""
        if self._task is None:
            return
        self._closing.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except Exception:  # a timeout: the broker is gone or slow, and its will says offline
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # ----- topics ----------------------------------------------------------------------

    def _node_topic(self, node_id: str | None = None) -> str:
        return f"tbmesh/{self.cluster}/nodes/{node_id or self.node_id}"

    @property
    def status_topic(self) -> str:
        return self._node_topic() + "/status"

    @property
    def events_topic(self) -> str:
        return f"tbmesh/{self.cluster}/events"

    # ----- the publisher task ----------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        last_error = ""
        while not self._closing.is_set():
            try:
                await self._session()
            except _Reconnect:
                continue
            except (aiomqtt.MqttError, OSError) as error:
                if str(error) != last_error:
                    log.warning("MQTT broker %s:%d: %s; retrying", self.broker.host, self.broker.port,
                                error or type(error).__name__)
                    last_error = str(error)
            except Exception:  # a bug here must cost telemetry, never the daemon
                log.exception("MQTT telemetry failed; retrying")
            if self.connected:  # it worked for a while: start the backoff again
                self.connected, backoff, last_error = False, BACKOFF_MIN, ""
            if self._closing.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        broker = self.broker
        client = aiomqtt.Client(
            broker.host, broker.port, username=broker.username, password=broker.password,
            identifier=f"tbmesh-{self.node_id}", keepalive=broker.keepalive, timeout=OPERATION_TIMEOUT,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True), clean_session=True)
        async with client:
            self._sent.clear()  # the broker may have forgotten everything: publish it all again
            await client.publish(self.status_topic, b"online", qos=1, retain=True)
            self.connected = True
            log.info("MQTT telemetry connected to %s:%d", broker.host, broker.port)
            # a broker that goes away while we have nothing to say is noticed here
            watcher = asyncio.ensure_future(self._until_disconnected(client))
            try:
                while True:
                    self._wake.clear()
                    await self._publish_pending(client)
                    if self._closing.is_set():
                        await client.publish(self.status_topic, b"offline", qos=1, retain=True)
                        return  # leaving the context sends DISCONNECT: the broker drops our will
                    waiter = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if watcher.done():
                        watcher.result()  # raises the MqttError
                        raise aiomqtt.MqttError("disconnected")
            finally:
                watcher.cancel()

    @staticmethod
    async def _until_disconnected(client: aiomqtt.Client) -> None:
        async for _ in client.messages:  # we subscribe to nothing: this only ends in an error
            pass

    async def _publish_pending(self, client: aiomqtt.Client) -> None:
        while self._events:  # an event leaves the queue only once the broker has it
            await client.publish(self.events_topic, _canonical(self._events[0]), qos=1)
            self._events.popleft()
        status = self._status
        if status is None:
            return
        if status.node.id != self.node_id:
            await self._retire(client, status.node.id)
        for topic, payload in retained_state(status).items():
            if self._sent.get(topic) != payload:
                await client.publish(topic, payload, qos=1, retain=True)
                self._sent[topic] = payload

    async def _retire(self, client: aiomqtt.Client, new_id: str) -> None:
        """Our node id changed (a copied state dir): take the old id's topics down and
        reconnect, since the last will names the old status topic."""
        old = self._node_topic()
        await client.publish(old + "/status", b"offline", qos=1, retain=True)
        for topic in (old, old + "/links", old + "/runtime"):
            await client.publish(topic, b"", qos=1, retain=True)  # empty + retain clears it
        check_topic_level("node id", new_id)
        self.node_id = new_id
        raise _Reconnect
