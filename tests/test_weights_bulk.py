"""Weights over bulk connections, on real sockets: handshaken bulk connections (loopback and a
shaped namespace cable), fetches from one and two peers, a cut cable, a corrupt peer, a peer
that lacks an object, failure, abandoning a fetch, and a server that refuses nonsense, serves
no file a model does not need, closes idle connections and caps how many it serves."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import netns
import pytest
from netns import Loop

from tbmesh.net import peers, wire
from tbmesh.testbed.tiny import WEIGHTS_FILE, make_tiny_model
from tbmesh.weights import bulk
from tbmesh.weights.bulk import FetchFailed, Peer, fetch
from tbmesh.weights.manifest import FileEntry, Manifest, ObjectRef, build_manifest
from tbmesh.weights.modeldir import read_layout
from tbmesh.weights.store import Local, Store

SMALL = {"layers": 3, "hidden": 128, "heads": 2, "kv_heads": 1}
CLIENT = peers.Me("client", 1, "client", "test", "machine-client")
EMPTY = Manifest("none", (), ())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def loop():
    the_loop = Loop()
    yield the_loop
    the_loop.close()


class Server:
    """A node that accepts bulk connections and serves `local` on them, as the daemon will."""

    def __init__(self, loop: Loop, local: Local, name: str, host: str = "127.0.0.1",
                 before_serving: float = 0.0, served: bulk.Served | None = None,
                 secret: bytes | None = None) -> None:
        self.me = peers.Me(name, 1, name, "test", f"machine-{name}", secret)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.host = host
        self.served = served  # with it, connections past its caps are refused

        async def accept(reader, writer):
            try:
                channel = await peers.answer(reader, writer, self.me)
            except peers.Refused:
                return
            await asyncio.sleep(before_serving)  # lets a first Fetch arrive before the detach
            if served is not None:
                await bulk.serve_or_refuse(channel, local, served, self.stop)
            else:
                self.threads.append(bulk.serve_channel(channel, local, self.stop))

        self.loop = loop
        self.server = loop.run(asyncio.start_server(accept, host, 0))
        self.port = self.server.sockets[0].getsockname()[1]

    def peer(self, client_loop: Loop, port: int | None = None, bandwidth: float = 0.0,
             has: Callable[[str], bool] = lambda digest: True, me: peers.Me = CLIENT) -> Peer:
        connect = bulk.connector(client_loop.loop, self.host, port or self.port, me)
        return Peer(self.me.node, self.me.name, connect, bandwidth, has)

    def close(self) -> None:
        self.stop.set()
        self.loop.run(self._close())
        for thread in self.threads:
            thread.join(5)
            assert not thread.is_alive()
        if self.served is not None:  # every connection's thread gave its place back
            deadline = time.monotonic() + 5
            while self.served.count() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert self.served.count() == 0

    async def _close(self) -> None:
        self.server.close()


class Proxy:
    """Forwards TCP connections to a local port. `cut`: the first one is cut (both sockets
    closed) once that many bytes have gone toward the client, a cable pulled mid-object;
    `rate`: bytes/s toward the client, at most (a slow link)."""

    def __init__(self, port: int, cut: int | None = None, rate: float | None = None) -> None:
        self.target, self.cut, self.rate = port, cut, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            limit = self.cut if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._pump, args=(upstream, client, limit, self.rate), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, None, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None, rate: float | None) -> None:
        sent, began = 0, time.monotonic()
        try:
            while data := src.recv(1 << 16):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
                if rate is not None:
                    time.sleep(max(0.0, began + sent / rate - time.monotonic()))
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Requests of 1 MiB (and a pipeline of 2), so that objects of a few MiB span several:
    the same proportions as the defaults' 16 and 32 MiB, with less to write."""
    monkeypatch.setattr(bulk, "CHUNK", 1 << 20)
    monkeypatch.setattr(bulk, "PIPELINE_BYTES", 2 << 20)
    return bulk.CHUNK


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tmp_path_factory) -> tuple[Path, Manifest]:
    root = make_tiny_model(tmp_path_factory.mktemp("bulk") / request.param, dtype=request.param, **SMALL)
    return root, build_manifest(root)


def check_blobs(store: Store, digests) -> None:
    for digest in digests:
        assert store.has(digest) and sha(store.path(digest).read_bytes()) == digest


