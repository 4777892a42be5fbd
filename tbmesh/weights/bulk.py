"""Weight objects over bulk connections: a server that sends them with os.sendfile, and a
fetcher that takes them from several peers at once into the store.

A bulk connection is a TCP connection of its own (handshaken like any other, purpose
"bulk"), apart from the control connection, so heartbeats and tokens never wait behind a
tensor in a socket buffer. After the handshake each side takes the socket out of asyncio
(`peers.Channel.detach`) and runs it in a thread with blocking calls:

    fetcher -> server   Fetch(digest, offset, length)       (several may be in flight)
    server -> fetcher   Part(digest, offset, n) + n bytes   (n <= wire.MAX_PART), in order,
                        until the Fetch's range is sent; or one Part(error=...) with no bytes

The server writes each Part's head, then the object's bytes with os.sendfile straight from
the file (a tensor inside an original safetensors file is its synthesized header, then
sendfile of its data), or from memory for a tensor only a shard it holds still has
(tbmesh.weights.memory). The fetcher reads the head itself (wire.parse_prefix, parse_header)
and receives the bytes into one reused buffer that goes straight to the partial object
(`store.Partial.write`), which hashes them as they arrive in order.

Blocked calls wake up every POLL seconds (SO_RCVTIMEO/SO_SNDTIMEO) to look at their stop
signal, so a daemon that abandons a fetch or stops serving is obeyed within that time.

What a server spends is bounded: it serves the objects of its manifest and the small files a
model needs (manifest.MODEL_FILES), nothing else of the model directory; a connection waits
REQUEST_TIMEOUT for a request before it is closed; and it serves at most MAX_PER_PEER
connections to one peer and MAX_SERVED in all (`Served`), refusing more at once with a
Refuse that says why (`serve_or_refuse`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from tbmesh.net import peers, wire
from tbmesh.weights.store import CorruptObject, Local, Partial, Source, Store

log = logging.getLogger(__name__)

POLL = 0.2  # s: how often a blocked send or receive looks at its stop signal
TLS_SLICE = 1 << 20  # bytes read from the socket, or from a file, and sealed or opened at a time
IDLE_TIMEOUT = 10.0  # s without a byte moving, mid-request, before a connection is given up (a pulled
                     # cable sends no reset: its requests go to another peer after this long)
REQUEST_TIMEOUT = 10.0  # s a server waits for a Fetch (the first or the next) before it closes the
# connection. A fetcher sends its first right after the handshake and tops its pipeline up as
# Parts arrive; with nothing left in flight it lingers LINGER (1 s) and closes the connection
# itself. So silence this long, the fetcher's own IDLE_TIMEOUT, means it is gone or stuck.
MAX_HEAD = 4096  # bytes of a Fetch or Part header (they take ~100)
CHUNK = 16 << 20  # bytes per request: objects above this are split, so peers can share one
PIPELINE_BYTES = 32 << 20  # requested and not yet received, per connection: the link never idles
MAX_PIPELINE = 64  # requests in flight per connection (small objects: one round trip for many)
LINGER = 1.0  # s an idle connection waits for more work (a failed peer's) before it is closed
MAX_CONNECTIONS = 4  # bulk connections a fetcher opens to one peer, at most
CONNECTIONS = max(1, min(MAX_CONNECTIONS, os.cpu_count() or 1))  # per peer: each hashes on a core of
# its own (one sha256 stream caps near 16 Gbit/s on a Mac core; Thunderbolt 5 carries 80)
MAX_PER_PEER = MAX_CONNECTIONS + 2  # connections served to one peer at once: its fetcher's, and room
# for those it opens again while we have not yet seen the old ones close
MAX_SERVED = 64  # connections served at once in all: each a thread, a socket and up to _Files.KEEP
# open files (16 peers' fetchers, or a few peers' with room for their copies)
REFUSE_LINGER = 0.5  # s a refused connection is read (and dropped) before it is closed: closing with
# the fetcher's first requests unread would reset it, the Refuse lost
RECV_BUFFER = 1 << 20  # received bytes gathered before each write to the partial
WRITE_BUFFERS = 3  # buffers in rotation: receiving into one while others are written and hashed
RECONNECTS = 3  # failed connections in a row before a peer is dropped from a fetch
BACKOFF = (0.2, 1.0, 3.0)  # s before each reconnection
SCAN = 4096  # queued requests a peer looks through for one it can serve
MEASURED_AFTER = 64 << 20  # bytes from a peer with no probe figure before its measured rate counts
NOMINAL_BANDWIDTH = 1e9  # bytes/s assumed for a peer nobody has measured


# --- a blocking socket that can be stopped ---------------------------------------------------


class Stopped(Exception):
    """The stop signal was raised while waiting on the connection."""


class _Stream:
    """A blocking connection whose calls give up after POLL s to check `stopped`: its socket,
    the plaintext read past its handshake (`leftover`, served first), and its TLS session
    with a cluster secret (then every byte is sealed: no sendfile, the file is read and sealed
    a slice at a time)."""

    def __init__(self, conn: peers.Detached, stopped: Callable[[], bool]) -> None:
        self.sock = sock = conn.sock
        self.leftover = memoryview(conn.leftover)
        self.tls = conn.tls
        self.stopped = stopped
        sock.setblocking(True)
        timeval = struct.pack("ll", int(POLL), int(POLL % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.more = getattr(socket, "MSG_MORE", 0)  # Linux: hold a Part's head for its bytes
        self._sealed_in = bytearray(TLS_SLICE) if self.tls is not None else None

    def _waited(self, since: float, limit: float) -> None:
        if self.stopped():
            raise Stopped()
        if time.monotonic() - since > limit:
            raise TimeoutError(f"nothing moved on the connection for {limit:.0f} s")

    def read_into(self, view: memoryview, limit: float = IDLE_TIMEOUT) -> int:
        """Read at least one byte into `view`; ConnectionError at the peer's end of stream."""
        if self.leftover.nbytes:
            n = min(view.nbytes, self.leftover.nbytes)
            view[:n] = self.leftover[:n]
            self.leftover = self.leftover[n:]
            return n
        if self.tls is None:
            return self._recv_into(view, limit)
        assert self._sealed_in is not None
        while not (n := self.tls.read_into(view)):
            if self.tls.ended:
                raise ConnectionError("closed by the peer")
            got = self._recv_into(memoryview(self._sealed_in), limit)
            self.tls.feed(memoryview(self._sealed_in)[:got])
        return n

    def _recv_into(self, view: memoryview, limit: float) -> int:
        since = time.monotonic()
        while True:
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                self._waited(since, limit)
                continue
            if not n:
                raise ConnectionError("closed by the peer")
            return n

    def read_exact(self, n: int, limit: float = IDLE_TIMEOUT) -> bytes:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            got += self.read_into(view[got:], limit if not got else IDLE_TIMEOUT)
        return bytes(buffer)

    def read_message(self, max_payload: int, limit: float = IDLE_TIMEOUT) -> Any:
        """The next frame's message; its payload (a Part's bytes) is left for the caller."""
        prefix = self.read_exact(wire.PREFIX.size, limit)
        header_len, payload_len = wire.parse_prefix(prefix, 0, MAX_HEAD, max_payload)
        return wire.parse_header(self.read_exact(header_len), payload_len)

    def write(self, data: bytes | memoryview, flags: int = 0) -> None:
        if self.tls is None:
            self._send(memoryview(data), flags)
            return
        for sealed in self.tls.seal([data]):
            self._send(memoryview(sealed), 0)

    def _send(self, view: memoryview, flags: int) -> None:
        since = time.monotonic()
        while view.nbytes:
            try:
                view = view[self.sock.send(view, flags):]
                since = time.monotonic()
            except (BlockingIOError, InterruptedError):
                self._waited(since, IDLE_TIMEOUT)

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        if self.tls is not None:
            self._seal_file(fd, offset, count)
            return
        since = time.monotonic()
        while count:
            try:
                sent = os.sendfile(self.sock.fileno(), fd, offset, count)
            except (BlockingIOError, InterruptedError):
                self._waited(since, IDLE_TIMEOUT)
                continue
            if not sent:
                raise OSError(f"the file ends {count} bytes short of the object")
            offset, count, since = offset + sent, count - sent, time.monotonic()

    def _seal_file(self, fd: int, offset: int, count: int) -> None:
        buffer = bytearray(min(count, TLS_SLICE))
        while count:
            got = os.preadv(fd, [memoryview(buffer)[:min(count, TLS_SLICE)]], offset)
            if not got:
                raise OSError(f"the file ends {count} bytes short of the object")
            self.write(memoryview(buffer)[:got])
            offset, count = offset + got, count - got


