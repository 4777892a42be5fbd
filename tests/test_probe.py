"""The bandwidth probe: accurate through shaped cables, quick, and never hangs on a bad peer."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

import netns
from tbmesh.core.membership import Timing
from tbmesh.net.probe import (
    END, HEADER, MAGIC, VERSION, ProbeError, ProbeResult, plain, probe_receive, probe_send,
)


async def serve_once(handler) -> tuple[asyncio.Server, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A loopback server running `handler` for one connection, and a client connected to it."""
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, await asyncio.open_connection("127.0.0.1", port)


async def loopback_probe(duration: float = 0.5) -> tuple[ProbeResult, float]:
    server, (reader, writer) = await serve_once(lambda r, w: probe_receive(plain(r, w)))
    async with server:
        start = time.perf_counter()
        result = await probe_send(plain(reader, writer), duration=duration)
        elapsed = time.perf_counter() - start
        writer.close()
    return result, elapsed


def test_loopback_probe_is_positive_and_quick() -> None:
    result, elapsed = asyncio.run(loopback_probe())
    assert result.bytes_per_s > 0 and result.bytes > 0 and result.seconds > 0
    assert result.bytes_per_s == pytest.approx(result.bytes / result.seconds)
    assert elapsed < 1.0


def test_a_very_short_probe_still_measures() -> None:
    result, elapsed = asyncio.run(loopback_probe(duration=0.01))
    assert result.bytes_per_s > 0 and elapsed < 0.5


