"""Strangers on the cable, for tests/test_hostile.py and bench/chaos.py's hostile nemesis.

A `Stranger` is not a member: it holds no secret and no node of its own. From an asyncio loop
in a thread (inside a network namespace when given one: the sockets it makes live there) it
can
- advertise a zeroconf record, as a daemon does (discovery.py's service type and TXT record),
  for a made-up node id, naming any address and port (its own relay's, or a member's);
- relay every TCP connection its port gets to a member: an opaque byte pipe, flipping a bit
  of a chunk now and then once the first flights have passed;
- dial a member and send what no member would: garbage, a Hello without the secret, a Hello
  of protocol 4, a TLS handshake keyed from another secret, half a handshake that stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from tbmesh.net import peers, wire
from tbmesh.net.discovery import SERVICE_TYPE, Advert, txt_record

T = TypeVar("T")

RELAY_CLEAN_CHUNKS = 1  # chunks each way passed untouched: the first flight (ClientHello, or Hello)
DIAL_KINDS = ("garbage", "plain hello", "hello v4", "wrong secret", "stall")


@dataclass
class Relay:
    """A listening port whose every connection is piped to `target`."""

    port: int
    target: tuple[str, int]
    flip: float  # the chance that a chunk past the first flights has one bit flipped
    connections: int = 0
    flipped: int = 0
    server: asyncio.AbstractServer | None = None
    rng: random.Random = field(default_factory=random.Random)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)  # both ends of the open pipes


class Stranger:
    def __init__(self, bind: list[str], ns: str | None = None) -> None:
        """`bind`: the addresses its zeroconf and its relays use; `ns`: a netns.Lab namespace."""
        self.bind = bind
        self.loop = asyncio.new_event_loop()
        self.zc: AsyncZeroconf | None = None
        self.records: dict[str, AsyncServiceInfo] = {}
        self.relays: list[Relay] = []
        if ns is None:
            run: Callable[[], None] = self.loop.run_forever
        else:
            import netns

            def run() -> None:
                netns.in_netns(ns, self.loop.run_forever)
        self.thread = threading.Thread(target=run, daemon=True, name="stranger")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ----- zeroconf ----------------------------------------------------------------------

    def advertise(self, node_id: str, cluster: str, port: int, addresses: list[str],
                  name: str = "stranger") -> None:
        """Register `<node_id>._tbmesh._tcp.local.` saying the node is at `addresses`:`port`."""
        self.run(self._advertise(Advert(node_id, name, cluster, wire.PROTOCOL_VERSION, port), addresses))

    async def _advertise(self, advert: Advert, addresses: list[str]) -> None:
        if self.zc is None:
            self.zc = AsyncZeroconf(interfaces=self.bind, ip_version=IPVersion.V4Only)
        info = AsyncServiceInfo(SERVICE_TYPE, f"{advert.node_id}.{SERVICE_TYPE}", port=advert.port,
                                properties=txt_record(advert),
                                addresses=[socket.inet_aton(a) for a in addresses],
                                server=f"tbmesh-{advert.node_id}.local.")
        await self.zc.async_register_service(info, allow_name_change=False)
        self.records[advert.node_id] = info

    def withdraw(self, node_id: str) -> None:
        """Unregister the record (zeroconf sends its goodbye packets)."""
        self.run(self._withdraw(node_id))

    async def _withdraw(self, node_id: str) -> None:
        info = self.records.pop(node_id, None)
        if info is not None and self.zc is not None:
            await self.zc.async_unregister_service(info)

    # ----- the relay ---------------------------------------------------------------------

    def relay(self, target: tuple[str, int], flip: float = 0.0, seed: int | None = None,
              listen: str | None = None) -> Relay:
        """Listen on `listen` (the first bound address by default); pipe every connection to `target`."""
        return self.run(self._relay(target, flip, seed, listen or self.bind[0]))

    async def _relay(self, target: tuple[str, int], flip: float, seed: int | None, listen: str) -> Relay:
        relay = Relay(0, target, flip, rng=random.Random(seed))
        relay.server = await asyncio.start_server(lambda r, w: self._pipe_both(relay, r, w), listen, 0)
        relay.port = relay.server.sockets[0].getsockname()[1]
        self.relays.append(relay)
        return relay

    def stop_relay(self, relay: Relay) -> None:
        """No new connections, and the open pipes cut."""
        async def stop() -> None:
            if relay.server is not None:
                relay.server.close()
            for writer in list(relay.writers):
                writer.close()

        self.run(stop())

    async def _pipe_both(self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay.connections += 1
        try:
            far_reader, far_writer = await asyncio.wait_for(asyncio.open_connection(*relay.target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        relay.writers |= {writer, far_writer}
        try:
            await asyncio.gather(self._pipe(relay, reader, far_writer), self._pipe(relay, far_reader, writer))
        finally:
            relay.writers -= {writer, far_writer}

    async def _pipe(self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks = 0
        try:
            while data := await reader.read(65536):
                chunks += 1
                if chunks > RELAY_CLEAN_CHUNKS and relay.flip and relay.rng.random() < relay.flip:
                    flipped = bytearray(data)
                    flipped[relay.rng.randrange(len(flipped))] ^= 1 << relay.rng.randrange(8)
                    data = bytes(flipped)
                    relay.flipped += 1
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                writer.close()

    # ----- dialling ----------------------------------------------------------------------

    def dial(self, kind: str, host: str, port: int, cluster: str, stall_s: float = 3.0) -> str:
        """One hostile connection of `kind` (DIAL_KINDS) to a member; what came of it, for a log."""
        return self.run(hostile_dial(kind, host, port, cluster, stall_s), timeout=stall_s + 30)

    def close(self) -> None:
        async def shut() -> None:
            for relay in self.relays:
                if relay.server is not None:
                    relay.server.close()
            if self.zc is not None:
                with contextlib.suppress(asyncio.TimeoutError, OSError):
                    await asyncio.wait_for(self.zc.async_unregister_all_services(), 3)
                await self.zc.async_close()
                self.zc = None
            # the pipes still open, and hostile dials still stalling
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(shut(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def hello_bytes(cluster: str, version: int = wire.PROTOCOL_VERSION, node: str = "stranger") -> bytes:
    hello = wire.Hello(version, node, 1, "stranger", cluster, "stranger-machine", "peer")
    return b"".join(bytes(part) for part in wire.encode(hello))


async def hostile_dial(kind: str, host: str, port: int, cluster: str, stall_s: float = 3.0) -> str:
    """Dial a member as a stranger would; returns what happened (never raises for the
    member's refusal: refusing is what it should do)."""
    if kind == "wrong secret":  # a real TLS handshake, keyed from another secret
        me = peers.Me("stranger", 1, "stranger", cluster, "stranger-machine", os.urandom(16))
        try:
            channel = await peers.dial(host, port, me)
        except (peers.Refused, OSError) as error:
            return f"{kind}: refused ({error})"
        channel.close("stranger done")
        return f"{kind}: ACCEPTED"  # must never happen
    payload = {
        "garbage": os.urandom(random.randint(1, 4096)),
        "plain hello": hello_bytes(cluster),
        "hello v4": hello_bytes(cluster, version=4),
        # a frame's header promising more than ever comes, or the start of a TLS ClientHello
        "stall": random.choice([hello_bytes(cluster)[:9], bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])]),
    }[kind]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(payload)
        if kind == "stall":
            await asyncio.sleep(stall_s)
        answer = await asyncio.wait_for(reader.read(65536), 10)
        if kind in ("plain hello", "hello v4") and any(isinstance(m, wire.Welcome) for m in _decoded(answer)):
            return f"{kind}: ACCEPTED"  # a Welcome: must never happen
        return f"{kind}: answered {answer[:60]!r}"
    except (OSError, asyncio.TimeoutError) as error:
        return f"{kind}: {error!r}"
    finally:
        writer.close()


def _decoded(data: bytes) -> list[Any]:
    decoder = wire.FrameDecoder()
    try:
        decoder.feed(data)
        return list(decoder)
    except wire.ProtocolError:
        return []
