"""The peer handshake over real TCP on loopback: secrets, refusals, TLS, and what a stranger
in the middle can and cannot do."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import pytest

from tbmesh.net import peers, wire


def me(node: str, secret: bytes | None = None, cluster: str = "c", machine: str | None = None) -> peers.Me:
    return peers.Me(node, 1, node, cluster, machine or f"machine-of-{node}", secret)


async def listen(listener: peers.Me, answered: asyncio.Queue) -> tuple[asyncio.Server, int]:
    """A listener that puts each accepted connection's result (Channel or Refused) in `answered`."""

    async def on_accept(reader, writer):
        try:
            await answered.put(await peers.answer(reader, writer, listener))
        except peers.Refused as error:
            await answered.put(error)

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def handshake(dialer: peers.Me, listener: peers.Me, expect: str | None = None):
    """Dial `listener` from `dialer`; returns (dial result or error, answer result or error)."""
    answered: asyncio.Queue = asyncio.Queue()
    server, port = await listen(listener, answered)
    try:
        try:
            dialled = await peers.dial("127.0.0.1", port, dialer, expect=expect)
        except peers.Refused as error:
            dialled = error
        other = await asyncio.wait_for(answered.get(), 5)
    finally:
        server.close()
    for side in (dialled, other):
        if isinstance(side, peers.Channel):
            side.close()
    return dialled, other


