"""Link bandwidth probe: stream zeros for about half a second and let the receiver time them.

The daemon runs it on a separate TCP connection (after its own handshake) when a link appears
and on request, so it never holds an inference connection for long:

    dialer:   result = await probe_send(stream)       # streams, then reads the report
    listener: result = await probe_receive(stream)    # counts, times, reports

`stream` is a peers.Channel (TLS-sealed with a cluster secret: the probe then measures what
the link carries of authenticated bytes) or `plain(reader, writer)`.

Wire format (all big-endian):
    sender -> receiver   header  "TBPR", version u8, duration f64 (s)
    sender -> receiver   zeros for `duration`, then one byte 0x01 (the end marker: no zero
                         is, and TLS has no half-close to mark it with)
    receiver -> sender   report  "TBPR", total bytes u64, measured bytes u64, measured s f64

Why the receiver measures: the sender's clock sees bytes enter its socket buffer, and with
megabytes of buffering a slow link would look fast. The receiver sees them arrive.

Why a warm-up: the first moments are not the link's steady rate. TCP slow start ramps up,
buffers fill, and a token-bucket shaper (tc tbf in the lab) lets its bucket through at line
rate. So the receiver ignores everything that arrives during the first WARMUP_FRACTION of the
announced duration (counted from the first byte) and measures from the first read after
that to the moment everything had arrived: bytes that arrived in between, over the time
between (see _count for how a receiver that falls behind is kept from skewing this).
The tail needs no trimming: after the sender stops, what is still buffered drains at
the link's rate.

Socket buffers are left to the kernel's autotuning: forcing 4 MiB buffers measured the same
rates in the lab (0.5-8 Gbit/s) but made every probe longer, since a full send buffer has
to drain after the sender stops (+90 ms at 0.5 Gbit/s).
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import sys
import termios
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

MAGIC = b"TBPR"
VERSION = 2
END = b"\x01"  # follows the zeros
HEADER = struct.Struct("!4sBd")  # magic, version, duration the sender will stream
REPORT = struct.Struct("!4sQQd")  # magic, total bytes, measured bytes, measured seconds

DEFAULT_DURATION = 0.5
# Per write: the kernel takes what fits straight from the shared zeros; only the unsent rest
# of a partial send is copied into asyncio's buffer (Python 3.11). 1 MiB pushed an unshaped
# veth to 10 Gbit/s where 256 KiB reached 8.3 and 64 KiB 6.8 (fewer trips through the loop).
DEFAULT_CHUNK = 1 << 20
MAX_DURATION = 10.0  # a receiver refuses to be held longer than this
WARMUP_FRACTION = 0.2  # of the duration: skip slow start and shaper bursts
MIN_WINDOW = 0.01  # s: a shorter measured window falls back to the whole transfer
READ_SIZE = 1 << 20
DEFAULT_TIMEOUT = 5.0  # s beyond the duration before a silent peer is given up on
YIELD_EVERY = 0.005  # s: the longest the probe keeps the event loop to itself


class ProbeError(Exception):
    """The probe could not measure: the peer closed, stalled or spoke another protocol."""


@dataclass(frozen=True)
class ProbeResult:
    """Throughput over the measured window (after the warm-up), timed by the receiver."""

    bytes_per_s: float
    bytes: int  # bytes received in the measured window
    seconds: float  # length of the measured window


class Stream(Protocol):
    """What a probe runs over (peers.Channel is one)."""

    async def read(self) -> bytes: ...  # the next bytes, b"" at the end

    def write(self, buffers: Iterable[bytes | memoryview]) -> None: ...

    writer: asyncio.StreamWriter  # the connection's (drain, its socket)


@dataclass
class plain:  # noqa: N801  (reads as a function: plain(reader, writer))
    """A Stream over asyncio's plain streams."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read(self) -> bytes:
        return await self.reader.read(READ_SIZE)

    def write(self, buffers: Iterable[bytes | memoryview]) -> None:
        for buffer in buffers:  # one by one: writelines would join them into a copy first
            self.writer.write(buffer)


async def _drain(stream: Stream) -> None:
    await stream.writer.drain()
    if stream.writer.transport.is_closing():
        raise ConnectionResetError("transport closed while streaming")


async def _read_exactly(stream: Stream, n: int, have: bytes = b"") -> tuple[bytes, bytes]:
    """`n` bytes, and what came after them in the same reads."""
    data = bytearray(have)
    while len(data) < n:
        more = await stream.read()
        if not more:
            raise asyncio.IncompleteReadError(bytes(data), n)
        data += more
    return bytes(data[:n]), bytes(data[n:])


_zeros_cache: dict[int, memoryview] = {}


def _zeros(size: int) -> memoryview:
    """One shared read-only buffer of zeros per chunk size: sending never builds new bytes."""
    view = _zeros_cache.get(size)
    if view is None:
        view = _zeros_cache[size] = memoryview(bytes(size))
    return view


