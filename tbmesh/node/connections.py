"""The peer connections: one per peer, accepted or dialled, each read by its own task.

    discovery (zeroconf) --found--> dial loop --Channel--> adopt --> read loop --messages-->
    core (through the daemon's glue) or the data plane

A connection accepted is handshaken first (peers.answer), then handed by its purpose: a
probe or a bulk fetch to their own handler, a peer connection kept only once the dialer's
first message arrives. Both ends may dial at once: both keep the one the smaller id dialled.
Nothing received from the network can raise out of its own connection's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from tbmesh.net import peers, wire
from tbmesh.net.discovery import Found
from tbmesh.node.tasks import OncePer, Tasks, supervise

log = logging.getLogger("tbmesh")

# Redialling a peer that refused or did not answer: doubling from the least to the most, each
# wait jittered by ±50% so that Macs that lost each other do not dial in step.
DIAL_BACKOFF_MIN = 0.1
DIAL_BACKOFF_MAX = 2.0
CLOSING_POLL_S = 0.02  # a dial loop waits this long for a closed connection's reader to clean up


@dataclass
class PeerEvents:
    """What the daemon does when a peer connection comes, speaks and goes."""

    connected: Callable[[peers.Channel], None]  # kept: the core's peer_connected, a probe, ...
    received: Callable[[str, object], None]  # a message (raises wire.ProtocolError on a bad one)
    disconnected: Callable[[str], None]  # the kept connection to this peer closed
    accepted: dict[str, Callable[[peers.Channel, str], Awaitable[None]]]  # other purposes' handlers, by purpose


class Connections:
    def __init__(self, me: Callable[[], peers.Me], addresses: Callable[[], list[str]], events: PeerEvents,
                 tasks: Tasks) -> None:
        self._me = me  # who we are in a handshake (the incarnation may grow while we run)
        self._addresses = addresses  # where we serve: connections to other addresses are closed
        self._events = events
        self._tasks = tasks
        self.channels: dict[str, peers.Channel] = {}  # peer id -> the kept connection
        self.known: dict[str, Found] = {}  # peer id -> its Bonjour record
        self.stopping = False
        self._wake: dict[str, asyncio.Event] = {}
        self._dialers: dict[str, asyncio.Task] = {}
        self._refusals = OncePer()  # warnings of refused connections, per remote address

    # ----- what the core and the data plane send -----------------------------------------

    def send_direct(self, peer: str, message: object) -> bool:
        channel = self.channels.get(peer)
        return channel is not None and channel.send(message)

    def close(self, peer: str, reason: str) -> None:
        channel = self.channels.get(peer)
        if channel is not None:
            channel.close(reason)

    def close_where(self, addresses: list[str]) -> None:
        """Close the connections whose local address is not one of `addresses` (its interface
        went away): their peers are suspected now, not after silence."""
        for channel in list(self.channels.values()):
            local = channel.writer.get_extra_info("sockname")
            if local is not None and local[0] not in addresses:
                channel.close("its interface went away")

    async def drain(self) -> None:
        """Until what was sent (goodbyes) has left, on every connection."""
        await asyncio.gather(*(c.drain() for c in list(self.channels.values())))

    def stop(self) -> list[asyncio.Task]:
        """Cancel the dial loops and close every connection (their readers end on their own);
        returns the dial loops, to wait for."""
        self.stopping = True
        dialers = list(self._dialers.values())
        for task in dialers:
            task.cancel()
        for channel in list(self.channels.values()):
            channel.close("daemon stopping")
        return dialers

    # ----- accepting ---------------------------------------------------------------------

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server's callback."""
        local = writer.get_extra_info("sockname")
        if self.stopping or local is None or local[0] not in self._addresses():
            writer.close()  # stopping, or a connection on an interface we do not serve (Wi-Fi, Ethernet)
            return
        remote = writer.get_extra_info("peername")
        address = str(remote[0]) if remote else "?"
        try:
            channel = await peers.answer(reader, writer, self._me())
        except peers.Refused as error:  # a stranger may try again and again: a line a minute
            self.refused(address, "refused a connection from %s: %s", address, error)
            return
        except (OSError, ConnectionError, asyncio.CancelledError):  # cancelled: the daemon stops
            writer.close()
            return
        handler = self._events.accepted.get(channel.peer.purpose)
        if handler is not None:
            await handler(channel, address)
        elif (first := await self._first_message(channel)) is not None:
            self.adopt(channel, first)

    def refused(self, address: str, message: str, *args: object) -> None:
        """A WARNING for a connection refused, once a minute per remote address."""
        self._refusals.log(log, logging.WARNING, address, message, *args)

    async def _first_message(self, channel: peers.Channel) -> object | None:
        """The first message on a peer connection we accepted; None when the dialer refused our
        Welcome, closed, or said nothing in time. A dialer refuses the Welcome of a node other
        than the one it meant to reach (a stray mDNS record or a relay led it to us under another
        id); a dialer that meant us sends its heartbeat at once. Until then the connection is
        not ours to keep: adopting it would replace the one we have with that node, at each dial."""

        try:
            message = await asyncio.wait_for(channel.receive(), peers.HANDSHAKE_TIMEOUT)
            if message is None:
                raise ConnectionError("closed after our welcome")
        except asyncio.CancelledError:  # the daemon stops
            channel.close("daemon stopping")
            return None
        except (OSError, asyncio.TimeoutError, wire.ProtocolError) as error:
            log.info("a connection from %s ended before its first message: %s", channel.peer.name,
                     error or "timed out")
            channel.close("no first message")
            return None
        if isinstance(message, wire.Refuse):
            log.info("a connection from %s was not meant for us: %s", channel.peer.name, message.reason)
            channel.close("refused by its dialer")
            return None
        return message

    # ----- keeping and reading -----------------------------------------------------------

    def adopt(self, channel: peers.Channel, first: object | None = None) -> None:
        """A handshaken peer connection: keep it (or the one we had) and start reading
        (`first`: the message already read from it)."""
        if self.stopping:
            channel.close("daemon stopping")
            return
        peer = channel.peer_id
        existing = self.channels.get(peer)
        if existing is not None and not existing.closed:
            if not self._prefer(channel, existing):
                channel.close("duplicate connection")
                return
            existing.close("replaced by a newer connection")
        self.channels[peer] = channel
        self._tasks.spawn(self._read(channel, first))  # it runs once this returns
        self._events.connected(channel)

    def _prefer(self, new: peers.Channel, old: peers.Channel) -> bool:
        """Both ends dialled at once: both keep the connection the smaller id dialled."""
        if new.peer.incarnation != old.peer.incarnation:
            return new.peer.incarnation > old.peer.incarnation
        smaller_dialled = (self._me().node < new.peer_id) == new.dialed
        return smaller_dialled

    async def _read(self, channel: peers.Channel, first: object | None = None) -> None:
        peer = channel.peer_id
        try:
            async for message in _then(first, channel.messages()):
                if self.channels.get(peer) is not channel:
                    break
                try:
                    self._events.received(peer, message)
                except wire.ProtocolError as error:
                    log.warning("dropping %s: %s", channel.peer.name, error)
                    channel.close(f"protocol error: {error}")
                    break
                except Exception:  # a bug must cost one connection, not the daemon
                    log.exception("handling a message from %s", peer)
                    channel.close("internal error")
                    break
        finally:
            channel.close(channel.close_reason or "reader stopped")
            if self.channels.get(peer) is channel:
                del self.channels[peer]
                log.info("connection to %s closed: %s", channel.peer.name, channel.close_reason)
                self._events.disconnected(peer)
                self.wake(peer)

    # ----- discovery and dialling --------------------------------------------------------

    def found(self, found: Found) -> None:
        """Discovery's callback: a peer's record came or changed."""
        if self.stopping or found.node_id == self._me().node:
            return
        if found.version != wire.PROTOCOL_VERSION:
            if self.known.get(found.node_id) != found:
                log.warning("not connecting to %s: it speaks protocol %d, we speak %d",
                            found.name, found.version, wire.PROTOCOL_VERSION)
            self.known[found.node_id] = found
            return
        self.known[found.node_id] = found
        if found.node_id not in self._dialers or self._dialers[found.node_id].done():
            peer = found.node_id
            self._dialers[peer] = asyncio.ensure_future(
                supervise(f"the dial loop to {found.name}", lambda: self._dial_loop(peer)))
        self.wake(found.node_id)

    def removed(self, node_id: str) -> None:
        """Discovery's callback: a record went. Heartbeats decide whether a connected peer is
        gone (mDNS goodbyes are hints at best); a node we are not connected to is no longer
        dialled."""
        if node_id not in self.channels and self.known.pop(node_id, None) is not None:
            self.wake(node_id)  # its dial loop sees no record and ends

    def wake(self, peer: str) -> None:
        """Its dial loop looks again now (a connection closed, an interface changed)."""
        self._wake.setdefault(peer, asyncio.Event()).set()

    def wake_all(self) -> None:
        for peer in list(self.known):
            self.wake(peer)

    async def _dial_loop(self, peer: str) -> None:
        """Keep one connection to `peer` while discovery knows it; back off on failure."""
        wake = self._wake.setdefault(peer, asyncio.Event())
        # usually the smaller id dials; the other waits a little to avoid crossing dials
        backoff = 0.0 if self._me().node < peer else DIAL_BACKOFF_MIN * 3
        last_error = ""
        while not self.stopping:
            channel = self.channels.get(peer)
            if channel is not None:
                if channel.closed:  # its reader has not cleaned up yet: let it run
                    await asyncio.sleep(CLOSING_POLL_S)
                else:
                    wake.clear()
                    await wake.wait()
                    backoff = 0.0
                continue
            if backoff:
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), backoff * random.uniform(0.5, 1.5))
                if peer in self.channels:
                    continue  # it dialled us meanwhile
            found = self.known.get(peer)
            if found is None or found.version != wire.PROTOCOL_VERSION:
                return  # its record went (or never was one we can speak to)
            try:
                channel = await self.dial(found)
            except (peers.Refused, OSError) as error:
                if str(error) != last_error:
                    log.info("cannot connect to %s: %s", found.name, error)
                    last_error = str(error)
                backoff = min(max(backoff * 2, DIAL_BACKOFF_MIN), DIAL_BACKOFF_MAX)
                continue
            last_error = ""
            self.adopt(channel)

    async def dial(self, found: Found, purpose: str = "peer") -> peers.Channel:
        """Dial every advertised address at once; the first handshake wins.
        (A peer advertises all its cables' addresses; only some are reachable from here.)"""
        me = self._me()
        pending = {asyncio.ensure_future(peers.dial(a, found.port, me, purpose, expect=found.node_id))
                   for a in found.addresses}
        winner: peers.Channel | None = None
        refused: peers.Refused | None = None
        errors: list[BaseException] = []
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None and winner is None:
                        winner = task.result()
                    elif error is None:
                        task.result().close("another address answered first")
                    elif isinstance(error, peers.Refused):
                        refused = error
                    else:
                        errors.append(error)
        finally:
            for task in pending:
                task.cancel()
        if winner is not None:
            return winner
        if refused is not None:
            raise refused
        raise OSError(f"no address answered ({'; '.join(str(e) for e in errors[:3])})")


async def _then(first: object | None, messages: AsyncIterator[object]) -> AsyncIterator[object]:
    """`first` (unless None), then `messages`."""
    if first is not None:
        yield first
    async for message in messages:
        yield message