def check_weights(store: Store, root: Path, manifest: Manifest) -> None:
    loaded = Local(manifest, None, store).lazy_weights(manifest.tensors)
    for name, array in mx.load(str(root / WEIGHTS_FILE)).items():
        assert loaded[name].dtype == array.dtype and mx.array_equal(loaded[name], array).item(), name


def wanted(manifest: Manifest):
    return [*manifest.files, *manifest.needed(0, 3, 3)]


# --- fetching a model ----------------------------------------------------------------------------


def test_a_fetch_from_one_peer_gives_verified_blobs_that_load_as_the_original(model, loop, tmp_path):
    root, manifest = model
    server = Server(loop, Local(manifest, root, Store(tmp_path / "server")), "one")
    store = Store(tmp_path / "client")
    progress: list[int] = []
    try:
        report = fetch(wanted(manifest), [server.peer(loop)], store, on_progress=progress.append)
    finally:
        server.close()
    objects = manifest.objects()
    assert store.digests() == set(objects)
    check_blobs(store, objects)
    check_weights(store, root, manifest)
    size = sum(e.object_size for e in objects.values())
    assert report.objects == len(objects) and report.bytes == size == report.bytes_by_peer["one"]
    assert (report.corrupt, report.stopped) == (0, False)
    assert progress == sorted(progress) and progress[-1] == size
    again = fetch(wanted(manifest), [server.peer(loop)], store)  # nothing left to fetch
    assert again.objects == 0 and again.bytes == 0


def test_with_a_secret_the_fetch_is_sealed_and_a_stranger_gets_nothing(model, loop, tmp_path, small_chunks,
                                                                        monkeypatch):
    """With a cluster secret a bulk connection is TLS like any other: objects larger than a
    sealed slice arrive whole and verified; a fetcher without the secret is refused."""
    root, manifest = model
    monkeypatch.setattr(bulk, "TLS_SLICE", 64 << 10)
    server = Server(loop, Local(manifest, root, Store(tmp_path / "server")), "one", secret=b"s3cret")
    member = peers.Me("client", 1, "client", "test", "machine-client", b"s3cret")
    try:
        store = Store(tmp_path / "client")
        report = fetch(wanted(manifest), [server.peer(loop, me=member)], store)
        assert report.objects == len({o.digest for o in wanted(manifest)}) and not report.corrupt
        assert max(o.object_size for o in wanted(manifest)) > bulk.TLS_SLICE  # several slices
        check_blobs(store, [o.digest for o in wanted(manifest)])
        check_weights(store, root, manifest)
        with pytest.raises(FetchFailed, match="secret"):
            fetch(wanted(manifest), [server.peer(loop)], Store(tmp_path / "stranger"))
    finally:
        server.close()


def test_the_manifest_itself_is_fetched_by_digest(model, loop, tmp_path):
    root, manifest = model
    server = Server(loop, Local(manifest, root, Store(tmp_path / "server")), "one")
    store = Store(tmp_path / "client")
    try:
        fetch([ObjectRef(manifest.digest, len(manifest.to_bytes()))], [server.peer(loop)], store)
    finally:
        server.close()
    assert Manifest.from_bytes(store.path(manifest.digest).read_bytes()) == manifest


def test_two_peers_share_the_objects_and_one_big_object(loop, tmp_path, small_chunks):
    big = os.urandom(3 * bulk.CHUNK + 12345)
    servers = []
    for name in ("a", "b"):
        store = Store(tmp_path / name)
        store.put(big)
        servers.append(Server(loop, Local(EMPTY, None, store), name))
    client = Store(tmp_path / "client")
    try:
        report = fetch([ObjectRef(sha(big), len(big))], [s.peer(loop) for s in servers], client)
    finally:
        for server in servers:
            server.close()
    assert client.path(sha(big)).read_bytes() == big
    assert report.bytes == len(big) and all(report.bytes_by_peer[n] > 0 for n in "ab")


def test_a_faster_link_takes_more(loop, tmp_path, small_chunks):
    big = os.urandom(8 * bulk.CHUNK)
    servers = []
    for name in ("fast", "slow"):
        store = Store(tmp_path / name)
        store.put(big)
        servers.append(Server(loop, Local(EMPTY, None, store), name))
    fast, slow = servers
    client = Store(tmp_path / "client")
    try:  # a 40 Gbit/s and a 4 Gbit/s link, as their probes measured them
        report = fetch([ObjectRef(sha(big), len(big))], [slow.peer(loop, bandwidth=5e8), fast.peer(loop, bandwidth=5e9)],
                       client)
    finally:
        for server in servers:
            server.close()
    assert client.path(sha(big)).read_bytes() == big
    # The slow link's 1 MiB would take 2.1 ms; the fast one moves all 8 MiB in 1.7 ms.
    assert report.bytes_by_peer["fast"] == len(big) and report.bytes_by_peer.get("slow", 0) == 0


