"""Real daemons against what a stranger on the cable (or a careless operator) does to them:
a model directory holding other files, a thousand idle bulk connections, refused handshakes
again and again, SIGHUP, and a start-up error again and again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from netns import Loop

from daemons import DaemonProcess, alive_ids, start_all, tiny_model_dir, wait_for
from tbmesh.net import peers, wire
from tbmesh.weights import bulk
from tbmesh.weights.manifest import ObjectRef, build_manifest
from tbmesh.weights.store import Store

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")  # the daemon's log format


def _soft_open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


async def _bulk_channel(port: int, cluster: str, node: str) -> peers.Channel | str:
    """A handshaken bulk connection as the stranger `node`; or why it failed."""
    me = peers.Me(node, 1, node, cluster, f"machine-{node}")
    try:
        return await peers.dial("127.0.0.1", port, me, "bulk")
    except (peers.Refused, OSError) as error:
        return f"dial failed: {error}"


async def _answer(channel: peers.Channel, wait: float) -> str | None:
    """The reason of a Refuse the daemon sends at once; None when it serves the connection."""
    async def first() -> str:
        async for message in channel.messages():
            return message.reason if type(message) is wire.Refuse else f"unexpected {message}"
        return "closed without a reason"

    try:
        return await asyncio.wait_for(first(), wait)
    except asyncio.TimeoutError:
        return None


async def _closed_within(channel: peers.Channel, limit: float) -> float | None:
    """Seconds until the daemon closes the connection, None if it stays open `limit` s."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(channel.reader.read(1 << 16), limit)
    except asyncio.TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - started