async def probe_send(
    stream: Stream,
    duration: float = DEFAULT_DURATION,
    chunk: int = DEFAULT_CHUNK,
    timeout: float = DEFAULT_TIMEOUT,
) -> ProbeResult:
    """Stream zeros for `duration` seconds, the end marker, and return the receiver's measurement.

    Raises ProbeError if the peer closes, stops reading or answers nonsense; gives up after
    duration + timeout seconds in all.
    """
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION}] s, not {duration}")
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    try:
        async with asyncio.timeout(duration + timeout):
            stream.write([HEADER.pack(MAGIC, VERSION, duration)])
            await _stream(stream, duration, _zeros(chunk))
            stream.write([END])
            report, _ = await _read_exactly(stream, REPORT.size)
    except TimeoutError as exc:
        raise ProbeError(f"probe timed out after {duration + timeout:.1f} s") from exc
    except asyncio.IncompleteReadError as exc:
        raise ProbeError(f"peer closed before its report ({len(exc.partial)} of {REPORT.size} bytes)") from exc
    except (ConnectionError, OSError) as exc:
        raise ProbeError(f"connection failed during the probe: {exc!r}") from exc
    return _parse_report(report)


async def _stream(stream: Stream, duration: float, zeros: memoryview) -> None:
    loop = asyncio.get_running_loop()
    now = loop.time()
    end, next_yield = now + duration, now + YIELD_EVERY
    while now < end:
        stream.write([zeros])
        await _drain(stream)
        now = loop.time()
        if now >= next_yield:
            # drain() returns without yielding while the kernel takes every chunk (a fast
            # link): give heartbeats their turn.
            await asyncio.sleep(0)
            next_yield = now + YIELD_EVERY


def _parse_report(report: bytes) -> ProbeResult:
    magic, _total, measured, seconds = REPORT.unpack(report)
    if magic != MAGIC:
        raise ProbeError(f"bad report from peer (magic {magic!r})")
    if measured <= 0 or not seconds > 0:
        raise ProbeError(f"peer measured nothing ({measured} bytes in {seconds:.3f} s)")
    return ProbeResult(bytes_per_s=measured / seconds, bytes=measured, seconds=seconds)


async def probe_receive(
    stream: Stream,
    timeout: float = DEFAULT_TIMEOUT,
) -> ProbeResult:
    """Count and time the sender's bytes until the end marker, send the report, and return it (both
    ends then know the same figure).

    Raises ProbeError on a bad header, a sender silent for `timeout` seconds, one that
    streams past its announced duration by more than `timeout`, or a reset connection.
    The caller closes the connection afterwards.
    """
    try:
        header, rest = await asyncio.wait_for(_read_exactly(stream, HEADER.size), timeout)
        duration = _parse_header(header)
        total, measured, seconds = await _count(stream, rest, duration, timeout)
        report = REPORT.pack(MAGIC, total, measured, seconds)
        stream.write([report])
        await asyncio.wait_for(_drain(stream), timeout)
        return _parse_report(report)
    except TimeoutError as exc:
        raise ProbeError("probe sender went silent or overran its duration") from exc
    except asyncio.IncompleteReadError as exc:
        raise ProbeError("peer closed before the probe header") from exc
    except (ConnectionError, OSError) as exc:
        raise ProbeError(f"connection failed during the probe: {exc!r}") from exc


def _parse_header(header: bytes) -> float:
    magic, version, duration = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProbeError(f"not a probe (magic {magic!r})")
    if version != VERSION:
        raise ProbeError(f"probe version {version}, we speak {VERSION}")
    if not 0 < duration <= MAX_DURATION:
        raise ProbeError(f"probe duration {duration} s out of range")
    return duration


def _queued(sock: socket.socket | None) -> int:
    """Bytes the kernel has received for us that we have not read yet (FIONREAD)."""
    if sock is None:
        return 0
    try:
        buf = bytearray(4)
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)
    except (OSError, ValueError):
        return 0


async def _count(stream: Stream, early: bytes, duration: float,
                 idle: float) -> tuple[int, int, float]:
    """Read to the end marker; return (total bytes, bytes in the measured window, window seconds).

    Each read gives a point of the arrival curve: at time t the kernel had received
    `read so far + still queued` bytes. Counting what is still queued matters when the
    receiver falls behind (a busy core): bytes that arrived before the window opened but are
    read after it would otherwise inflate the rate. The window closes at the first read
    that found everything arrived, not at the last read, for the same reason.
    Raises TimeoutError when no byte comes for `idle` s or the sender overruns its duration.
    """
    loop = asyncio.get_running_loop()
    sock = stream.writer.get_extra_info("socket")
    hard_end = loop.time() + duration + idle
    warmup = duration * WARMUP_FRACTION
    total = 0
    first: tuple[float, int] | None = None  # (time, bytes arrived by then) at the first read
    opened: tuple[float, int] | None = None  # the first point past the warm-up
    latest = (0.0, 0)  # the first point that saw the most bytes arrived so far
    next_yield = 0.0
    async with asyncio.timeout(None) as deadline:
        while True:
            deadline.reschedule(min(hard_end, loop.time() + idle))
            data, early = (early, b"") if early else (await stream.read(), b"")
            now = time.perf_counter()
            if not data:
                raise ConnectionError("the sender closed before its end marker")
            ended = data.endswith(END)
            total += len(data) - ended
            point = (now, total + _queued(sock))
            if first is None:
                first = point
            elif opened is None and now - first[0] >= warmup:
                opened = point
            if point[1] > latest[1]:
                latest = point
            if ended:
                break
            if now >= next_yield:
                await asyncio.sleep(0)  # read() does not yield while data is waiting
                next_yield = now + YIELD_EVERY
    if first is None or latest[1] < total:
        return total, 0, 0.0
    if opened is None or latest[0] - opened[0] < MIN_WINDOW:
        opened = first  # a tiny transfer: measure from the first read, warm-up and all
    return total, latest[1] - opened[1], latest[0] - opened[0]