async def relay(target_port: int, tamper_after: int | None = None) -> tuple[asyncio.Server, int]:
    """A stranger holding no secret: it pipes bytes between whoever dials it and the member
    at `target_port`, flipping one bit of the member-bound stream past `tamper_after` bytes."""

    async def pipe(reader, writer, tamper: bool):
        seen = 0
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if tamper and tamper_after is not None and seen <= tamper_after < seen + len(data):
                    data = bytearray(data)
                    data[tamper_after - seen] ^= 0x01
                seen += len(data)
                writer.write(bytes(data))
                await writer.drain()
        writer.close()

    async def on_accept(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(coro):
    return asyncio.run(coro)


def test_same_secret_connects_both_ways_over_tls_and_names_the_peer():
    dialled, answered = run(handshake(me("a", b"s"), me("b", b"s"), expect="b"))
    assert isinstance(dialled, peers.Channel) and dialled.peer_id == "b" and dialled.dialed
    assert isinstance(answered, peers.Channel) and answered.peer_id == "a" and not answered.dialed
    assert dialled.tls is not None and answered.tls is not None


def test_without_a_secret_the_connection_is_plain():
    dialled, answered = run(handshake(me("a"), me("b")))
    assert isinstance(dialled, peers.Channel) and dialled.tls is None and answered.tls is None


@pytest.mark.parametrize("dialer_secret, listener_secret", [
    (b"right", b"wrong"), (None, b"s"), (b"s", None),
])
def test_a_wrong_or_missing_secret_is_refused(dialer_secret, listener_secret):
    dialled, answered = run(handshake(me("a", dialer_secret), me("b", listener_secret)))
    assert isinstance(dialled, peers.Refused)
    assert isinstance(answered, peers.Refused)
    assert "secret" in str(dialled) and "secret" in str(answered)


def test_the_same_secret_in_another_cluster_is_refused():
    dialled, answered = run(handshake(me("a", b"s", cluster="red"), me("b", b"s", cluster="blue")))
    assert isinstance(dialled, peers.Refused) and isinstance(answered, peers.Refused)


def test_another_cluster_and_another_version_are_refused_with_the_reason():
    dialled, _ = run(handshake(me("a", cluster="red"), me("b", cluster="blue")))
    assert isinstance(dialled, peers.Refused) and "cluster 'red'" in str(dialled)

    async def old_peer():
        answered: asyncio.Queue = asyncio.Queue()
        server, port = await listen(me("b"), answered)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # a version-4 hello: it carried a nonce and a proof, fields version 5 does not know
        hello = {"t": "hello", "version": 4, "node": "a", "incarnation": 1, "name": "a", "cluster": "c",
                 "machine": "m", "purpose": "peer", "nonce": b"n" * 16, "proof": b""}
        header = msgpack.packb(hello, use_bin_type=True)
        writer.write(wire.PREFIX.pack(len(header), 0) + header)
        decoder = wire.FrameDecoder()
        decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()
        server.close()
        return decoder.next_message()

    refusal = run(old_peer())
    assert isinstance(refusal, wire.Refuse) and "protocol version 4" in refusal.reason


def test_the_refusal_of_a_long_foreign_cluster_name_is_a_valid_frame():
    # The name (64 KiB, as much as a string field may hold) once went whole into our Refuse,
    # whose reason then broke wire.MAX_TEXT: the dialer saw a protocol error, not the reason.
    dialled, answered = run(handshake(me("a", cluster="x" * wire.MAX_TEXT), me("b")))
    assert isinstance(answered, peers.Refused) and len(str(answered)) < 200
    assert isinstance(dialled, peers.Refused) and str(dialled).startswith("the peer says: refused: cluster 'xxx")


@pytest.mark.parametrize("secret", [None, b"s"])
def test_our_own_node_id_is_refused_from_any_machine(secret):
    """One Hello with our id once made a node renew its identity (and wedge the cluster)."""
    dialled, answered = run(handshake(me("a", secret, machine="elsewhere"), me("a", secret)))
    assert isinstance(answered, peers.Refused) and "node id is ours" in str(answered)
    assert isinstance(dialled, peers.Refused)


@pytest.mark.parametrize("secret", [None, b"s"])
def test_the_dialer_refuses_a_node_other_than_the_one_it_meant(secret):
    dialled, _ = run(handshake(me("a", secret), me("b", secret), expect="x"))
    assert isinstance(dialled, peers.Refused) and "not 'x'" in str(dialled)


def test_a_stranger_relaying_two_members_gets_no_connection():
    """The 2026-12 probe: a stranger advertised itself as node x, a member dialled it, and it
    relayed that member's handshake to another member. Now the TLS session runs end to end
    between the two members (the stranger holds no key), and the dialer sees it reached b,
    not the x it dialled, and refuses."""

    async def scenario():
        answered: asyncio.Queue = asyncio.Queue()
        server, port = await listen(me("b", b"s"), answered)
        stranger, stranger_port = await relay(port)
        try:
            with pytest.raises(peers.Refused, match="reached node 'b'.*not 'x'"):
                await peers.dial("127.0.0.1", stranger_port, me("a", b"s"), expect="x")
        finally:
            stranger.close()
            server.close()

    run(scenario())


def test_a_byte_changed_in_flight_closes_the_connection():
    """Every byte after the handshake is authenticated: a relay that flips one bit of a
    message (the 2026-12 probe rewrote sampled tokens) makes the receiver drop the connection
    instead of reading the altered message."""

    async def scenario():
        answered: asyncio.Queue = asyncio.Queue()
        server, port = await listen(me("b", b"s"), answered)
        # past the TLS handshake and the hello (a few kB), inside the first data message
        stranger, stranger_port = await relay(port, tamper_after=6000)
        try:
            dialled = await peers.dial("127.0.0.1", stranger_port, me("a", b"s"), expect="b")
            channel = await asyncio.wait_for(answered.get(), 5)
            assert isinstance(channel, peers.Channel)
            sent = wire.Cancel("r" * 20000, "b", "a reason")
            assert dialled.send(sent)
            received = [m async for m in channel.messages()]
            assert sent not in received and not any(isinstance(m, wire.Cancel) for m in received)
            assert channel.closed and "tls" in channel.close_reason
            dialled.close()
        finally:
            stranger.close()
            server.close()

    run(scenario())


def test_plain_messages_cross_a_tls_channel_intact():
    async def scenario():
        answered: asyncio.Queue = asyncio.Queue()
        server, port = await listen(me("b", b"s"), answered)
        try:
            dialled = await peers.dial("127.0.0.1", port, me("a", b"s"))
            channel = await asyncio.wait_for(answered.get(), 5)
            sent = [wire.Cancel(f"request-{i}", "b", "x" * i) for i in range(50)]
            sent.append(wire.Tensor("r", 1, "float32", (1, 300_000), bytes(1_200_000)))
            for message in sent:
                assert dialled.send(message)
            dialled.close()
            received = [m async for m in channel.messages()]
            assert [type(m) for m in received] == [type(m) for m in sent]
            assert received[:50] == sent[:50] and bytes(received[-1].data) == bytes(1_200_000)
        finally:
            server.close()

    run(scenario())


def test_raw_bytes_that_came_with_the_welcome_are_read_first():
    """A probe's answer writes its go-ahead right after its Welcome, and both may arrive in one
    segment: the dialer's raw read must return the byte the handshake's read took, not wait
    for more (it did: every daemon probe timed out)."""

    async def scenario():
        async def on_accept(reader, writer):
            await reader.read(4096)  # the Hello
            b = me("b")
            welcome = wire.Welcome(version=wire.PROTOCOL_VERSION, node=b.node, incarnation=b.incarnation,
                                   name=b.name, cluster=b.cluster, machine=b.machine, purpose="probe")
            writer.write(b"".join(wire.encode(welcome)) + b"G")  # one write, one segment
            await writer.drain()
            await asyncio.sleep(5)

        server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        try:
            dialled = await peers.dial("127.0.0.1", server.sockets[0].getsockname()[1], me("a"), "probe")
            assert await asyncio.wait_for(dialled.read(), 2) == b"G"
            dialled.close()
        finally:
            server.close()

    run(scenario())