def _health_times(daemon: DaemonProcess, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            daemon.request("GET", "/health", timeout=10)
            times.append(time.monotonic() - started)
        except OSError:
            times.append(float("inf"))
        time.sleep(0.1)


def _refused_warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and "refused" in line]


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_thousand_idle_bulk_connections_are_capped_and_timed_out_and_the_daemon_serves_on(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    (model / "credentials.txt").write_text("aws_secret_access_key = hunter2\n")
    cluster = f"t{uuid.uuid4().hex[:8]}"
    daemon = DaemonProcess("a", tmp_path / "a", ["--interface", "lo", "--memory", "4GB", "--model", str(model),
                                                 "--cluster", cluster, "--no-probe"])
    daemon.prefix = ["prlimit", "--nofile=1024:"]  # a shell's soft limit; the probe's daemon had 1024
    daemon.start()
    loop = Loop()
    try:
        pid = json.loads((daemon.state_dir / "api.json").read_text())["pid"]
        soft, hard = _soft_open_files(pid)
        assert soft == hard > 1024  # raised at start
        node = wait_for(lambda: (n := daemon.status()["nodes"][0])["disk"] and n["disk"]["manifest"] and n, 60,
                        "the model hashed")
        port = daemon.control_port

        # A stranger's handshake refused again and again: a WARNING once, not each time.
        async def wrong_cluster(i: int) -> str:
            return await _bulk_channel(port, "not-" + cluster, f"s{i}")

        async def refused_handshakes() -> list:
            return await asyncio.gather(*(wrong_cluster(i) for i in range(50)))

        assert all("cluster" in why for why in loop.run(refused_handshakes()))

        # 1000 bulk connections that never ask anything, /health timed beside them.
        stop, health = threading.Event(), []
        timer = threading.Thread(target=_health_times, args=(daemon, stop, health))
        timer.start()
        gate = asyncio.Semaphore(50)

        async def dial(node_id: str) -> peers.Channel | str:
            async with gate:
                return await _bulk_channel(port, cluster, node_id)

        async def flood() -> tuple[list, list]:
            greedy = [await dial("greedy") for _ in range(10)]  # one peer: its cap
            others = await asyncio.gather(*(dial(f"stranger{i}") for i in range(990)))  # all: the cap in all
            channels = [c for c in [*greedy, *others] if not isinstance(c, str)]
            assert len(channels) == 1000, [c for c in [*greedy, *others] if isinstance(c, str)][:3]
            answers = await asyncio.gather(*(_answer(c, 3.0) for c in channels))
            return list(zip(channels, answers))[:10], list(zip(channels, answers))[10:]

        began = time.monotonic()
        greedy, others = loop.run(flood(), timeout=120)
        greedy_served = [c for c, why in greedy if why is None]
        others_served = [c for c, why in others if why is None]
        assert len(greedy_served) == bulk.MAX_PER_PEER
        assert {why for _, why in greedy if why} == {
            f"refused: {bulk.MAX_PER_PEER} bulk connections from you are served already"}
        assert len(others_served) == bulk.MAX_SERVED - bulk.MAX_PER_PEER
        assert {why for _, why in others if why} == {
            f"refused: this node serves {bulk.MAX_SERVED} bulk connections already; try again later"}

        # the idle ones are closed after the request timeout, not before
        async def all_closed() -> list:
            return await asyncio.gather(*(_closed_within(c, bulk.REQUEST_TIMEOUT + 10)
                                          for c in greedy_served + others_served))

        closed = loop.run(all_closed(), timeout=bulk.REQUEST_TIMEOUT + 30)
        waited = time.monotonic() - began
        stop.set()
        timer.join()
        assert None not in closed and waited >= bulk.REQUEST_TIMEOUT
        assert health and max(health) < 2.0, f"/health took up to {max(health):.2f} s"
        print(f"\n/health during the flood: {len(health)} answers, median {sorted(health)[len(health) // 2] * 1e3:.1f} "
              f"ms, max {max(health) * 1e3:.1f} ms; idle connections closed after {waited:.1f} s")

        # its places free again: a fetch of the manifest and the small files works, and the
        # file no model needs is not in the manifest, nor served by its digest
        manifest = build_manifest(model)
        assert node["disk"]["manifest"] == manifest.digest
        assert "credentials.txt" not in {f.name for f in manifest.files}
        me = peers.Me("fetcher", 1, "fetcher", cluster, "machine-fetcher")
        peer = bulk.Peer(node["id"], "a", bulk.connector(loop.loop, "127.0.0.1", port, me))
        store = Store(tmp_path / "fetched")
        bulk.fetch([ObjectRef(manifest.digest, len(manifest.to_bytes()))], [peer], store)
        assert store.path(manifest.digest).read_bytes() == manifest.to_bytes()
        bulk.fetch(list(manifest.files), [peer], store)
        assert store.path(next(f.digest for f in manifest.files if f.name == "config.json")).read_bytes() == \
            (model / "config.json").read_bytes()
        secret = (model / "credentials.txt").read_bytes()
        with pytest.raises(bulk.FetchFailed, match="unknown object"):
            bulk.fetch([ObjectRef(hashlib.sha256(secret).hexdigest(), len(secret))], [peer], store)

        log = daemon.log()
        assert len(_refused_warnings(log)) <= 2, _refused_warnings(log)
        assert "Traceback" not in log and "starting it again" not in log  # no task failed
        assert daemon.alive() and daemon.status()["plan"] is not None
    finally:
        loop.close()
        daemon.kill()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_sighup_says_goodbye_and_cleans_up(tmp_path):
    cluster = f"t{uuid.uuid4().hex[:8]}"
    a, b = start_all([DaemonProcess(n, tmp_path / n, ["--interface", "lo", "--memory", "1GB", "--cluster", cluster,
                                                      "--no-probe"]) for n in ("a", "b")])
    try:
        wait_for(lambda: len(alive_ids(a.status())) == 2, 30, "a cluster of two")
        b_id = b.node_id
        b.proc.send_signal(signal.SIGHUP)
        assert b.proc.wait(20) == 0
        assert not (b.state_dir / "api.json").exists()
        assert "SIGHUP: stopping" in b.log() and "stopped" in b.log()
        wait_for(lambda: any(e["kind"] == "left" and e["node"] == b_id for e in a.status()["events"]), 5,
                 "a to hear b's goodbye")
    finally:
        a.kill()
        b.kill()


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_a_start_up_error_is_one_line_and_the_same_exit_status_every_time(tmp_path):
    """The start-up error that aborted (134) one run in three: the control port in use by a
    daemon with a model, whose MLX thread had loaded it meanwhile."""
    model = tiny_model_dir(tmp_path / "model")
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]

        def run(i: int) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "tbmesh", "daemon", "--interface", "lo", "--port", str(port), "--api-port", "0",
                 "--state-dir", str(tmp_path / f"s{i}"), "--memory", "1GB", "--model", str(model),
                 "--cluster", f"t{uuid.uuid4().hex[:8]}"], capture_output=True, text=True, timeout=120)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, range(10)))
    expected = f"error: control port {port} is in use (another tbmesh daemon?); choose another with --port"
    for result in results:
        said = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
        assert (result.returncode, said) == (2, [expected]), result.stderr[-3000:]
