"""The peer handshake over real TCP on loopback: secrets, refusals, and what proofs bind."""

from __future__ import annotations

import asyncio
import os

import pytest

from tbmesh.net import peers, wire


def me(node: str, secret: bytes | None = None, cluster: str = "c", machine: str | None = None) -> peers.Me:
    return peers.Me(node, 1, node, cluster, machine or f"machine-of-{node}", secret)


async def handshake(dialer: peers.Me, listener: peers.Me):
    """Dial `listener` from `dialer`; returns (dial result or error, answer result or error)."""
    answered: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_accept(reader, writer):
        try:
            answered.set_result(await peers.answer(reader, writer, listener))
        except peers.Refused as error:
            answered.set_result(error)

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            dialled = await peers.dial("127.0.0.1", port, dialer)
        except peers.Refused as error:
            dialled = error
        other = await asyncio.wait_for(answered, 5)
    finally:
        server.close()
    for side in (dialled, other):
        if isinstance(side, peers.Channel):
            side.close()
    return dialled, other


def run(coro):
    return asyncio.run(coro)


def test_same_secret_connects_both_ways_and_names_the_peer():
    dialled, answered = run(handshake(me("a", b"s"), me("b", b"s")))
    assert isinstance(dialled, peers.Channel) and dialled.peer_id == "b" and dialled.dialed
    assert isinstance(answered, peers.Channel) and answered.peer_id == "a" and not answered.dialed


@pytest.mark.parametrize("dialer_secret, listener_secret", [
    (b"right", b"wrong"), (None, b"s"), (b"s", None),
])
def test_a_wrong_or_missing_secret_is_refused(dialer_secret, listener_secret):
    dialled, answered = run(handshake(me("a", dialer_secret), me("b", listener_secret)))
    assert isinstance(dialled, peers.Refused)
    assert isinstance(answered, peers.Refused)
    assert "secret" in str(dialled) + str(answered)


def test_another_cluster_and_another_version_are_refused_with_the_reason():
    dialled, _ = run(handshake(me("a", cluster="red"), me("b", cluster="blue")))
    assert isinstance(dialled, peers.Refused) and "cluster 'red'" in str(dialled)

    async def old_peer():
        async def on_accept(reader, writer):
            try:
                await peers.answer(reader, writer, me("b"))
            except peers.Refused:
                pass

        server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hello = wire.Hello(7, "a", 1, "a", "c", "m", "peer", os.urandom(16))
        writer.writelines(wire.encode(hello))
        decoder = wire.FrameDecoder()
        decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()
        server.close()
        return decoder.next_message()

    refusal = run(old_peer())
    assert isinstance(refusal, wire.Refuse) and "protocol version 7" in refusal.reason


def test_the_refusal_of_a_long_foreign_cluster_name_is_a_valid_frame():
    # The name (64 KiB, as much as a string field may hold) once went whole into our Refuse,
    # whose reason then broke wire.MAX_TEXT: the dialer saw a protocol error, not the reason.
    dialled, answered = run(handshake(me("a", cluster="x" * wire.MAX_TEXT), me("b")))
    assert isinstance(answered, peers.Refused) and len(str(answered)) < 200
    assert isinstance(dialled, peers.Refused) and str(dialled).startswith("the peer says: refused: cluster 'xxx")


def test_proofs_bind_the_machine_so_our_own_id_cannot_be_relayed_back():
    """A listener proving itself over bare node ids (no machine) is refused: a stranger
    claiming our id from another machine could otherwise relay our own proof to us."""

    async def bare_id_listener():
        async def on_accept(reader, writer):
            decoder = wire.FrameDecoder()
            decoder.feed(await reader.read(65536))
            hello = decoder.next_message()
            nonce = os.urandom(16)
            proof = wire.make_proof(b"s", nonce, hello.nonce, "b", hello.node, "listener")
            welcome = wire.Welcome(wire.PROTOCOL_VERSION, "b", 1, "b", "c", "machine-of-b", "peer", nonce, proof)
            writer.writelines(wire.encode(welcome))
            await reader.read(65536)

        server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(peers.Refused, match="secret"):
                await peers.dial("127.0.0.1", port, me("a", b"s"))
        finally:
            server.close()

    run(bare_id_listener())