# --- serving ---------------------------------------------------------------------------------


def serve(conn: peers.Detached, local: Local, stop: threading.Event | None = None,
          peer: str = "a peer") -> None:
    """Answer Fetch requests on a handshaken bulk connection until the peer closes it, it
    breaks the protocol, it asks nothing for REQUEST_TIMEOUT, or `stop` is set; then close
    the socket. Requests refused are logged once, when it closes. Blocking: run it in a
    thread of its own. Never raises."""
    stream = _Stream(conn, stop.is_set if stop is not None else lambda: False)
    files = _Files()
    refused: list[str] = []  # why each refused request was
    try:
        while True:
            request = stream.read_message(0, REQUEST_TIMEOUT)
            if type(request) is not wire.Fetch:
                raise wire.ProtocolError(f"expected a fetch, got a {wire.TAGS[type(request)]}")
            why = _answer(stream, request, local, files)
            if why is not None:
                refused.append(f"{request.digest[:12]}: {why}")
    except (ConnectionError, Stopped):
        pass
    except (wire.ProtocolError, OSError, TimeoutError) as error:
        log.info("bulk connection from %s closed: %s", peer, error)
    except Exception:  # a bug here must not take the daemon down
        log.exception("bulk connection failed")
    finally:
        files.close()
        conn.sock.close()
        if refused:  # "not served" is someone asking for a file no model needs: say so louder
            level = logging.WARNING if any("not served" in why for why in refused) else logging.INFO
            log.log(level, "bulk: refused %d requests from %s (%s)", len(refused), peer,
                    "; ".join(refused[:3]) + ("; ..." if len(refused) > 3 else ""))


