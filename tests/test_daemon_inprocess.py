"""Two real daemons in this process, on loopback (real TCP, real zeroconf): the control plane
runs on one timer armed for the core's next deadline, with no fixed tick."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from tbmesh.core.membership import PeerState
from tbmesh.node.daemon import Daemon, DaemonConfig

GB = 10**9
FIXED_TICKS_PER_S = 20  # what the daemon's ticker did before (heartbeat_interval / 4)


def config(root: Path, name: str, cluster: str) -> DaemonConfig:
    return DaemonConfig(interfaces=["lo"], port=0, api_port=0, state_dir=root / name, name=name,
                        cluster=cluster, memory_usable=4 * GB, probe_links=False)


async def until(condition, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_two_daemons_join_heartbeat_on_their_timers_and_a_lone_one_sleeps(tmp_path):
    cluster = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        a, b = Daemon(config(tmp_path, "a", cluster)), Daemon(config(tmp_path, "b", cluster))
        await asyncio.gather(a.start(), b.start())
        try:
            def joined() -> bool:
                return all(set(d.core.members()) == {a.core.id, b.core.id} and d.core.leader is not None
                           and d.core.leader == a.core.leader for d in (a, b))

            await until(joined, 20, "a and b in one cluster with one leader")
            await asyncio.sleep(1.0)
            before = {d: d.control.ticks for d in (a, b)}
            window = 3.0
            await asyncio.sleep(window)
            for d in (a, b):
                rate = (d.control.ticks - before[d]) / window
                # its heartbeats (5/s) and the flush of each heartbeat received (5/s)
                assert 4 <= rate <= 12 < FIXED_TICKS_PER_S, (d.config.name, rate)
                assert not [e for e in d.events if e.kind in ("suspect", "dead")]
                assert d.core.peers[(b if d is a else a).core.id].rtt_s > 0  # heartbeats go both ways

            await b.stop()  # a goodbye: a drops b at once
            await until(lambda: b.core.id not in a.core.members(), 1.0, "a to drop b")
            assert a.core.peers[b.core.id].state is PeerState.DEAD
            await until(lambda: a.core.is_leader, 3.0, "a to lead alone")
            await asyncio.sleep(1.0)  # its settling passes
            asleep = a.control.ticks
            await asyncio.sleep(2.0)
            assert a.control.ticks == asleep and a.core.next_deadline() is None  # nothing to wake for
        finally:
            await asyncio.gather(a.stop(), b.stop())

    asyncio.run(main())
