"""TCP connections to peers: the handshake, the frame loop, and sending.

One connection per pair of peers (TCP_NODELAY). The dialer sends Hello, the listener
answers Welcome (or Refuse), the dialer confirms with Auth; with a cluster secret both
sides prove they hold it (see wire.py). Anything malformed closes that one connection with
a logged reason: input from the network never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

from tbmesh.net import wire

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
MAX_WRITE_BUFFER = 64 * 2**20  # a peer that stops reading this long is cut off
READ_CHUNK = 256 * 1024


class Refused(Exception):
    """The handshake failed; the message says why, in one line."""


@dataclass(frozen=True)
class Me:
    """What we present in a handshake."""

    node: str
    incarnation: int
    name: str
    cluster: str
    machine: str
    secret: bytes | None = None


def _hello(me: Me, purpose: str, nonce: bytes, kind: type = wire.Hello, proof: bytes = b"") -> wire.Hello:
    return kind(
        version=wire.PROTOCOL_VERSION, node=me.node, incarnation=me.incarnation, name=me.name,
        cluster=me.cluster, machine=me.machine, purpose=purpose, nonce=nonce, proof=proof,
    )


def _check_hello(me: Me, hello: wire.Hello) -> None:
    reason = wire.version_refusal(hello)
    if reason:
        raise Refused(reason)
    if hello.cluster != me.cluster:
        # Theirs may be 64 KiB of text: cut, so that our Refuse stays within wire.MAX_TEXT.
        raise Refused(f"refused: cluster {hello.cluster!r:.80}, ours is {me.cluster!r}")
    if hello.node == me.node and hello.machine == me.machine:
        raise Refused("refused: that is ourselves")


def _who(node: str, machine: str) -> str:
    # Proofs name the machine too: a stranger that claims our own node id from another
    # machine cannot relay our own proof back to us (the ids in the MAC would match).
    return f"{node}@{machine}"


def _proof(me: Me, mine: bytes, theirs: bytes, peer: wire.Hello, role: str) -> bytes:
    if me.secret is None:
        return b""
    return wire.make_proof(me.secret, mine, theirs, _who(me.node, me.machine),
                           _who(peer.node, peer.machine), role)


def _verify(me: Me, proof: bytes, mine: bytes, theirs: bytes, peer: wire.Hello, role: str) -> None:
    if me.secret is None:
        if proof:
            raise Refused("refused: the peer has a cluster secret and we have none")
        return
    reason = wire.proof_refusal(me.secret, proof, theirs, mine, _who(peer.node, peer.machine),
                                _who(me.node, me.machine), role)
    if reason:
        raise Refused(reason)


class Channel:
    """A framed, handshaken connection."""

    def __init__(self, peer: wire.Hello, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, decoder: wire.FrameDecoder, dialed: bool) -> None:
        self.peer = peer
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.dialed = dialed  # we dialled it (duplicate connections keep the smaller id's dial)
        self.closed = False
        self.close_reason = ""

    @property
    def peer_id(self) -> str:
        return self.peer.node

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
            self.writer.writelines(wire.encode(message))
        except (RuntimeError, OSError) as error:  # uvloop raises on a transport closed under us
            self.close(f"send failed: {error}")
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
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    self.close("closed by the peer")
                    return
                self.decoder.feed(data)
        except wire.ProtocolError as error:
            log.warning("dropping %s (%s): %s", self.peer.name, self.peer_id, error)
            self.close(f"protocol error: {error}")
        except (OSError, ConnectionError) as error:
            self.close(f"connection error: {error}")

    def detach(self) -> tuple[socket.socket, bytes]:
        """Take the connection out of asyncio, for a thread that runs it with a blocking
        socket (a bulk connection: os.sendfile, recv_into): a duplicate of the socket, and
        the bytes already read past the handshake. The channel is closed (reason "detached");
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
        leftover = self.decoder.unread() + bytes(self.reader._buffer)
        self.reader._buffer.clear()
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        self.closed, self.close_reason = True, "detached"
        transport.close()  # closes asyncio's fd, not the duplicate: no FIN is sent
        sock.setblocking(True)
        return sock, leftover

    def close(self, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _next(reader: asyncio.StreamReader, decoder: wire.FrameDecoder, kind: type) -> Any:
    """The next handshake message, which must be a `kind`."""
    while (message := decoder.next_message()) is None:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise Refused("the peer closed the connection during the handshake")
        decoder.feed(data)
    if isinstance(message, wire.Refuse):
        raise Refused(f"the peer says: {message.reason}")
    if type(message) is not kind:
        raise Refused(f"expected {kind.__name__.lower()}, got {type(message).__name__.lower()}")
    return message


@contextlib.contextmanager
def _telling(writer: asyncio.StreamWriter) -> Iterator[None]:
    """A refusal (or an undecodable frame) raised inside is sent to the peer, then raised."""
    try:
        yield
    except (Refused, wire.ProtocolError) as error:
        reason = str(error) if isinstance(error, Refused) else f"refused: {error}"
        if not reason.startswith("the peer says"):
            writer.writelines(wire.encode(wire.Refuse(reason)))
        raise


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


async def dial(host: str, port: int, me: Me, purpose: str = "peer") -> Channel:
    """Connect and handshake; raises Refused or OSError."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), HANDSHAKE_TIMEOUT)
    _nodelay(writer)
    return await _handshake(_dial_steps(reader, writer, wire.FrameDecoder(), me, purpose), writer)


async def _dial_steps(reader, writer, decoder, me: Me, purpose: str) -> Channel:
    nonce = os.urandom(16)
    writer.writelines(wire.encode(_hello(me, purpose, nonce)))
    with _telling(writer):
        welcome = await _next(reader, decoder, wire.Welcome)
        _check_hello(me, welcome)
        _verify(me, welcome.proof, nonce, welcome.nonce, welcome, "listener")
    writer.writelines(wire.encode(wire.Auth(_proof(me, nonce, welcome.nonce, welcome, "dialer"))))
    return Channel(welcome, reader, writer, decoder, dialed=True)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, me: Me) -> Channel:
    """Handshake an accepted connection; raises Refused (after telling the peer why)."""
    _nodelay(writer)
    return await _handshake(_answer_steps(reader, writer, wire.FrameDecoder(), me), writer)


async def _answer_steps(reader, writer, decoder, me: Me) -> Channel:
    with _telling(writer):
        hello = await _next(reader, decoder, wire.Hello)
        _check_hello(me, hello)
    nonce = os.urandom(16)
    proof = _proof(me, nonce, hello.nonce, hello, "listener")
    writer.writelines(wire.encode(_hello(me, hello.purpose, nonce, wire.Welcome, proof)))
    with _telling(writer):
        auth = await _next(reader, decoder, wire.Auth)
        _verify(me, auth.proof, nonce, hello.nonce, hello, "dialer")
    return Channel(hello, reader, writer, decoder, dialed=False)