def _answer(stream: _Stream, request: wire.Fetch, local: Local, files: _Files) -> str | None:
    """Send what `request` asks for; or refuse it with one Part that says why, returned."""
    source = local.locate(request.digest)
    end = request.offset + request.length
    if source is None or end > source.size:
        why = local.refusal(request.digest) if source is None else f"bytes [{request.offset}, {end}) are past its {source.size}"
        stream.write(wire.encode_head(wire.Part(request.digest, request.offset, 0, why)))
        return why
    offset = request.offset
    while True:
        if stream.stopped():
            raise Stopped()
        n = min(end - offset, wire.MAX_PART)
        stream.write(wire.encode_head(wire.Part(request.digest, offset, n)), stream.more if n else 0)
        _send_range(stream, source, offset, offset + n, files)
        offset += n
        if offset == end:
            return None


def _send_range(stream: _Stream, source: Source, start: int, end: int, files: _Files) -> None:
    """Bytes [start, end) of the object: the part of its prefix, then sendfile from its file
    (or a write from memory)."""
    head = len(source.prefix)
    if start < head:
        stream.write(source.prefix[start:min(end, head)], stream.more if end > head else 0)
    if end > head:
        first = max(start, head) - head
        if source.data is not None:
            stream.write(source.data[source.offset + first:source.offset + end - head])
        else:
            stream.sendfile(files.open(source.path), source.offset + first, end - max(start, head))