def test_parallel_limits_the_peers_used_and_a_spare_one_steps_in(model, loop, tmp_path):
    root, manifest = model
    servers = [Server(loop, Local(manifest, root, Store(tmp_path / n)), n) for n in ("empty", "full")]
    store = Store(tmp_path / "client")
    try:  # the fastest peer comes first but holds nothing: the spare one is started for it
        report = fetch(wanted(manifest), [servers[1].peer(loop, bandwidth=1e8),
                                          servers[0].peer(loop, bandwidth=1e9, has=lambda d: False)],
                       store, parallel=1)
    finally:
        for server in servers:
            server.close()
    check_blobs(store, manifest.objects())
    assert report.bytes_by_peer == {"empty": 0, "full": report.bytes}


def test_a_fetch_from_two_peers_gives_the_same_blobs(model, loop, tmp_path):
    root, manifest = model
    servers = [Server(loop, Local(manifest, root, Store(tmp_path / n)), n) for n in "ab"]
    store = Store(tmp_path / "client")
    try:
        report = fetch(wanted(manifest), [s.peer(loop) for s in servers], store)
    finally:
        for server in servers:
            server.close()
    check_blobs(store, manifest.objects())
    check_weights(store, root, manifest)
    assert report.objects == len(manifest.objects()) and set(report.bytes_by_peer) == {"a", "b"}


def test_a_cable_cut_mid_object_resumes_where_it_stopped(loop, tmp_path, small_chunks):
    big = os.urandom(3 * bulk.CHUNK)
    store = Store(tmp_path / "server")
    store.put(big)
    server = Server(loop, Local(EMPTY, None, store), "s")
    proxy = Proxy(server.port, cut=bulk.CHUNK + 777)
    client = Store(tmp_path / "client")
    try:
        report = fetch([ObjectRef(sha(big), len(big))], [server.peer(loop, port=proxy.port)], client, connections=1)
    finally:
        proxy.close()
        server.close()
    assert client.path(sha(big)).read_bytes() == big
    assert proxy.connections == 2 and report.retries >= 1  # the one cut, and the one that resumed
    assert report.bytes == len(big)  # what arrived before the cut was kept, not fetched again


def test_several_connections_to_one_peer_share_its_objects_and_fetch_no_byte_twice(loop, tmp_path, small_chunks):
    blobs = [os.urandom(2 * bulk.CHUNK + i) for i in range(4)]
    store = Store(tmp_path / "server")
    for blob in blobs:
        store.put(blob)
    server = Server(loop, Local(EMPTY, None, store), "s")
    proxy = Proxy(server.port, rate=8 * bulk.CHUNK)  # slow enough that both connections get work
    client = Store(tmp_path / "client")
    try:
        report = fetch([ObjectRef(sha(b), len(b)) for b in blobs], [server.peer(loop, port=proxy.port)], client,
                       connections=2)
    finally:
        proxy.close()
        server.close()
    assert proxy.connections == 2 and report.retries == 0
    assert report.bytes == sum(map(len, blobs)) and report.objects == len(blobs)  # no byte fetched twice
    assert all(client.path(sha(b)).read_bytes() == b for b in blobs)