def test_probe_leaves_the_event_loop_responsive() -> None:
    """Heartbeats share the loop with a probe: no tick may wait long."""
    async def main() -> float:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await loopback_probe()
        task.cancel()
        return gaps

    gaps = sorted(asyncio.run(main()))
    # never a heartbeat interval's wait (a peer would be suspected); and almost every tick on
    # time (a single stall of ~0.1 s is this shared VM's scheduling, seen under CI's load)
    assert gaps[-1] < Timing().heartbeat_interval
    assert gaps[len(gaps) * 99 // 100] < 0.02


# --- bad peers: a clear ProbeError, never a hang --------------------------------------------


async def expect_probe_error(handler, timeout: float = 1.0) -> tuple[ProbeError, float]:
    server, (reader, writer) = await serve_once(handler)
    async with server:
        start = time.perf_counter()
        with pytest.raises(ProbeError) as info:
            await probe_send(plain(reader, writer), duration=0.3, timeout=timeout)
        writer.close()
    return info.value, time.perf_counter() - start


def test_receiver_that_resets_mid_probe() -> None:
    async def reset_after_some(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(HEADER.size + 1_000_000)
        writer.transport.abort()  # RST, as a crashed daemon's kernel would send

    error, elapsed = asyncio.run(expect_probe_error(reset_after_some))
    assert "connection" in str(error) or "closed" in str(error)
    assert elapsed < 1.0


def test_receiver_that_closes_without_a_report() -> None:
    async def read_all_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (data := await reader.read(1 << 20)) and not data.endswith(END):
            pass

    error, elapsed = asyncio.run(expect_probe_error(read_all_then_close))
    assert "before its report" in str(error)
    assert elapsed < 1.0


def test_receiver_that_stops_reading_times_out() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    error, elapsed = asyncio.run(expect_probe_error(stall, timeout=0.5))
    assert "timed out" in str(error)
    assert elapsed < 2.0


def test_receiver_rejects_bad_senders() -> None:
    async def send_then_receive(payload: bytes, close: bool, abort: bool = False) -> ProbeError:
        errors: list[BaseException] = []

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await probe_receive(plain(reader, writer), timeout=0.3)
            except BaseException as exc:
                errors.append(exc)

        server, (_, writer) = await serve_once(receive)
        async with server:
            writer.write(payload)
            if close:
                writer.write_eof()
            if abort:
                await asyncio.sleep(0.05)
                # The sender crashed and its kernel answers with RST (linger 0 forces it).
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            for _ in range(100):
                if errors:
                    break
                await asyncio.sleep(0.02)
            writer.close()
        assert errors and isinstance(errors[0], ProbeError), errors
        return errors[0]

    header = HEADER.pack(MAGIC, VERSION, 0.5)
    assert "magic" in str(asyncio.run(send_then_receive(b"GET / HTTP/1.1\r\n", close=False)))
    assert "header" in str(asyncio.run(send_then_receive(header[:5], close=True)))
    assert "silent" in str(asyncio.run(send_then_receive(header + b"\0" * 1000, close=False)))
    unfinished = asyncio.run(send_then_receive(header + b"\0" * 1000, close=True))
    assert "before its end marker" in str(unfinished)
    crashed = asyncio.run(send_then_receive(header + b"\0" * 1_000_000, close=False, abort=True))
    assert "connection failed" in str(crashed)
    bad_duration = HEADER.pack(MAGIC, VERSION, 3600.0)
    assert "out of range" in str(asyncio.run(send_then_receive(bad_duration, close=False)))


def test_a_probe_runs_inside_a_tls_channel() -> None:
    """With a cluster secret the probe's bytes are sealed like every other (peers.Channel)."""
    from tbmesh.net import peers

    async def main() -> tuple[ProbeResult, ProbeResult]:
        me = [peers.Me(n, 1, n, "c", "m-" + n, b"secret") for n in ("a", "b")]
        answered: asyncio.Queue = asyncio.Queue()

        async def on_accept(reader, writer):
            await answered.put(await peers.answer(reader, writer, me[1]))

        server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        async with server:
            dialled = await peers.dial("127.0.0.1", server.sockets[0].getsockname()[1], me[0], "probe")
            channel = await answered.get()
            assert dialled.tls is not None and channel.tls is not None
            receiving = asyncio.create_task(probe_receive(channel))
            sent = await probe_send(dialled, duration=0.2)
            dialled.close()
            return sent, await receiving

    sent, received = asyncio.run(main())
    assert sent == received and sent.bytes_per_s > 0


def test_send_rejects_bad_arguments() -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await probe_send(None, duration=0)  # type: ignore[arg-type]

    asyncio.run(main())


# --- through shaped cables (root) ------------------------------------------------------------


@pytest.fixture(scope="module")
def cable_pair():
    """Two Macs and one cable, shared by the rate tests (the rate is reshaped per test)."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.Lab() as lab:
        a, b = lab.add_mac("a"), lab.add_mac("b")
        yield a, b, lab.cable(a, b)


async def cable_probe(a: netns.Mac, b: netns.Mac, cable: netns.Cable) -> tuple[ProbeResult, float]:
    (reader, writer), (server_reader, server_writer) = await netns.open_streams(a, b, cable.addr(b))
    receiving = asyncio.create_task(probe_receive(plain(server_reader, server_writer)))
    start = time.perf_counter()
    result = await probe_send(plain(reader, writer))
    elapsed = time.perf_counter() - start
    assert await receiving == result  # both ends know the same figure
    writer.close()
    server_writer.close()
    return result, elapsed


# 5 Gbit/s measures this machine's CPU as much as the cable: on a busy machine both the probe of
# c887d8e and today's read 2.5-3.5 Gbit/s (2026-12-07), so ./dev test --quick leaves it out
@pytest.mark.parametrize("rate", ["500mbit", "1gbit", pytest.param("5gbit", marks=pytest.mark.slow)])
def test_probe_measures_a_shaped_cable(cable_pair, rate: str) -> None:
    a, b, cable = cable_pair
    cable.shape(rate)
    shaped = netns.parse_rate(rate)
    # What TCP can carry is 95.6% of the shaped rate at MTU 1500 (frame headers). The probe
    # finds that to within 0.2% on a quiet machine (bench/probe.py). Both ends run on this
    # process's one thread, and another process hogging a core can hold them to about
    # 4.5 Gbit/s: so 3% of that capacity up to 1 Gbit/s, and 10% of the rate at 5 Gbit/s.
    payload_rate = shaped * netns.tcp_payload_fraction(cable.mtu)
    cpu_bound = shaped > 2e9
    measured = []
    for _ in range(3):  # a probe starved of CPU reads low: the capacity is the best of three
        result, elapsed = asyncio.run(cable_probe(a, b, cable))
        assert elapsed < 2.0  # a 0.5 s probe; generous for a loaded machine
        measured.append(result.bytes_per_s * 8)
        if measured[-1] == pytest.approx(payload_rate, rel=0.03):
            break
    assert max(measured) == pytest.approx(shaped, rel=0.10), measured
    if not cpu_bound:
        assert max(measured) == pytest.approx(payload_rate, rel=0.03), measured