class _Files:
    """The files a connection sends from, kept open while it sends from the same few."""

    KEEP = 8

    def __init__(self) -> None:
        self.fds: dict[Any, int] = {}

    def open(self, path: Any) -> int:
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.fds) >= self.KEEP:
                os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[path] = fd  # most recently used last
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# --- fetching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A node to fetch from. `connect` (blocking) returns a handshaken bulk connection;
    `bandwidth` is the link probe's bytes/s (0: unknown);
    `has(digest)` whether it holds an object."""

    node: str
    name: str
    connect: Callable[[], peers.Detached]
    bandwidth: float = 0.0
    has: Callable[[str], bool] = lambda digest: True


class Wanted(Protocol):
    """What `fetch` needs of an entry (TensorEntry, FileEntry, ObjectRef)."""

    @property
    def digest(self) -> str: ...

    @property
    def object_size(self) -> int: ...


class FetchFailed(Exception):
    """Some objects have no peer left to fetch them from; one line says which and why."""


@dataclass
class FetchReport:
    bytes_by_peer: dict[str, int]  # node -> bytes received from it and written
    seconds: float
    objects: int  # objects fetched and verified
    retries: int  # requests sent again after a broken connection, a refusal or a corrupt object
    corrupt: int  # objects whose bytes did not hash to their name (fetched again)
    stopped: bool = False  # should_stop() ended it early; partials are kept

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_peer.values())


@dataclass(eq=False)
class _Object:
    digest: str
    size: int
    index: int  # its place in the wanted order
    tasks_left: int = 0  # requests queued or in flight
    partial: Partial | None = None
    avoid: set[str] = field(default_factory=set)  # peers that lack it or served it corrupt
    contributors: set[str] = field(default_factory=set)
    whole: bool = False  # fetch in one request from one peer (a corrupt object from several)


@dataclass(eq=False)
class _Task:
    obj: _Object
    offset: int  # advances as bytes arrive
    end: int
    sent: bool = False  # its Fetch went out on the current connection

    @property
    def key(self) -> tuple[int, int]:
        return self.obj.index, self.offset

    @property
    def length(self) -> int:
        return self.end - self.offset


@dataclass(eq=False)
class _Worker:
    peer: Peer
    lane: int = 0  # which of the peer's CONNECTIONS
    inflight: deque[_Task] = field(default_factory=deque)
    received: int = 0
    busy_seconds: float = 0.0
    error: str = ""
    alive: bool = True
    failing: bool = False  # its last connection failed and no bytes came since
    thread: threading.Thread | None = None

    def inflight_bytes(self) -> int:
        return sum(t.length for t in self.inflight)


def fetch(wanted: Sequence[Wanted], peers: Sequence[Peer], store: Store,
          on_progress: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None,
          parallel: int | None = None, connections: int = CONNECTIONS) -> FetchReport:
    """Fetch every object of `wanted` that `store` lacks from `peers`, into `store`.

    Blocking (run it in a thread). Objects are requested in the order given (the loader's:
    layer by layer), from every peer at once, `connections` each, with requests pipelined;
    objects over CHUNK bytes are split so that several peers share them, and a faster link
    ends up taking more. A partial object resumes where it stopped (a cut cable, a restart).
    A corrupt object is fetched again, avoiding the peer that sent it; a peer whose
    connection breaks RECONNECTS times in a row is dropped. `on_progress(total)` gets the
    bytes written so far, from the fetch's threads; `should_stop()` is asked every POLL s
    and ends the fetch early, keeping the partials (report.stopped). `parallel`: at most
    this many peers at once, the fastest first (None: all of them); `connections` to each.
    Raises FetchFailed when some object has no peer left to fetch it from.
    """
    return _Fetch(wanted, peers, store, on_progress, parallel, connections).run(should_stop or (lambda: False))


class _Fetch:
    def __init__(self, wanted: Sequence[Wanted], peers: Sequence[Peer], store: Store,
                 on_progress: Callable[[int], None] | None, parallel: int | None, connections: int) -> None:
        self.store = store
        self.on_progress = on_progress
        self.lock = threading.Condition()
        self.queue: list[_Task] = []  # sorted by _Task.key
        self.queued_bytes = 0
        self.objects_left = 0
        self.halt = False
        self.failure: str | None = None
        self.written = self.fetched = self.retries = self.corrupt = 0
        ordered = sorted(peers, key=lambda p: -p.bandwidth)
        count = len(ordered) if parallel is None else max(1, parallel)
        self.connections = connections
        self.workers = [_Worker(p, lane) for p in ordered[:count] for lane in range(connections)]
        self.standby = [_Worker(p, lane) for p in ordered[count:] for lane in range(connections)]
        self.started: list[_Worker] = []
        seen: set[str] = set()
        for entry in wanted:
            if entry.digest in seen or store.has(entry.digest):
                continue
            seen.add(entry.digest)
            obj = _Object(entry.digest, entry.object_size, len(seen))
            self._plan(obj)
            self.objects_left += 1

    # -- the queue (all under self.lock) --

    def _plan(self, obj: _Object) -> None:
        """Queue requests for what `obj` still lacks (resuming a partial left by an earlier fetch)."""
        gaps = [(0, obj.size)]
        if self.store.has_partial(obj.digest):
            obj.partial = self.store.open(obj.digest, obj.size)  # re-hashes what it holds
            gaps = obj.partial.missing()
        step = (obj.size or 1) if obj.whole else CHUNK
        for start, end in gaps or [(obj.size, obj.size)]:  # an empty object: one empty request
            for offset in range(start, max(end, start + 1), step):
                self._queue(_Task(obj, offset, min(end, offset + step)))
                obj.tasks_left += 1

    def _queue(self, task: _Task) -> None:
        task.sent = False
        bisect.insort(self.queue, task, key=lambda t: t.key)
        self.queued_bytes += task.length

    def _next(self, worker: _Worker) -> int | None:
        """Where in the queue is the first request this worker should make, if any: not of an
        object another connection to the same peer is receiving (an object is hashed in
        order, on one thread: the connections share a peer's objects, not one object)."""
        siblings = {id(t.obj) for w in self.started if w.peer is worker.peer and w is not worker for t in w.inflight}
        for i, task in enumerate(self.queue[:SCAN]):
            if id(task.obj) not in siblings and self._can(worker, task.obj) and self._worth(worker, task):
                return i
        return None

    def _take(self, worker: _Worker) -> _Task | None:
        i = self._next(worker)
        if i is None:
            return None
        task = self.queue.pop(i)
        self.queued_bytes -= task.length
        return task

    def _can(self, worker: _Worker, obj: _Object) -> bool:
        return worker.alive and worker.peer.node not in obj.avoid and worker.peer.has(obj.digest)

    def _bandwidth(self, worker: _Worker) -> float:
        """The probe's figure; without one, the rate measured in this fetch (once there is
        enough of it to mean something), else a nominal one."""
        if worker.peer.bandwidth:
            return worker.peer.bandwidth / self.connections  # the connections share the link
        if worker.received >= MEASURED_AFTER and worker.busy_seconds > 0:
            return worker.received / worker.busy_seconds
        return NOMINAL_BANDWIDTH

    def _worth(self, worker: _Worker, task: _Task) -> bool:
        """Whether this worker taking `task` does not delay the end: it would finish it no later
        than any other peer could, or the work left keeps everyone busy longer anyway."""
        mine = (worker.inflight_bytes() + task.length) / self._bandwidth(worker)
        others = [(w.inflight_bytes() + task.length) / self._bandwidth(w)
                  for w in self.started if w is not worker and not w.failing and self._can(w, task.obj)]
        if not others or mine <= min(others):
            return True
        total = sum(self._bandwidth(w) for w in self.started if w.alive)
        return self.queued_bytes / total >= mine

    def _requeue(self, worker: _Worker, why: str | None) -> None:
        """Put a worker's requests back (what arrived of them stays in the partials); `why`
        the connection failed, None when the fetch is halting."""
        while worker.inflight:
            self._queue(worker.inflight.popleft())
            self.retries += why is not None
        if why is not None:
            worker.error = why
        self.lock.notify_all()

    def _check_servable(self) -> None:
        """Fail when a queued object has no live peer left; wake a standby peer that has it."""
        orphans: dict[str, _Object] = {}
        for task in self.queue:
            obj = task.obj
            if obj.digest in orphans or any(self._can(w, obj) for w in self.started):
                continue
            spare = next((w for w in self.standby if self._can(w, obj)), None)
            if spare is not None:
                self.standby.remove(spare)
                self._start(spare)
            else:
                orphans[obj.digest] = obj
        if orphans and self.failure is None:
            size = sum(o.size for o in orphans.values())
            tried = "; ".join(f"{w.peer.name} ({w.error or 'has none of them'})"
                              for w in [*self.started, *self.standby]) or "no peers"
            self.failure = (f"{len(orphans)} objects ({size} bytes) have no peer left to fetch them from, "
                            f"e.g. {next(iter(orphans))[:12]}; tried: {tried}")
            self.halt = True
            self.lock.notify_all()

    # -- running --

    def run(self, should_stop: Callable[[], bool]) -> FetchReport:
        began = time.monotonic()
        stopped = False
        with self.lock:
            for worker in self.workers:
                self._start(worker)
            self._check_servable()
            while self.objects_left and not self.halt:
                if should_stop():
                    self.halt = stopped = True
                    break
                self.lock.wait(POLL)
            self.halt = True
            self.lock.notify_all()
        for worker in list(self.started):
            worker.thread.join()
        self._close_partials()
        if self.failure is not None:
            raise FetchFailed(self.failure)
        received: dict[str, int] = {}
        for w in self.started:
            received[w.peer.node] = received.get(w.peer.node, 0) + w.received
        return FetchReport(received, time.monotonic() - began,
                           self.fetched, self.retries, self.corrupt, stopped)

    def _start(self, worker: _Worker) -> None:
        worker.thread = threading.Thread(target=self._work, args=(worker,), daemon=True,
                                         name=f"fetch-{worker.peer.name}-{worker.lane}")
        self.started.append(worker)
        worker.thread.start()

    def _close_partials(self) -> None:
        for task in self.queue:
            if task.obj.partial is not None:
                task.obj.partial.close()
                task.obj.partial = None

    def _work(self, worker: _Worker) -> None:
        """A peer's thread: connect when there is work for it, run requests, reconnect after
        a failure (with back-off), give up after RECONNECTS failures in a row."""
        failures = 0
        while True:
            with self.lock:  # connect only when there is work for this peer
                while not self.halt and self._next(worker) is None:
                    self.lock.wait(POLL)
                if self.halt:
                    return
            try:
                conn = worker.peer.connect()
            except Exception as error:  # noqa: BLE001  (the daemon's dial: Refused, OSError, a timeout)
                progressed, why = False, f"cannot connect: {_one_line(error)}"
            else:
                try:
                    progressed, why = self._session(worker, _Stream(conn, lambda: self.halt))
                finally:
                    conn.sock.close()
            with self.lock:
                self._requeue(worker, why)
                failures = 0 if progressed or why is None else failures + 1
                if failures > RECONNECTS:
                    log.info("fetch: dropping %s: %s", worker.peer.name, why)
                    worker.alive = False
                    if self.standby:  # the next fastest peer takes its place
                        self._start(self.standby.pop(0))
                    self._check_servable()
                    return
                worker.failing = failures > 0  # until bytes arrive: others do not wait for it
                if failures:
                    self.lock.wait(BACKOFF[min(failures, len(BACKOFF)) - 1])  # woken early by a halt

    def _session(self, worker: _Worker, stream: _Stream) -> tuple[bool, str | None]:
        """Run requests over one connection until there is nothing left for this worker (why
        None) or the connection fails; returns (whether bytes arrived, why it failed)."""
        progressed = False
        try:
            with _Writer() as writer:
                while True:
                    self._send_requests(worker, stream)
                    if not worker.inflight:
                        return progressed, None
                    progressed |= self._receive(worker, stream, writer)
        except Stopped:
            return progressed, None
        except wire.ProtocolError as error:
            return progressed, f"protocol error: {error}"
        except (OSError, TimeoutError) as error:  # ConnectionError is an OSError
            return progressed, f"connection broke: {_one_line(error)}"
        except Exception as error:  # a bug: this peer fails, the fetch goes on without it
            log.exception("fetch from %s failed", worker.peer.name)
            return progressed, f"failed: {_one_line(error)}"

    def _send_requests(self, worker: _Worker, stream: _Stream) -> None:
        """Take requests until the pipeline is full, and send those not sent yet. With none in
        flight and none to take, wait up to LINGER for some (a failed peer's, put back)."""
        with self.lock:
            linger = time.monotonic() + LINGER
            while True:
                while (not self.halt and len(worker.inflight) < MAX_PIPELINE
                       and worker.inflight_bytes() < PIPELINE_BYTES and (task := self._take(worker)) is not None):
                    worker.inflight.append(task)
                if worker.inflight or self.halt or time.monotonic() >= linger:
                    break
                self.lock.wait(POLL)
            unsent = [t for t in worker.inflight if not t.sent]
        if unsent:
            stream.write(b"".join(b"".join(wire.encode(wire.Fetch(t.obj.digest, t.offset, t.length)))
                                  for t in unsent))
            for t in unsent:
                t.sent = True

    def _receive(self, worker: _Worker, stream: _Stream, writer: _Writer) -> bool:
        """One Part for the oldest request in flight; returns whether bytes arrived."""
        task = worker.inflight[0]
        part = stream.read_message(wire.MAX_PART)
        if type(part) is wire.Refuse:  # the server has no room for this connection
            raise ConnectionRefusedError(part.reason)
        if type(part) is not wire.Part:
            raise wire.ProtocolError(f"expected a part, got a {wire.TAGS[type(part)]}")
        if (part.digest, part.offset) != (task.obj.digest, task.offset) or part.length > task.length:
            raise wire.ProtocolError(f"part {part.digest[:12]} [{part.offset}, +{part.length}) does not answer "
                                     f"the fetch of {task.obj.digest[:12]} [{task.offset}, {task.end})")
        if part.error:
            with self.lock:
                worker.inflight.popleft()
                task.obj.avoid.add(worker.peer.node)
                worker.error = part.error
                self._queue(task)
                self.retries += 1
                self._check_servable()
            return False
        partial = self._partial(task.obj)
        left, offset, began = part.length, part.offset, time.monotonic()

        def written(n: int) -> None:  # in order: the task's bytes up to here are in the partial
            with self.lock:
                task.offset += n
                worker.received += n
                worker.failing = False
                self.written += n
                total = self.written
            if self.on_progress is not None:
                self.on_progress(total)

        try:
            while left:
                if self.halt:
                    raise Stopped()  # the bytes written so far stay in the partial
                buffer = writer.free(written)
                want = min(left, buffer.nbytes)
                n = 0
                while n < want:  # fill the buffer: fewer, larger writes
                    n += stream.read_into(buffer[n:want])
                writer.write(partial, offset, buffer[:n])
                offset += n
                left -= n
        finally:
            writer.drain(written)
        worker.busy_seconds += time.monotonic() - began
        if not task.length:
            with self.lock:
                worker.inflight.popleft()
                task.obj.contributors.add(worker.peer.node)
                task.obj.tasks_left -= 1
                if not task.obj.tasks_left:
                    self._finish(task.obj)
        return part.length > 0

    def _partial(self, obj: _Object) -> Partial:
        with self.lock:
            if obj.partial is None:
                obj.partial = self.store.open(obj.digest, obj.size)
            return obj.partial

    def _finish(self, obj: _Object) -> None:
        """Verify a complete object (lock held); a corrupt one is planned again."""
        partial, obj.partial = obj.partial, None
        try:
            if partial is None:
                partial = self.store.open(obj.digest, obj.size)  # an empty object
            partial.finish()
        except CorruptObject as error:
            log.warning("fetch: %s (from %s)", error, ", ".join(sorted(obj.contributors)))
            self.corrupt += 1
            if len(obj.contributors) == 1 or obj.whole:
                obj.avoid |= obj.contributors  # it alone sent it, or it was already sent whole
            else:
                obj.whole = True  # from one peer at a time, until the one that corrupts is known
            obj.contributors = set()
            self._plan(obj)
            self.retries += obj.tasks_left
            self._check_servable()
            self.lock.notify_all()
            return
        self.fetched += 1
        self.objects_left -= 1
        self.lock.notify_all()


class _Writer:
    """Writes received buffers into partials on a thread of its own, so that receiving the
    next buffer overlaps writing and hashing the last ones (two cores work at once).
    WRITE_BUFFERS buffers rotate; one is handed out again once its write is done, and each
    done write is reported, in order, to the caller's `written(n)`."""

    def __init__(self) -> None:
        self.buffers = [memoryview(bytearray(RECV_BUFFER)) for _ in range(WRITE_BUFFERS)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fetch-write")
        self.pending: deque[tuple[Future, int]] = deque()
        self.next = 0

    def free(self, written: Callable[[int], None]) -> memoryview:
        if len(self.pending) == len(self.buffers):
            future, n = self.pending.popleft()
            future.result()
            written(n)
        buffer = self.buffers[self.next]
        self.next = (self.next + 1) % len(self.buffers)
        return buffer

    def write(self, partial: Partial, offset: int, data: memoryview) -> None:
        self.pending.append((self.pool.submit(partial.write, offset, data), data.nbytes))

    def drain(self, written: Callable[[int], None]) -> None:
        """Wait for every write; report those done before the first that failed, then raise it."""
        failure = None
        while self.pending:
            future, n = self.pending.popleft()
            try:
                future.result()
            except Exception as error:  # noqa: BLE001  (raised below, after the others are waited for)
                failure = failure or error
            if failure is None:
                written(n)
        if failure is not None:
            raise failure

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


# --- glue for the daemon: bulk connections made and accepted by asyncio ----------------------------


def connector(loop: asyncio.AbstractEventLoop, host: str, port: int,
              me: peers.Me) -> Callable[[], peers.Detached]:
    """A Peer.connect for a fetch thread: dials a bulk connection on the daemon's event loop
    and hands the detached connection over."""

    async def dial() -> peers.Detached:
        channel = await peers.dial(host, port, me, "bulk")  # within 2 x peers.HANDSHAKE_TIMEOUT
        return channel.detach()

    def connect() -> peers.Detached:
        future = asyncio.run_coroutine_threadsafe(dial(), loop)
        try:
            return future.result(2 * peers.HANDSHAKE_TIMEOUT + 1)
        except TimeoutError:
            future.cancel()
            raise

    return connect


def serve_channel(channel: peers.Channel, local: Local, stop: threading.Event | None = None,
                  done: Callable[[], None] | None = None) -> threading.Thread:
    """Serve an accepted bulk channel in a thread of its own (call on the event loop);
    `done()` when it ends."""
    conn = channel.detach()

    def run() -> None:
        try:
            serve(conn, local, stop, channel.peer.name)
        finally:
            if done is not None:
                done()

    thread = threading.Thread(target=run, daemon=True, name=f"bulk-{channel.peer.name}")
    thread.start()
    return thread


class Served:
    """The bulk connections served at once, per peer (by node id) and in all, within
    `per_peer` and `total`. Thread-safe: a connection's thread gives its place back."""

    def __init__(self, per_peer: int = MAX_PER_PEER, total: int = MAX_SERVED) -> None:
        self.per_peer, self.total = per_peer, total
        self.by_peer: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, peer: str) -> str | None:
        """A place for a connection of `peer`; None when taken, else why not (one line)."""
        with self._lock:
            if sum(self.by_peer.values()) >= self.total:
                return f"refused: this node serves {self.total} bulk connections already; try again later"
            if self.by_peer.get(peer, 0) >= self.per_peer:
                return f"refused: {self.per_peer} bulk connections from you are served already"
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
            return None

    def give_back(self, peer: str) -> None:
        with self._lock:
            left = self.by_peer.get(peer, 0) - 1
            if left > 0:
                self.by_peer[peer] = left
            else:
                self.by_peer.pop(peer, None)

    def count(self) -> int:
        with self._lock:
            return sum(self.by_peer.values())


async def serve_or_refuse(channel: peers.Channel, local: Local, served: Served,
                          stop: threading.Event | None = None) -> str | None:
    """Serve an accepted bulk channel in a thread of its own when `served` has room for it
    (call on the event loop); else refuse it: a Refuse that says why, then closed. Returns
    None, or why it was refused."""
    peer = channel.peer_id
    why = served.take(peer)
    if why is None:
        serve_channel(channel, local, stop, lambda: served.give_back(peer))
        return None
    await refuse(channel, why)
    return why


async def refuse(channel: peers.Channel, why: str) -> None:
    """Tell a handshaken peer why it is refused (a Refuse), and close the connection once it
    has read it (or after REFUSE_LINGER)."""
    channel.send(wire.Refuse(why))

    async def read_to_the_end() -> None:
        while await channel.reader.read(1 << 16):  # its requests sent meanwhile: dropped
            pass

    with contextlib.suppress(asyncio.TimeoutError, OSError):
        await asyncio.wait_for(read_to_the_end(), REFUSE_LINGER)
    channel.close(why)