def _corrupt_copy(root: Path, dest: Path) -> Path:
    """The model with one byte of every tensor's data flipped (headers intact)."""
    shutil.copytree(root, dest)
    data = bytearray((dest / WEIGHTS_FILE).read_bytes())
    for slot in read_layout(dest / WEIGHTS_FILE).values():
        data[(slot.start + slot.end) // 2] ^= 0xFF
    (dest / WEIGHTS_FILE).write_bytes(data)
    return dest


def test_a_peer_that_serves_corrupt_bytes_is_caught_and_avoided(model, loop, tmp_path):
    root, manifest = model
    bad_dir = _corrupt_copy(root, tmp_path / "bad-model")
    bad = Server(loop, Local(manifest, bad_dir, Store(tmp_path / "bad")), "bad")
    good = Server(loop, Local(manifest, root, Store(tmp_path / "good")), "good")
    store = Store(tmp_path / "client")
    try:
        report = fetch(wanted(manifest), [bad.peer(loop), good.peer(loop)], store)
    finally:
        bad.close()
        good.close()
    check_blobs(store, manifest.objects())
    check_weights(store, root, manifest)
    assert report.corrupt >= 1 and report.retries >= report.corrupt
    assert report.objects == len(manifest.objects())


def test_a_peer_that_lacks_an_object_says_so_and_another_serves_it(model, loop, tmp_path):
    root, manifest = model
    partial_store = Store(tmp_path / "partial")
    full = Local(manifest, root, Store(tmp_path / "scratch"))
    tensors = manifest.needed(0, 3, 3)
    for entry in tensors[::2]:  # every other tensor only
        source = full.locate(entry.digest)
        with source.path.open("rb") as f:
            f.seek(source.offset)
            partial_store.put(source.prefix + f.read(source.length))
    lacking = Server(loop, Local(manifest, None, partial_store), "lacking")
    complete = Server(loop, Local(manifest, root, Store(tmp_path / "full")), "full")
    store = Store(tmp_path / "client")
    try:  # the lacking peer is faster and claims to hold everything
        report = fetch(tensors, [lacking.peer(loop, bandwidth=1e10), complete.peer(loop, bandwidth=1e8)], store)
    finally:
        lacking.close()
        complete.close()
    check_blobs(store, {t.digest for t in tensors})
    assert report.retries >= 1 and report.bytes_by_peer["full"] > 0


def test_when_no_peer_has_an_object_the_fetch_fails_in_one_line(model, loop, tmp_path):
    root, manifest = model
    server = Server(loop, Local(manifest, root, Store(tmp_path / "server")), "s")
    store = Store(tmp_path / "client")
    first = manifest.needed(0, 3, 3)[0]
    try:
        with pytest.raises(FetchFailed) as caught:
            fetch(manifest.needed(0, 3, 3), [server.peer(loop, has=lambda d: d != first.digest)], store)
    finally:
        server.close()
    message = str(caught.value)
    assert message.startswith("1 objects (") and first.digest[:12] in message and "\n" not in message


def test_when_every_peer_is_unreachable_the_fetch_fails_in_one_line(model, loop, tmp_path):
    _root, manifest = model
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    dead = Peer("dead", "dead Mac", bulk.connector(loop.loop, "127.0.0.1", port, CLIENT))
    started = time.monotonic()
    with pytest.raises(FetchFailed) as caught:
        fetch(manifest.needed(0, 3, 3), [dead], Store(tmp_path / "client"))
    message = str(caught.value)
    assert "have no peer left" in message and "dead Mac (cannot connect" in message and "\n" not in message
    assert time.monotonic() - started < sum(bulk.BACKOFF) + 5


def test_should_stop_abandons_promptly_and_keeps_the_partial(loop, tmp_path, small_chunks):
    big = os.urandom(16 * bulk.CHUNK)
    store = Store(tmp_path / "server")
    store.put(big)
    server = Server(loop, Local(EMPTY, None, store), "s")
    proxy = Proxy(server.port, rate=20e6)  # 0.8 s for the object: it is stopped well before its end
    client = Store(tmp_path / "client")
    stop_at: list[float] = []

    def progress(total: int) -> None:
        if total >= 2 * bulk.CHUNK and not stop_at:
            stop_at.append(time.monotonic())

    try:
        report = fetch([ObjectRef(sha(big), len(big))], [server.peer(loop, port=proxy.port)], client,
                       on_progress=progress, should_stop=lambda: bool(stop_at))
        returned = time.monotonic()
        kept = client.partial_size(sha(big))
        assert report.stopped and report.objects == 0 and not client.has(sha(big))
        assert returned - stop_at[0] < 3 * bulk.POLL + 0.5
        assert 2 * bulk.CHUNK <= kept < len(big)
        rest = fetch([ObjectRef(sha(big), len(big))], [server.peer(loop)], client)
    finally:
        proxy.close()
        server.close()
    assert client.path(sha(big)).read_bytes() == big
    assert rest.bytes <= len(big) - kept + bulk.CHUNK  # resumed, not started again


# --- the bulk connection: detached from asyncio ---------------------------------------------------


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])  # the daemon runs on uvloop when it can
def test_detach_hands_over_the_socket_and_the_bytes_read_past_the_handshake(kind):
    loop = Loop(kind=kind)
    server_me = peers.Me("server", 1, "server", "test", "machine-server")
    fetch_frame = b"".join(wire.encode(wire.Fetch("ab" * 32, 5, 6)))
    detached: asyncio.Future = loop.loop.create_future()

    async def accept(reader, writer):
        channel = await peers.answer(reader, writer, server_me)
        await asyncio.sleep(0.2)  # the dialer's first bytes arrive while asyncio still reads
        detached.set_result(channel.detach())
        assert channel.closed and channel.close_reason == "detached"

    async def dial(port):
        channel = await peers.dial("127.0.0.1", port, CLIENT, "bulk")
        channel.writer.write(fetch_frame + b"\x00\x00tail")  # a frame, then the start of another
        await channel.drain()
        return channel.detach()

    async def detached_result():
        return await detached

    try:
        server = loop.run(asyncio.start_server(accept, "127.0.0.1", 0))
        ours = loop.run(dial(server.sockets[0].getsockname()[1]))
        theirs = loop.run(detached_result())
        (client, client_leftover), (sock, leftover) = (ours.sock, ours.leftover), (theirs.sock, theirs.leftover)
        assert ours.tls is None and theirs.tls is None  # no secret: plain TCP
        assert client_leftover == b"" and leftover == fetch_frame + b"\x00\x00tail"
        assert sock.getblocking() and client.getblocking()
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(10)  # asyncio let go of its end without closing the connection
        sock.sendall(b"hello")
        assert client.recv(10) == b"hello"
        sock.close()
        assert client.recv(10) == b""
        client.close()
        loop.run(_close_server(server))
    finally:
        loop.close()


