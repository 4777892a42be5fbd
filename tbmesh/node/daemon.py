"""The daemon: the life cycle of one node, composed of parts with one job each.

    discovery (zeroconf) --found--> connections (dial, accept, read) --messages--> control
    control (the core, its timer) --actions--> connections          data plane <--> host
    interfaces (watch, listeners, RDMA) --change--> discovery rescan, connections, RDMA published

`control` (tbmesh.node.control) runs the pure core with one timer for its next deadline;
`connections` keeps one connection per peer; `probes` measures links; `bulk` serves weights
to peers and dials them for fetches; `disk_tasks` completes the manifest and keeps copies;
`host` is all the serving engine and the disk see of the node. This module starts them in
order, glues the connections' events to the core, and stops them cleanly.

Everything that can block (MLX, memory probes) runs in worker threads so heartbeats keep
flowing. The rules for background tasks are tbmesh.node.tasks'. SIGTERM, SIGINT and SIGHUP
all stop the daemon cleanly (goodbye to peers, api.json removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import resource
import signal
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbmesh.core.cluster import ClusterNode, CoreConfig
from tbmesh.core.membership import PeerState
from tbmesh.core.messages import DiskState
from tbmesh.core.status import (
    DiskStatus,
    FetchStatus,
    LinkStatus,
    NodeStatus,
    Preparing,
    ShardStatus,
    Status,
    ThisNode,
)
from tbmesh.core.types import ModelSpec, NodeInfo
from tbmesh.net import peers, wire
from tbmesh.net.discovery import Advert, Discovery
from tbmesh.node import measure, state
from tbmesh.node.bulk_service import BulkService
from tbmesh.node.connections import Connections, PeerEvents
from tbmesh.node.config import DaemonConfig  # the node's settings and their defaults
from tbmesh.node.control import ControlPlane, now
from tbmesh.node.disk_tasks import DiskTasks
from tbmesh.node.host import NodeHost
from tbmesh.node.interfaces import Interfaces
from tbmesh.node.probes import Probes
from tbmesh.node.tasks import STOP_WAIT_S, Tasks
from tbmesh.serving.view import ClusterView

if TYPE_CHECKING:
    from tbmesh.node.telemetry import Telemetry
    from tbmesh.serving.disk import Disk
    from tbmesh.serving.engine import Engine

log = logging.getLogger("tbmesh")

MEMORY_CHECK_S = 10.0
MEMORY_FILE_CHECK_S = 0.5  # TBMESH_MEMORY_FILE: reading a file is cheap, tests want it soon
TELEMETRY_EVERY_S = 0.5  # how often the status goes to telemetry (status() is not free)
OPEN_FILES = (10240, 4096, 1024)  # soft limits on descriptors tried when the hard one is refused:
# macOS caps it at kern.maxfilesperproc, and at OPEN_MAX (10240) when the hard limit is infinite


def _loopback(host: str) -> bool:
    """Whether `host` (an --api-host) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartupError(Exception):
    """A one-line reason the daemon cannot start (port in use, no such interface, ...)."""


