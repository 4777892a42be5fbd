"""TCP connections to peers: the handshake, the frame loop, and sending.

One connection per pair of peers (TCP_NODELAY). With a cluster secret the connection is TLS
1.3 from its first byte, keyed from the secret (secure.py): both ends prove they hold it, and
every byte after that is authenticated and encrypted. Inside it (or on plain TCP, without a
secret) the dialer sends Hello, the listener answers Welcome (or Refuse):

    D -> L  [TLS handshake, with a secret]
    D -> L  Hello(version, node=D, ..., purpose)
    L       refuses a wrong version, another cluster, its own node id
    L -> D  Welcome(version, node=L, ..., purpose)
    D       refuses a wrong version, another cluster, its own node id, and a node other
            than the one it dialled (`expect`: the node its discovery record named)

A listener with a secret answers a plain Hello with a plain Refuse saying a secret is needed;
one without a secret closes a connection that opens with TLS. Anything malformed closes that
one connection with a logged reason: input from the network never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from tbmesh.net import secure, wire

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
MAX_WRITE_BUFFER = 64 * 2**20  # a peer that stops reading this long is cut off
READ_CHUNK = 256 * 1024


class Refused(Exception):
    """The handshake failed; the message says why, in one line."""


@dataclass(frozen=True)
class Me:
    """What we present in a handshake, and the secret that keys our connections."""

    node: str
    incarnation: int
    name: str
    cluster: str
    machine: str
    secret: bytes | None = None

    def tls(self) -> secure.ClusterTls | None:
        return secure.cluster_tls(self.secret, self.cluster) if self.secret is not None else None


def _hello(me: Me, purpose: str, kind: type = wire.Hello) -> wire.Hello:
    return kind(version=wire.PROTOCOL_VERSION, node=me.node, incarnation=me.incarnation, name=me.name,
                cluster=me.cluster, machine=me.machine, purpose=purpose)


def _check_hello(me: Me, hello: wire.Hello) -> None:
    reason = wire.version_refusal(hello)
    if reason:
        raise Refused(reason)
    if hello.cluster != me.cluster:
        # Theirs may be 64 KiB of text: cut, so that our Refuse stays within wire.MAX_TEXT.
        raise Refused(f"refused: cluster {hello.cluster!r:.80}, ours is {me.cluster!r}")
    if hello.node == me.node:
        # Ourselves (a relay looping our own dial back to us), or another machine with our id:
        # a copied state dir takes a new id when it starts (state.load_identity), so nothing a
        # peer says at run time makes us change ours.
        raise Refused("refused: that node id is ours")


@dataclass
class Detached:
    """A connection taken out of asyncio for a thread (a bulk connection): the socket, in
    blocking mode; the plaintext already read past the handshake; its TLS session, if any."""

    sock: socket.socket
    leftover: bytes
    tls: secure.Session | None


class Channel:
    """A framed connection, TLS-sealed with a secret. Made by `dial` and `answer`; `peer` is
    the other end's Hello (or Welcome) once the handshake is through."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dialed: bool,
                 tls: secure.Session | None = None) -> None:
        self.peer: wire.Hello = None  # type: ignore[assignment]  # set by the handshake
        self.reader = reader
        self.writer = writer
        self.decoder = wire.FrameDecoder()
        self.tls = tls
        self.dialed = dialed  # we dialled it (duplicate connections keep the smaller id's dial)
        self.closed = False
        self.close_reason = ""

    @property
    def peer_id(self) -> str:
        return self.peer.node

    def write(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Raw bytes (sealed with TLS): a probe's stream, or encoded frames."""
        write_all(self.writer, self.tls.seal(buffers) if self.tls is not None else buffers)

    async def read(self) -> bytes:
        """The next raw bytes from the peer (opened with TLS), for a stream that follows the
        handshake (a probe's): first what the handshake's reads took past its last message (the
        answer's go-ahead may come in one segment with its Welcome); b"" at the end."""
        if left := self.decoder.unread():
            self.decoder = wire.FrameDecoder()  # from here on the stream is raw bytes
            return left
        return await self._read()

    async def _read(self) -> bytes:
        while True:
            data = await self.reader.read(READ_CHUNK)
            if not data or self.tls is None:
                return data
            plain = self.tls.receive(data)
            if plain or self.tls.ended:
                return plain

    def send(self, message: object) -> bool:
        if self.closed:
            return False
        transport = self.writer.transport
        if transport.is_closing():  # e.g. a broken pipe the reader has not seen yet
            self.close("the connection broke")
            return False
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.close("the peer stopped reading")
            return False
        try:
            self.write(wire.encode(message))
        except (RuntimeError, OSError) as error:  # uvloop raises on a transport closed under us
            self.close(f"send failed: {error}")
            return False
        except wire.ProtocolError as error:  # TLS failed earlier on this connection
            self.close(f"protocol error: {error}")
            return False
        return True

    async def drain(self) -> None:
        if not self.closed:
            try:
                await asyncio.wait_for(self.writer.drain(), 1.0)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                pass

    async def messages(self) -> AsyncIterator[object]:
        """Messages until the connection closes; a protocol error closes it with the reason."""
        try:
            while True:
                message = self.decoder.next_message()
                if message is not None:
                    yield message
                    continue
                data = await self._read()
                if not data:
                    self.close("closed by the peer")
                    return
                self.decoder.feed(data)
        except wire.ProtocolError as error:
            log.warning("dropping %s (%s): %s", self.peer.name, self.peer_id, error)
            self.close(f"protocol error: {error}")
        except (OSError, ConnectionError) as error:
            self.close(f"connection error: {error}")

    async def receive(self) -> Any | None:
        """The next message; None when the peer closed the connection first."""
        while (message := self.decoder.next_message()) is None:
            data = await self._read()
            if not data:
                return None
            self.decoder.feed(data)
        return message

    async def next_handshake(self, kind: type) -> Any:
        """The next message, which must be a `kind` (a Refuse raises Refused with its reason)."""
        message = await self.receive()
        if message is None:
            raise Refused("the peer closed the connection during the handshake")
        if isinstance(message, wire.Refuse):
            raise Refused(f"the peer says: {message.reason}")
        if type(message) is not kind:
            raise Refused(f"expected {kind.__name__.lower()}, got {type(message).__name__.lower()}")
        return message

    def unread(self) -> bytes:
        """Plaintext read past the handshake and not yet taken."""
        return self.decoder.unread()

    def detach(self) -> Detached:
        """Take the connection out of asyncio, for a thread that runs it with a blocking
        socket (a bulk connection): a duplicate of the socket, the plaintext already read
        past the handshake and the TLS session. The channel is closed (reason "detached");
        the connection itself stays open until the returned socket is closed."""
        if self.closed:
            raise RuntimeError(f"cannot detach a closed channel ({self.close_reason})")
        transport = self.writer.transport
        if transport.get_write_buffer_size():
            raise RuntimeError("cannot detach a channel with unsent bytes")  # they would interleave
        transport.pause_reading()
        # StreamReader has no public way to take what it buffered; _buffer is its only store
        # (the same since Python 3.4). The handshake reads in chunks, so bytes the peer sent
        # right after it (a first Fetch) may sit there or in the decoder.
        raw = bytes(self.reader._buffer)
        self.reader._buffer.clear()
        leftover = self.decoder.unread() + (self.tls.receive(raw) if self.tls is not None else raw)
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        self.closed, self.close_reason = True, "detached"
        transport.close()  # closes asyncio's fd, not the duplicate: no FIN is sent
        sock.setblocking(True)
        return Detached(sock, leftover, self.tls)

    def close(self, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.writer.close()


def write_all(writer: asyncio.StreamWriter, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
    """`buffers` in order. One is written as it is: asyncio's writelines joins its list into a
    new bytes first (Python 3.11), a copy of every byte that halved the probe at 5 Gbit/s."""
    buffers = buffers if isinstance(buffers, list) else list(buffers)
    if len(buffers) == 1:
        writer.write(buffers[0])
    else:
        writer.writelines(buffers)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _tls_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         session: secure.Session, first: bytes = b"") -> bytes:
    data = first
    while True:
        try:
            out = session.handshake(data)
        except wire.ProtocolError as error:
            raise Refused(str(error)) from None
        if out:
            writer.write(out)
        if session.established:
            return session.receive(b"")  # plaintext that came with the handshake's last flight
        data = await reader.read(READ_CHUNK)
        if not data:
            raise Refused("the peer closed the connection during the TLS handshake "
                          "(it has no cluster secret, or another one)")


def _tell(channel: Channel, error: Refused | wire.ProtocolError) -> None:
    """Send the peer why we refuse it (not a refusal it sent us)."""
    reason = str(error) if isinstance(error, Refused) else f"refused: {error}"
    if not reason.startswith("the peer says"):
        with contextlib.suppress(wire.ProtocolError, OSError, RuntimeError):
            channel.write(wire.encode(wire.Refuse(reason[:wire.MAX_TEXT])))


async def _handshake(steps: Awaitable[Channel], writer: asyncio.StreamWriter) -> Channel:
    """Run one side of the handshake within the time limit; every failure is Refused."""
    try:
        return await asyncio.wait_for(steps, HANDSHAKE_TIMEOUT)
    except asyncio.TimeoutError:
        error: Exception = Refused("handshake timed out")
    except wire.ProtocolError as protocol_error:
        error = Refused(f"protocol error: {protocol_error}")
    except (Refused, OSError) as other:
        error = other
    writer.close()
    raise error


async def dial(host: str, port: int, me: Me, purpose: str = "peer", expect: str | None = None) -> Channel:
    """Connect and handshake; raises Refused or OSError. `expect`: the node we mean to reach
    (a discovery record's); the Welcome of any other is refused."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), HANDSHAKE_TIMEOUT)
    _nodelay(writer)
    return await _handshake(_dial_steps(reader, writer, me, purpose, expect), writer)


async def _dial_steps(reader, writer, me: Me, purpose: str, expect: str | None) -> Channel:
    tls = me.tls()
    session = secure.Session(tls.client, server_side=False) if tls is not None else None
    channel = Channel(reader, writer, dialed=True, tls=session)
    if session is not None:
        channel.decoder.feed(await _tls_handshake(reader, writer, session))
    channel.write(wire.encode(_hello(me, purpose)))
    try:
        welcome = await channel.next_handshake(wire.Welcome)
        _check_hello(me, welcome)
        if welcome.purpose != purpose:
            raise Refused(f"refused: a welcome for a {welcome.purpose!r:.20} connection, we asked for {purpose!r}")
        if expect is not None and welcome.node != expect:
            raise Refused(f"refused: reached node {welcome.node!r:.40} ({welcome.name!r:.80}), "
                          f"not {expect!r}, the node its address was advertised for")
    except (Refused, wire.ProtocolError) as error:
        _tell(channel, error)
        raise
    channel.peer = welcome
    return channel


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, me: Me) -> Channel:
    """Handshake an accepted connection; raises Refused (after telling the peer why)."""
    _nodelay(writer)
    return await _handshake(_answer_steps(reader, writer, me), writer)


async def _answer_steps(reader, writer, me: Me) -> Channel:
    first = await reader.read(READ_CHUNK)
    if not first:
        raise Refused("the peer closed the connection before its hello")
    tls = me.tls()
    if tls is None and secure.looks_like_tls(first):
        raise Refused("refused: the peer speaks TLS (it has a cluster secret) and we have none")
    channel = Channel(reader, writer, dialed=False)
    if tls is None:
        channel.decoder.feed(first)
    elif secure.looks_like_tls(first):
        channel.tls = secure.Session(tls.server, server_side=True)
        channel.decoder.feed(await _tls_handshake(reader, writer, channel.tls, first))
    else:
        channel.decoder.feed(first)  # a plain hello: tell it why, in plain
        error = Refused("refused: this cluster has a secret: start the daemon with the same --secret")
        _tell(channel, error)
        raise error
    try:
        hello = await channel.next_handshake(wire.Hello)
        _check_hello(me, hello)
    except (Refused, wire.ProtocolError) as error:
        _tell(channel, error)
        raise
    channel.write(wire.encode(_hello(me, hello.purpose, wire.Welcome)))
    channel.peer = hello
    return channel