async def _close_server(server) -> None:
    server.close()


# --- the server --------------------------------------------------------------------------------


def _raw_client(loop: Loop, server: Server) -> tuple[socket.socket, bytes]:
    async def dial():
        channel = await peers.dial(server.host, server.port, CLIENT, "bulk")
        channel.send(wire.Fetch("0" * 64, 0, 1))  # right after the handshake: read before the detach
        await channel.drain()
        return channel.detach()

    conn = loop.run(dial())
    return conn.sock, conn.leftover


def _read_part(sock: socket.socket) -> wire.Part:
    decoder = wire.FrameDecoder()
    while (message := decoder.next_message()) is None:
        data = sock.recv(1 << 16)
        assert data, "the server closed the connection"
        decoder.feed(data)
    return message


def test_the_server_answers_bad_requests_and_closes_on_nonsense(loop, tmp_path):
    blob = os.urandom(1000)
    store = Store(tmp_path / "server")
    store.put(blob)
    server = Server(loop, Local(EMPTY, None, store), "s", before_serving=0.3)
    sock, leftover = _raw_client(loop, server)
    try:
        assert leftover == b""
        sock.settimeout(5)
        assert _read_part(sock) == wire.Part("0" * 64, 0, 0, "unknown object")
        sock.sendall(b"".join(wire.encode(wire.Fetch(sha(blob), 900, 101))))
        assert _read_part(sock) == wire.Part(sha(blob), 900, 0, "bytes [900, 1001) are past its 1000")
        sock.sendall(b"".join(wire.encode(wire.Fetch(sha(blob), 990, 10))))
        assert _read_part(sock) == wire.Part(sha(blob), 990, 10, "", blob[990:])
        sock.sendall(b"".join(wire.encode(wire.Part(sha(blob), 0, 0))))  # not a request
        assert sock.recv(100) == b""  # closed
    finally:
        sock.close()
        server.close()
    assert all(not t.is_alive() for t in server.threads)


def test_a_stopped_server_lets_go_of_its_connections(loop, tmp_path):
    server = Server(loop, Local(EMPTY, None, Store(tmp_path)), "s")
    sock, _ = _raw_client(loop, server)
    try:
        sock.settimeout(5)
        assert _read_part(sock).error == "unknown object"
        started = time.monotonic()
        server.close()  # joins the serving thread, idle in its wait for a request
        assert time.monotonic() - started < 3 * bulk.POLL + 0.5
        assert sock.recv(100) == b""
    finally:
        sock.close()


def _fetch_frame(digest: str, offset: int = 0, length: int = 1) -> bytes:
    return b"".join(wire.encode(wire.Fetch(digest, offset, length)))