class DaemonFailed(Exception):
    """A one-line reason the running daemon stopped on its own (a task it cannot do without failed)."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open descriptors as far as the system lets it:
    launchd starts a daemon with 256 and a shell often gives 1024, while each bulk connection
    served takes a socket and a few files. Returns (the soft limit before, after)."""
    # mlx_lm.utils sets (2048, 4096) when first imported, the hard limit too, for good: let it
    # do so now, before the raise (a daemon imports it anyway, to load its model)
    import mlx_lm.utils  # noqa: F401

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft == infinite:
        return soft, soft
    tried = [n for n in OPEN_FILES if hard == infinite or n < hard]
    if hard != infinite:
        tried.insert(0, hard)
    for limit in tried:
        if limit <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError):  # macOS: above kern.maxfilesperproc
            continue
        return soft, limit
    return soft, soft


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.loop = asyncio.get_event_loop()
        self.identity: state.Identity | None = None
        self.core: ClusterNode | None = None
        self.network = Interfaces(config.interfaces)  # what we serve on
        self.tasks = Tasks(self.fail)
        self.host = NodeHost(self)  # the data plane's view of us
        # made at start, once the core is: each needs the one before
        self.connections: Connections | None = None
        self.control: ControlPlane | None = None
        self.probes: Probes | None = None
        self.bulk: BulkService | None = None
        self.disk: Disk | None = None  # the model's weights on our disk
        self.engine: Engine | None = None  # the data plane
        self.telemetry: Telemetry | None = None
        self.api_port = 0
        self.ollama_port: int | None = None  # where --ollama-port listens, once it does
        self.stopped = asyncio.Event()
        self.failure: str | None = None  # why the daemon stopped on its own (exit status 1)
        self._discovery: Discovery | None = None
        self._api = None
        self._state_lock: int | None = None  # the state directory's lock, held while we run
        self._stopping = False
        self._up = False  # start() completed

    now = staticmethod(now)

    # what status() reads, from the parts that hold it

    @property
    def port(self) -> int:
        return self.network.port

    @property
    def interfaces(self) -> list[str]:
        return self.network.names

    @property
    def addresses(self) -> list[str]:
        return self.network.addresses

    @property
    def model(self) -> ModelSpec | None:
        """The model as our disk describes it (its manifest may come from a peer after start)."""
        return self.disk.spec if self.disk is not None else None

    @property
    def events(self) -> deque[dict[str, Any]]:
        return self.control.events if self.control is not None else deque()

    # ----- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        try:  # first: a second daemon here must not even count a new incarnation
            self._state_lock = state.lock_state_dir(cfg.state_dir)
        except state.StateDirInUse as error:
            raise StartupError(f"{error}; give each daemon its own --state-dir") from None
        except OSError as error:
            raise StartupError(f"cannot use the state directory {cfg.state_dir}: "
                               f"{error.strerror}") from None
        before, after = raise_open_files_limit()
        if after != before:
            log.debug("open files: soft limit raised from %d to %d", before, after)
        try:
            self.network.select()
        except ValueError as error:
            raise StartupError(str(error)) from None
        model_dir = self._open_disk() if cfg.model is not None else None
        machine = measure.machine_identity()
        self.identity = state.load_identity(cfg.state_dir, machine)
        info = await self._measure()
        await self.network.read_rdma()
        self.core = ClusterNode(info, self.identity.incarnation, now(),
                                CoreConfig(cfg.timing, self.model, cfg.serving.context,
                                           self.disk.name if self.disk is not None else None, cfg.replicas,
                                           cfg.parallel))
        handlers = {"probe": lambda channel, address: self.probes.answer(channel, address),
                    "bulk": lambda channel, address: self.bulk.serve(channel, address)}
        self.connections = Connections(self._me, lambda: self.network.addresses, PeerEvents(
            self._peer_connected, self._peer_message, self._peer_disconnected, handlers), self.tasks)
        self.control = ControlPlane(self.core, self.connections, self.loop)
        self.probes = Probes(self.connections, self._me, self._link_measured)
        self.bulk = BulkService(self.connections, lambda: self.disk, self.loop)
        from tbmesh.serving.engine import Engine

        self.engine = Engine(self.host, model_dir, cfg.serving, self.disk)
        self.control.engine = self.engine
        if self.disk is not None:
            self.control.carry_out(self.core.set_disk(self.disk.state(), now()))
            disk_tasks = DiskTasks(self.disk, self.control)
            self.tasks.keep("the manifest task", disk_tasks.complete_manifest)
            self.tasks.keep("the copies task", disk_tasks.keep_copies)
        await self._start_server()
        await self._start_api()
        self._discovery = Discovery(self.network.addresses, self._advert(), self.connections.found,
                                    self.connections.removed)
        await self._discovery.start()
        await self.network.watch(self._on_interfaces_changed)
        self.control.start()
        if cfg.memory_usable is None and os.environ.get(measure.MEMORY_FILE_ENV):
            self.tasks.keep("the memory watch", lambda: self._watch_memory(MEMORY_FILE_CHECK_S))
        elif sys.platform == "darwin" and cfg.memory_usable is None:
            self.tasks.keep("the memory watch", lambda: self._watch_memory(MEMORY_CHECK_S))
        if cfg.mqtt is not None:
            self._start_telemetry(cfg.mqtt)
        # where `tbmesh status` (and tests) find this daemon's API
        found = {"url": f"http://{cfg.api_host}:{self.api_port}", "pid": os.getpid(), "port": self.port}
        if self.ollama_port is not None:
            found["ollama_url"] = f"http://{cfg.api_host}:{self.ollama_port}"
        state.write_atomically(cfg.state_dir / "api.json", json.dumps(found))
        self._up = True
        log.info("node %s (%s) up: control port %d, API http://%s:%d%s, interfaces %s %s",
                 self.core.info.name, self.core.id, self.port, cfg.api_host, self.api_port,
                 "" if self.ollama_port is None else f" (and :{self.ollama_port} for Ollama clients)",
                 ",".join(self.interfaces) or "none yet", self.addresses)
        if cfg.api_key is None and not _loopback(cfg.api_host):
            log.warning("the API listens on %s without a key: anyone who reaches it can use the model; "
                        "give one with --api-key-file", cfg.api_host)

    def _open_disk(self) -> Path:
        """The model's directory, and what of its weights is on our disk. `--model` names a
        directory, or only a model the cluster serves (its files then come from peers into
        the state directory)."""
        from tbmesh.serving.disk import Disk

        given = self.config.model
        assert given is not None
        bare_name = len(given.parts) == 1 and not given.exists()
        model_dir = self.config.state_dir / "models" / given.name if bare_name else given
        if not bare_name and not given.is_dir():
            raise StartupError(f"--model {given}: the model directory {given} does not exist")
        self.disk = Disk(self.host, given.name, model_dir, self.config.state_dir, self.config.disk_slack)
        try:
            self.disk.open()
        except ValueError as error:
            raise StartupError(f"--model {given}: {error}") from None
        return model_dir

    async def run(self) -> None:
        """Start, serve until SIGTERM, SIGINT or SIGHUP, then stop cleanly (after a failed
        start too: what it started is stopped). Raises StartupError, or DaemonFailed when a
        task it cannot do without failed."""
        # SIGHUP as SIGTERM: launchd never sends it; a closed terminal does, and then the node
        # should leave as it does at any stop (its settings are flags: nothing to reload)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self.stopped.wait()
        finally:
            await self.stop()
        if self.failure is not None:
            raise DaemonFailed(self.failure)

    def _on_signal(self, sig: int) -> None:
        if not self.stopped.is_set():
            log.info("%s: stopping", signal.Signals(sig).name)
        self.stopped.set()

    def fail(self, why: str) -> None:
        """Stop the daemon loudly: one error line, a clean stop, exit status 1."""
        if self.failure is None:
            self.failure = why
            log.critical("stopping: %s", why)
        self.stopped.set()

    async def stop(self) -> None:
        """Goodbye to peers, mDNS unregistered, everything closed."""
        if self._stopping:
            return
        self._stopping = True
        self.stopped.set()
        if self._state_lock is None:
            return  # never started (the state directory is another daemon's): nothing to undo
        if self.connections is not None:
            self.connections.stopping = True  # no new peer now: nothing starts while the rest stops
        if self.control is not None:
            self.control.carry_out(self.core.leave(now()))
            self.control.stop()
            await self.connections.drain()
        await self.network.stop_watching()
        if self._discovery is not None:
            await self._discovery.stop()
        self.network.close()
        tasks = self.tasks.cancel() + (self.connections.stop() if self.connections is not None else [])
        if tasks:  # each ends its own way (a reader closes its channel) before the loop goes
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        if self.bulk is not None:
            self.bulk.stop()
        if self.engine is not None:
            await self.engine.close()
        if self._api is not None:
            await self._api.close()
        if self.telemetry is not None:
            await self.telemetry.close()  # "offline" now, not when the broker notices
        with contextlib.suppress(OSError):
            (self.config.state_dir / "api.json").unlink()
        if self._state_lock is not None:
            state.unlock_state_dir(self._state_lock)
        if self._up:  # after a failed start, its one line is all there is to say
            log.info("stopped")

    async def _measure(self) -> NodeInfo:
        total, usable = await asyncio.to_thread(measure.memory, self.config.memory_usable)
        flops = await asyncio.to_thread(measure.measure_flops)
        assert self.identity is not None
        chip = measure.chip()  # os.cpu_count(): Apple silicon runs one thread a core
        return NodeInfo(self.identity.node_id, self.config.name, chip, total, usable, flops,
                        measure.memory_bandwidth(chip, os.cpu_count()))

    async def _start_server(self) -> None:
        """Listen for peers on the served addresses only (tbmesh.node.interfaces)."""
        try:
            failed = await self.network.listen(self.config.port, self.connections.accept)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartupError(f"control port {self.config.port} is in use (another tbmesh "
                                   "daemon?); choose another with --port") from None
            raise StartupError(f"cannot listen on port {self.config.port}: {error.strerror}") from None
        for address, error in failed.items():
            raise StartupError(f"cannot listen on {address} port {self.port}: {error.strerror}")

    async def _start_api(self) -> None:
        from tbmesh.http.common import ModelNames
        from tbmesh.http.server import Listener, allowed_hosts, make_app

        cfg = self.config
        hosts = allowed_hosts(cfg.api_host, cfg.api_allow_hosts, beyond_loopback=not _loopback(cfg.api_host))
        names = ModelNames.parse(cfg.model_aliases)
        api = Listener(make_app(self.status, self._probe_links, self.engine, api_key=cfg.api_key, hosts=hosts,
                                names=names))  # fmt: skip
        await api.start()
        ports = [("--api-port", cfg.api_port)] + ([("--ollama-port", cfg.ollama_port)] if cfg.ollama_port is not None else [])
        bound = []
        for flag, port in ports:  # one app, so the same endpoints (and key) on each port
            try:
                bound.append(await api.listen(cfg.api_host, port))
            except OSError as error:
                await api.close()
                if error.errno == errno.EADDRINUSE:
                    raise StartupError(f"port {port} ({flag}) is in use; choose another with {flag}") from None
                raise StartupError(f"cannot serve the API on {cfg.api_host}:{port}: {error.strerror}") from None
        self._api = api
        self.api_port = bound[0]
        if cfg.ollama_port is not None:
            self.ollama_port = bound[1]

    def _advert(self) -> Advert:
        assert self.core is not None
        return Advert(self.core.id, self.core.info.name, self.config.cluster,
                      wire.PROTOCOL_VERSION, self.port)

    def _me(self) -> peers.Me:
        assert self.core is not None and self.identity is not None
        return peers.Me(self.core.id, self.core.incarnation, self.core.info.name,
                        self.config.cluster, self.identity.machine, self.config.secret)

    async def _watch_memory(self, interval: float) -> None:
        """Measure the usable memory again now and then (`sysctl iogpu.wired_limit_mb` can be
        changed while we run); the leader plans again when it moved a lot. macOS only: on
        Linux the usable memory follows the free memory, which our own shard takes."""
        while True:
            await asyncio.sleep(interval)
            try:
                total, usable = await asyncio.to_thread(measure.memory, self.config.memory_usable)
            except Exception:  # a failed probe is no reason to stop watching
                log.exception("measuring memory")
                continue
            info = self.core.info
            if abs(usable - info.memory_usable) > 0.02 * info.memory_usable:
                self.control.carry_out(self.core.update_info(
                    replace(info, memory_total=total, memory_usable=usable), now()))

    def _start_telemetry(self, url: str) -> None:
        from tbmesh.node.telemetry import Telemetry

        try:
            self.telemetry = Telemetry(url, self.config.cluster, self.core.id)
        except ValueError as error:
            raise StartupError(str(error)) from None
        self.control.telemetry = self.telemetry
        self.telemetry.start()
        self.tasks.keep("the telemetry task", self._report_telemetry)

    async def _report_telemetry(self) -> None:
        """Hand the status to telemetry twice a second (status() is not free); it publishes
        only what changed, from its own task, so a slow broker never holds this loop."""
        while True:
            try:
                self.telemetry.update(self.status())
            except Exception:  # a bug in status() must not end telemetry for good
                log.exception("status for telemetry")
            await asyncio.sleep(TELEMETRY_EVERY_S)

    # ----- the connections' events, into the core -----------------------------------------

    def _peer_connected(self, channel: peers.Channel) -> None:
        peer = channel.peer_id
        self.control.carry_out(self.core.peer_connected(peer, channel.peer.incarnation, now()))
        self.control.carry_out(self.core.set_link_rdma(peer, self.network.rdma_device(channel), now()))
        if channel.dialed and self.config.probe_links:
            self.tasks.spawn(self.probes.probe(peer))

    def _peer_message(self, peer: str, message: object) -> None:
        if isinstance(message, (wire.Tensor, wire.Tokens, wire.Cancel)):
            self.engine.receive(message)
        else:  # the flush it owes is the core's next deadline: at once, after the burst
            self.control.carry_out(self.core.receive(peer, message, now()))

    def _peer_disconnected(self, peer: str) -> None:
        self.control.carry_out(self.core.peer_disconnected(peer, now()))

    def _link_measured(self, peer: str, bytes_per_s: float) -> None:
        self.control.carry_out(self.core.set_link_bandwidth(peer, bytes_per_s, now()))

    async def _probe_links(self) -> tuple[LinkStatus, ...]:
        """POST /probe: every link measured again, then the links as /status gives them."""
        await self.probes.probe_all()
        return self.status().links

    # ----- interfaces ------------------------------------------------------------------

    async def _on_interfaces_changed(self) -> None:
        if self._stopping:
            return
        if self.network.select(strict=False):
            log.info("interfaces changed: %s %s", ",".join(self.interfaces), self.addresses)
            self.connections.close_where(self.addresses)  # suspected now, not after silence
        await self._check_rdma()  # a cable plugged in: its port's RDMA is up now
        # listening there before we announce ourselves there (and again where a bind failed)
        for address, error in (await self.network.follow()).items():
            log.error("cannot listen on %s port %d: %s", address, self.port, error.strerror)
        if self._discovery is not None:
            # a cable plugged into a bridge changes no address, but there may be new peers
            # behind it: rebind if needed, announce ourselves and ask again either way
            await self._discovery.refresh(self.addresses)
        self.connections.wake_all()

    async def _check_rdma(self) -> None:
        """Read this Mac's RDMA status again and publish the device on each connection's cable."""
        await self.network.read_rdma()
        for peer, channel in list(self.connections.channels.items()):
            self.control.carry_out(self.core.set_link_rdma(peer, self.network.rdma_device(channel), now()))

    # ----- what the data plane sees (tbmesh.node.host) ---------------------------------

    def view(self) -> ClusterView:
        core = self.core
        return ClusterView(core.id, core.plan, core.preparing, core.no_fit or "", core.leader, core.shards(),
                           {n: i.name for n, i in core.node_infos().items()}, core.members(),
                           core.model, core.info.memory_usable, core.config.context, core.disks(),
                           tuple(core.links()), core.rdma_devices())

    # ----- status ----------------------------------------------------------------------

    def status(self) -> Status:
        core = self.core
        infos, shards, disks, others = core.node_infos(), core.shards(), core.disks(), core.other_models()
        stage_bytes = {s.node: s.bytes for s in core.plan.stages} if core.plan else {}

        def shard(node_id: str) -> ShardStatus | None:
            held = shards.get(node_id)
            return None if held is None else ShardStatus(held.start, held.end, held.epoch, stage_bytes.get(node_id),
                                                         held.progress, held.ready, held.serving)

        def disk(node_id: str) -> DiskStatus | None:
            if (on_disk := disks.get(node_id)) is None:
                return None
            fetching = on_disk.fetching
            return DiskStatus(on_disk.layers, on_disk.ends, on_disk.bytes, on_disk.manifest, None if fetching is None
                              else FetchStatus(fetching.done, fetching.total, fetching.bytes_per_s,
                                               tuple(infos[n].name if n in infos else n for n in fetching.sources)))

        nodes = []
        for node_id, info in sorted(infos.items()):
            state_ = core.state_of(node_id)
            role = "leader" if node_id == core.leader and state_ is not PeerState.DEAD else "follower"
            nodes.append(NodeStatus(node_id, info.name, info.chip, state_.value, info.memory_total, info.memory_usable,
                                    info.flops, role, shard(node_id), others.get(node_id), disk(node_id)))
        preparing = core.preparing
        return Status(
            node=ThisNode(core.id, core.info.name, core.incarnation, self.port, tuple(self.interfaces),
                          tuple(self.addresses)),
            cluster=self.config.cluster,
            now=self.now(),
            leader=core.leader,
            term=core.term,
            model=self.model.name if self.model else None,
            nodes=tuple(nodes),
            replicas=_replicas(core.model, disks),
            links=tuple(LinkStatus(link.a, link.b, link.bytes_per_s * 8, link.rtt_s, link.rdma)
                        for link in core.links()),
            plan=core.plan,
            preparing=None if preparing is None else Preparing(preparing, {
                s.node: (held.progress if (held := shards.get(s.node)) is not None and held.epoch == preparing.epoch
                         else 0.0) for s in preparing.stages}),
            no_fit=core.no_fit,
            runtime=self.engine.status() if self.engine else None,
            events=tuple(list(self.events)[-50:]),
        )


def _replicas(model: ModelSpec | None, disks: dict[str, DiskState]) -> tuple[int, ...] | None:
    """How many reachable disks hold each layer (None when no node says what its disk holds)."""
    if model is None or not disks:
        return None
    return tuple(sum(d.has(i, i + 1) for d in disks.values() if d.model == model.name) for i in range(model.num_layers))