@pytest.fixture
def model_with_secrets(tmp_path) -> Path:
    """A model directory that also holds what no peer should read."""
    root = make_tiny_model(tmp_path / "secrets-model", **SMALL)
    (root / "credentials.txt").write_text("aws_secret_access_key = hunter2\n")
    (root / "README.md").write_text("my notes\n")
    (root / "tokenization_evil.py").write_text("import os\n")
    return root


def test_only_the_files_a_model_needs_are_listed_and_served(model_with_secrets, loop, tmp_path, caplog):
    root = model_with_secrets
    manifest = build_manifest(root)
    assert {f.name for f in manifest.files} == {"config.json", "tokenizer.json", "tokenizer_config.json",
                                                "special_tokens_map.json"}
    secret = (root / "credentials.txt").read_bytes()
    server = Server(loop, Local(manifest, root, Store(tmp_path / "server")), "s", before_serving=0.3)
    config = next(f for f in manifest.files if f.name == "config.json")
    sock, _ = _raw_client(loop, server)
    try:
        sock.settimeout(5)
        assert _read_part(sock).error == "unknown object"  # _raw_client's first request
        sock.sendall(_fetch_frame(sha(secret), 0, len(secret)))
        assert _read_part(sock) == wire.Part(sha(secret), 0, 0, "unknown object")
        sock.sendall(_fetch_frame(config.digest, 0, config.nbytes))  # what a model needs still is
        assert _read_part(sock).data == (root / "config.json").read_bytes()
        sock.sendall(_fetch_frame(manifest.digest, 0, len(manifest.to_bytes())))
        assert _read_part(sock).data == manifest.to_bytes()
        # path tricks are no digest: the connection is closed
        sock.sendall(_fetch_frame("../credentials.txt"))
        assert sock.recv(100) == b""
    finally:
        sock.close()
        server.close()


def test_a_manifest_listing_another_file_does_not_get_it_served(model_with_secrets, loop, tmp_path, caplog):
    """A manifest made before the files were chosen (cached in a state directory), or by hand:
    its other files are refused by name, even when the store holds a copy, and logged once."""
    root = model_with_secrets
    secret = (root / "credentials.txt").read_bytes()
    built = build_manifest(root)
    old = Manifest(built.name, (*built.files, FileEntry("credentials.txt", len(secret), sha(secret))), built.tensors)
    store = Store(tmp_path / "server")
    store.put(secret)  # taken from a peer by an older version
    local = Local(old, root, store)
    assert local.locate(sha(secret)) is None and local.locate(built.files[0].digest) is not None
    server = Server(loop, local, "s", before_serving=0.3)
    sock, _ = _raw_client(loop, server)
    try:
        sock.settimeout(5)
        _read_part(sock)
        caplog.set_level(logging.INFO, logger=bulk.__name__)
        for _ in range(3):
            sock.sendall(_fetch_frame(sha(secret), 0, len(secret)))
            assert _read_part(sock) == wire.Part(sha(secret), 0, 0,
                                                 "not served: 'credentials.txt' is not a file a model needs")
    finally:
        sock.close()
        server.close()
    lines = [r for r in caplog.records if r.name == bulk.__name__ and "refused" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, [r.getMessage() for r in lines]
    assert "refused 4 requests from client" in lines[0].getMessage()


def test_a_connection_that_asks_nothing_is_closed_after_the_request_timeout(loop, tmp_path, monkeypatch):
    assert bulk.REQUEST_TIMEOUT <= bulk.IDLE_TIMEOUT  # no longer than a fetcher waits for bytes itself
    monkeypatch.setattr(bulk, "REQUEST_TIMEOUT", 0.5)
    server = Server(loop, Local(EMPTY, None, Store(tmp_path)), "s")

    async def dial():
        return (await peers.dial(server.host, server.port, CLIENT, "bulk")).detach().sock

    sock = loop.run(dial())
    try:
        sock.settimeout(10)
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server, having asked nothing
        assert 0.4 < time.monotonic() - started < 0.5 + 3 * bulk.POLL + 0.5
    finally:
        sock.close()
        server.close()


def _bulk_dial(loop: Loop, server: Server, node: str) -> tuple[socket.socket, bytes]:
    me = peers.Me(node, 1, node, "test", f"machine-{node}")

    async def dial():
        return (await peers.dial(server.host, server.port, me, "bulk")).detach()

    conn = loop.run(dial())
    conn.sock.settimeout(1.0)  # a refusal is sent right after the handshake
    return conn.sock, conn.leftover


def _refusal(sock: socket.socket, leftover: bytes) -> str | None:
    """The reason of the Refuse the server sent at once, or None when it serves the connection."""
    decoder = wire.FrameDecoder()
    decoder.feed(leftover)
    try:
        while (message := decoder.next_message()) is None:
            data = sock.recv(1 << 16)
            if not data:
                return "closed without a reason"
            decoder.feed(data)
    except TimeoutError:
        return None
    assert type(message) is wire.Refuse
    return message.reason


def test_connections_past_a_cap_are_refused_at_once_saying_why(loop, tmp_path):
    server = Server(loop, Local(EMPTY, None, Store(tmp_path)), "s", served=bulk.Served(per_peer=2, total=3))
    held = []
    try:
        for node in ("a", "a"):
            held.append(_bulk_dial(loop, server, node))
        third = _bulk_dial(loop, server, "a")
        assert _refusal(*third) == "refused: 2 bulk connections from you are served already"
        assert third[0].recv(100) == b""  # then closed
        held.append(_bulk_dial(loop, server, "b"))
        other = _bulk_dial(loop, server, "c")
        assert _refusal(*other) == "refused: this node serves 3 bulk connections already; try again later"
        assert _refusal(*held[0]) is None  # still served
        assert server.served.by_peer == {"a": 2, "b": 1}
        held.pop(0)[0].close()  # a place is given back once the server sees it close
        deadline = time.monotonic() + 5
        while server.served.count() != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        held.append(_bulk_dial(loop, server, "a"))
        assert _refusal(*held[-1]) is None and server.served.by_peer == {"a": 2, "b": 1}
    finally:
        for sock, _ in held:
            sock.close()
        server.close()


def test_a_fetcher_refused_for_want_of_room_says_so(loop, tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "BACKOFF", (0.01,))
    blob = os.urandom(1000)
    store = Store(tmp_path / "server")
    store.put(blob)
    server = Server(loop, Local(EMPTY, None, store), "full", served=bulk.Served(per_peer=4, total=0))
    try:
        with pytest.raises(FetchFailed, match="refused: this node serves 0 bulk connections already"):
            fetch([ObjectRef(sha(blob), len(blob))], [server.peer(loop)], Store(tmp_path / "client"), connections=1)
    finally:
        server.close()


# --- across a shaped cable -------------------------------------------------------------------------


@pytest.mark.needs_root
def test_a_fetch_across_a_shaped_cable_leaves_room_for_the_control_connection(lab: netns.Lab, tmp_path):
    a, b = lab.add_mac("a"), lab.add_mac("b")
    cable = lab.cable(a, b, rate="1gbit")
    big = os.urandom(4 * bulk.CHUNK)  # ~0.55 s at 1 Gbit/s
    store = Store(tmp_path / "server")
    store.put(big)
    server_loop, client_loop = Loop(b.netns), Loop(a.netns)
    server = Server(server_loop, Local(EMPTY, None, store), "b", host=cable.addr(b))
    # A second connection on the same cable: the control connection's small messages.
    idle: list[float] = []
    busy: list[float] = []
    stop = threading.Event()
    client = Store(tmp_path / "client")
    try:
        pinger = threading.Thread(target=netns.control_pings, args=(a, b, cable.addr(b), stop, idle))
        pinger.start()
        time.sleep(0.3)
        stop.set()
        pinger.join()
        stop.clear()
        pinger = threading.Thread(target=netns.control_pings, args=(a, b, cable.addr(b), stop, busy))
        pinger.start()
        report = fetch([ObjectRef(sha(big), len(big))], [server.peer(client_loop)], client)
        stop.set()
        pinger.join()
    finally:
        stop.set()
        server.close()
        server_loop.close()
        client_loop.close()
    assert client.path(sha(big)).read_bytes() == big
    rate = report.bytes / report.seconds * 8 / 1e9
    print(f"\n{rate:.3f} Gbit/s; control round trips idle median {statistics.median(idle) * 1e3:.2f} ms, "
          f"during the fetch median {statistics.median(busy) * 1e3:.2f} ms, max {max(busy) * 1e3:.2f} ms "
          f"({len(busy)} round trips)")
    assert 0.5 < rate < 1.0  # through the 1 Gbit/s cable, and not around it
    assert statistics.median(busy) < 0.050 and len(busy) >= 10
