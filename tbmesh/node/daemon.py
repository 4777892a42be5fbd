"""The daemon: wires the pure cluster core to the network, on one asyncio event loop.

    discovery (zeroconf) --found--> dial loop --Channel--> frame loop --messages--> core
    core --actions--> Channel.send / close          ticker --tick--> core
    interface watcher --change--> discovery rescan + new addresses

Everything that can block (MLX, memory probes) runs in worker threads so heartbeats keep
flowing. Nothing received from the network can raise out of its own connection's task.

One rule for the background tasks: a loop that fails (the ticker, the disk's, the copies',
a dial loop, ...) is logged with its traceback and started again after a back-off
(`supervise`); a one-shot task the node cannot do without stops the daemon with one error
line and exit status 1; a connection's task that fails costs that connection, logged.
SIGTERM, SIGINT and SIGHUP all stop the daemon cleanly (goodbye to peers, api.json removed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import json
import logging
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbmesh.core.cluster import ClusterNode, CoreConfig
from tbmesh.core.membership import PeerState
from tbmesh.core.messages import Disconnect, DiskState, Event, KeepOnDisk, Send
from tbmesh.core.status import (
    DiskStatus,
    FetchStatus,
    LinkStatus,
    NodeStatus,
    Preparing,
    ShardStatus,
    Status,
    StatusEvent,
    ThisNode,
)
from tbmesh.core.types import ModelSpec, NodeInfo
from tbmesh.net import interfaces as netif
from tbmesh.net import peers, probe, rdma, wire
from tbmesh.net.discovery import Advert, Discovery, Found
from tbmesh.net.watch import InterfaceWatcher
from tbmesh.node import measure, state
from tbmesh.node.config import DaemonConfig  # the node's settings and their defaults
from tbmesh.serving.view import ClusterView
from tbmesh.weights import bulk

if TYPE_CHECKING:
    from tbmesh.core.messages import ShardState
    from tbmesh.node.telemetry import Telemetry
    from tbmesh.serving.disk import Disk
    from tbmesh.serving.engine import Engine

log = logging.getLogger("tbmesh")

PROBE_SECONDS = 0.5
MEMORY_CHECK_S = 10.0
MEMORY_FILE_CHECK_S = 0.5  # TBMESH_MEMORY_FILE: reading a file is cheap, tests want it soon
MANIFEST_CHECK_S = 0.5  # how often a node without its model's manifest looks for a peer with it
BULK_DIAL_TIMEOUT_S = 10.0  # a fetch's dial to a peer, handshake included
# Redialling a peer that refused or did not answer: doubling from the least to the most, each
# wait jittered by ±50% so that Macs that lost each other do not dial in step.
DIAL_BACKOFF_MIN = 0.1
DIAL_BACKOFF_MAX = 2.0
KEEP_CHECK_S = 2.0  # how often a node looks for copies of layers the leader asks it to keep
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # s before each restart of a failed loop in a row; the last repeats
HEALTHY_AFTER = 60.0  # s a restarted loop runs before its failures count from the start again
REFUSED_LOG_EVERY = 60.0  # s: one WARNING per remote address for connections refused, then a count
OPEN_FILES = (10240, 4096, 1024)  # soft limits on descriptors tried when the hard one is refused:
# macOS caps it at kern.maxfilesperproc, and at OPEN_MAX (10240) when the hard limit is infinite


# Events after which messages to or from the node may have been lost with its connection.
LOSSY = frozenset({"suspect", "dead", "left", "restarted"})


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


async def supervise(name: str, run: Callable[[], Awaitable[None]], backoff: Sequence[float] = RESTART_BACKOFF,
                    healthy_after: float = HEALTHY_AFTER) -> None:
    """Run the loop `run()` until it returns: each exception is logged with its traceback and
    the loop started again after a back-off (`backoff`'s next step, its last repeating; back
    to the first after a run of `healthy_after` s). Never raises but CancelledError."""
    failures = 0
    while True:
        began = time.monotonic()
        try:
            await run()
            return
        except Exception:  # CancelledError is not one: cancelling stops the loop
            if time.monotonic() - began >= healthy_after:
                failures = 0
            delay = backoff[min(failures, len(backoff) - 1)]
            failures += 1
            log.exception("%s failed (%d in a row): starting it again in %g s", name, failures, delay)
            await asyncio.sleep(delay)


class OncePer:
    """At most one log line per key (a remote address) each `every` s at its level, the next
    saying how many were held back meanwhile (those go to the debug log): refused strangers
    cannot fill the log."""

    MAX_KEYS = 4096  # past this, keys not heard from for `every` s are forgotten

    def __init__(self, every: float = REFUSED_LOG_EVERY) -> None:
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (when last logged, held back since)

    def log(self, logger: logging.Logger, level: int, key: str, message: str, *args: Any) -> bool:
        """Log `message % args` unless `key` was logged less than `every` s ago; whether it was."""
        now = time.monotonic()
        last, held = self._seen.get(key, (-self.every, 0))
        if now - last < self.every:
            self._seen[key] = (last, held + 1)
            logger.debug(message, *args)
            return False
        if len(self._seen) >= self.MAX_KEYS:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.every}
        self._seen[key] = (now, 0)
        text = message % args if args else message
        logger.log(level, "%s%s", text, f" (and {held} more from {key} in the last {now - last:.0f} s)" if held else "")
        return True


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.loop = asyncio.get_event_loop()
        self.identity: state.Identity | None = None
        self.core: ClusterNode | None = None
        self.model: ModelSpec | None = None
        self.interfaces: list[str] = []
        self.addresses: list[str] = []
        self.channels: dict[str, peers.Channel] = {}
        self.known: dict[str, Found] = {}
        self.events: collections.deque[StatusEvent] = collections.deque(maxlen=200)
        self.port = 0
        self.api_port = 0
        self.ollama_port: int | None = None  # where --ollama-port listens, once it does
        self.stopped = asyncio.Event()
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()
        self._dialers: dict[str, asyncio.Task] = {}
        self._flush_scheduled = False
        self._probe_lock = asyncio.Lock()
        self._listeners: dict[str, asyncio.Server] = {}  # control port listeners, by address
        self._discovery: Discovery | None = None
        self._watcher: InterfaceWatcher | None = None
        self._api = None
        self._state_lock: int | None = None  # the state directory's lock, held while we run
        self._stopping = False
        self._up = False  # start() completed
        self.engine: Engine | None = None  # the data plane
        self.disk: Disk | None = None  # the model's weights on our disk
        self._bulk_stop = threading.Event()  # set at stop: the bulk connections we serve end
        self._bulk_served = bulk.Served()  # the bulk connections we serve, within their caps
        self._refusals = OncePer()  # warnings of refused connections, per remote address
        self.failure: str | None = None  # why the daemon stopped on its own (exit status 1)
        self._last_view: tuple | None = None  # (plan, preparing) the engine last saw
        self._sound_links: dict[frozenset[str], dict[str, int]] = {}  # as the engine last heard
        self.telemetry: Telemetry | None = None
        self.rdma = rdma.RdmaStatus(None)  # this Mac's RDMA, read at start and when interfaces change

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
            self.interfaces = netif.select_interfaces(cfg.interfaces)
        except ValueError as error:
            raise StartupError(str(error)) from None
        self.addresses = self._current_addresses()
        model_dir = self._open_disk() if cfg.model is not None else None
        machine = measure.machine_identity()
        self.identity = state.load_identity(cfg.state_dir, machine)
        info = await self._measure()
        await self._check_rdma()
        self.core = ClusterNode(info, self.identity.incarnation, self.now(),
                                CoreConfig(cfg.timing, self.model, cfg.serving.context,
                                           self.disk.name if self.disk is not None else None, cfg.replicas,
                                           cfg.parallel))
        from tbmesh.serving.engine import Engine

        self.engine = Engine(self, model_dir, cfg.serving, self.disk)
        if self.disk is not None:
            self.carry_out(self.core.set_disk(self.disk.state(), self.now()))
            self._keep("the manifest task", self._complete_disk)
            self._keep("the copies task", self._keep_copies)
        await self._start_server()
        await self._start_api()
        self._discovery = Discovery(self.addresses, self._advert(), self._on_found, self._on_removed)
        await self._discovery.start()
        self._watcher = InterfaceWatcher(self._on_interfaces_changed)
        await self._watcher.start()
        self._keep("the ticker", self._ticker)
        if cfg.memory_usable is None and os.environ.get(measure.MEMORY_FILE_ENV):
            self._keep("the memory watch", lambda: self._watch_memory(MEMORY_FILE_CHECK_S))
        elif sys.platform == "darwin" and cfg.memory_usable is None:
            self._keep("the memory watch", lambda: self._watch_memory(MEMORY_CHECK_S))
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
        self.disk = Disk(self, given.name, model_dir, self.config.state_dir, self.config.disk_slack)
        try:
            self.disk.open()
        except ValueError as error:
            raise StartupError(f"--model {given}: {error}") from None
        self.model = self.disk.spec
        return model_dir

    async def _complete_disk(self) -> None:
        """Hash our model into its manifest, or take the manifest from a peer when we lack
        the weights; publish what our disk holds each time it changes."""
        disk = self.disk
        assert disk is not None
        if disk.manifest is None:
            try:
                await asyncio.to_thread(disk.build)
            except (OSError, ValueError) as error:
                log.error("cannot hash the model in %s, so no peer can fetch from us: %s", disk.model_dir, error)
            self.disk_changed(disk.state())
        tried: dict[str, int] = {}
        while disk.manifest is None:
            await asyncio.sleep(MANIFEST_CHECK_S)
            peer_disks = [d for n, d in self.core.disks().items() if n != self.core.id and d.model == disk.name]
            offers = {(d.manifest, d.manifest_bytes) for d in peer_disks if d.manifest}
            parts = {d.part: d.part_bytes for d in peer_disks if d.part}
            if not offers and disk.part is not None and parts and parts != tried:
                tried = parts  # every Mac holds a part: the whole is their union, once they hold it all
                try:
                    if await asyncio.to_thread(disk.assemble, disk.peers(), parts):
                        self.model = disk.spec
                        self.disk_changed(disk.state())
                except (OSError, ValueError, bulk.FetchFailed) as error:
                    log.warning("cannot make the manifest of %s from the parts yet: %s", disk.name, error)
                    tried = {}
                continue
            if not offers:
                continue
            if len(offers) > 1:
                log.warning("peers hold different models named %s: taking the cluster's", disk.name)
            wanted = self.core.model_manifest()  # the one the leader plans for, see ClusterNode
            digest, nbytes = min(offers, key=lambda offer: (offer[0] != wanted, offer))
            try:
                await asyncio.to_thread(disk.take_manifest, disk.peers(), digest, nbytes)
            except (OSError, ValueError, bulk.FetchFailed) as error:  # a manifest that does not parse
                log.warning("cannot take the manifest of %s from peers yet: %s", disk.name, error)
                continue
            self.model = disk.spec
            log.info("took the manifest of %s from a peer: %d tensors, %d layers", disk.name,
                     len(disk.manifest.tensors), disk.spec.num_layers if disk.spec else 0)
            self.disk_changed(disk.state())

    async def _keep_copies(self) -> None:
        """Fetch the copies of layers the leader asks us to keep on disk (tbmesh.core.replicas),
        while no stage fetch needs the cables."""
        disk = self.disk
        assert disk is not None
        asked: KeepOnDisk | None = None
        while True:
            await asyncio.sleep(KEEP_CHECK_S)
            if await asyncio.to_thread(disk.refresh):  # a weight file deleted, a disk unmounted
                self.disk_changed(disk.state())
            # only what the leader has asked for a while, with a plan committed: copies asked
            # while Macs join and plans change would be fetched for nothing
            keep, before = self.core.my_keep(), asked
            asked = keep
            if keep != before or self.core.plan is None or self.core.preparing is not None:
                continue
            stages = [(s.start, s.end) for s in self.core.plan.stages if s.node == self.core.id]
            if freed := disk.trim(stages, keep):
                log.info("let go of %.1f MB of weights on disk that no stage or copy needs (--disk-slack)", freed / 1e6)
                self.disk_changed(disk.state())
            if keep is None:
                continue
            missing = disk.kept_missing(keep)
            if not missing:
                continue
            log.info("keeping a copy of %s on disk for the cluster: %.1f MB to fetch", _layers_text(keep),
                     sum(e.object_size for e in missing) / 1e6)
            try:
                report = await asyncio.to_thread(disk.fetch, missing, disk.peers(), copies=True)
            except (OSError, ValueError, bulk.FetchFailed) as error:
                log.warning("cannot keep a copy of %s yet: %s", _layers_text(keep), error)
            else:
                log.info("kept a copy of %s%s", _layers_text(keep), " (paused for a stage's fetch)" if report.stopped else "")
            self.disk_changed(disk.state())

    def disk_changed(self, disk: DiskState | None) -> None:
        if disk != self.core.disk:
            self.carry_out(self.core.set_disk(disk, self.now()))

    def bulk_connect(self, node: str) -> peers.Detached:
        """A bulk connection to `node` (from a fetch's thread: the dial runs on the loop)."""
        future = asyncio.run_coroutine_threadsafe(self._dial_bulk(node), self.loop)
        return future.result(BULK_DIAL_TIMEOUT_S)

    async def _dial_bulk(self, node: str) -> peers.Detached:
        found = self.known.get(node)
        if found is None:
            raise ConnectionError(f"no address known for {node}")
        try:
            channel = await self._dial_any(found, "bulk")
        except peers.Refused as error:
            raise ConnectionError(str(error)) from None
        return channel.detach()

    async def _serve_bulk(self, channel: peers.Channel, address: str) -> None:
        """A peer fetches weights from us: a thread of its own, blocking sends (sendfile),
        within the caps of bulk.Served (else refused at once, saying why)."""
        local = self.disk.serving() if self.disk is not None else None
        if local is None:
            why: str | None = "refused: no weights to serve here"
            await bulk.refuse(channel, why)
        else:
            why = await bulk.serve_or_refuse(channel, local, self._bulk_served, self._bulk_stop)
        if why is not None:
            self._refusals.log(log, logging.WARNING, address, "refused a bulk connection from %s (%s): %s",
                               channel.peer.name, address, why)

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
        if self.core is not None:
            self.carry_out(self.core.leave(self.now()))
        await asyncio.gather(*(c.drain() for c in list(self.channels.values())))
        if self._watcher is not None:
            await self._watcher.stop()
        if self._discovery is not None:
            await self._discovery.stop()
        for listener in self._listeners.values():
            listener.close()  # no new peer now: nothing starts while the rest stops
        tasks = list(self._tasks) + list(self._dialers.values())
        for task in tasks:
            task.cancel()
        for channel in list(self.channels.values()):
            channel.close("daemon stopping")
        if tasks:  # each ends its own way (a reader closes its channel) before the loop goes
            await asyncio.wait(tasks, timeout=5)
        self._bulk_stop.set()
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
        """Listen for peers on the served addresses only, never 0.0.0.0: nothing on Wi-Fi or
        Ethernet can even connect. mDNS advertises one port for all addresses, so the number
        is settled here, at start, even with no cable yet: the one asked for if nothing
        listens on it at any address, or with --port 0 one the kernel finds free on all
        of them. Addresses that appear later are listened on with that number
        (_follow_addresses); something else may take it meanwhile, which is then logged."""
        try:
            self.port = _port_free_everywhere(self.config.port)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartupError(f"control port {self.config.port} is in use (another tbmesh "
                                   "daemon?); choose another with --port") from None
            raise StartupError(f"cannot listen on port {self.config.port}: {error.strerror}") from None
        for address, error in (await self._follow_addresses(self.addresses)).items():
            raise StartupError(f"cannot listen on {address} port {self.port}: {error.strerror}")

    async def _follow_addresses(self, addresses: list[str]) -> dict[str, OSError]:
        """Listen on each of `addresses` and on no other; returns those that failed to bind
        (tried again at the next interface change)."""
        for address in [a for a in self._listeners if a not in addresses]:
            # its connections are closed by _on_interfaces_changed (close() leaves them open)
            self._listeners.pop(address).close()
            log.info("control port closed on %s", address)
        failed: dict[str, OSError] = {}
        for address in addresses:
            if address not in self._listeners:
                try:
                    self._listeners[address] = await asyncio.start_server(
                        self._on_accept, host=address, port=self.port)
                except OSError as error:
                    failed[address] = error
        return failed

    async def _start_api(self) -> None:
        from tbmesh.http.server import Listener, allowed_hosts, make_app

        cfg = self.config
        hosts = allowed_hosts(cfg.api_host, cfg.api_allow_hosts, beyond_loopback=not _loopback(cfg.api_host))
        api = Listener(make_app(self.status, self._probe_links, self.engine, api_key=cfg.api_key, hosts=hosts))
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

    def _spawn(self, coro: Awaitable[None], vital: str | None = None) -> asyncio.Task:
        """A one-shot task, cancelled at stop. One that fails is logged with its traceback;
        a `vital` one (its name) stops the daemon (self.fail): the node cannot go on without it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._task_done(done, vital))
        return task

    def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """A loop for the daemon's life, started again whenever it fails (`supervise`)."""
        return self._spawn(supervise(name, run), vital=name)  # supervise raises only if it has a bug

    def _task_done(self, task: asyncio.Task, vital: str | None) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("%s failed: %r", vital or "a task", error, exc_info=error)
        if vital is not None:
            self.fail(f"{vital} failed: {' '.join(str(error).split())[:200] or type(error).__name__}")

    # ----- the core's clock and actions ------------------------------------------------

    @staticmethod
    def now() -> float:
        # not loop.time(): uvloop's counts whole milliseconds, too coarse for a Thunderbolt RTT
        return time.monotonic()

    async def _ticker(self) -> None:
        interval = self.config.timing.heartbeat_interval / 4
        while True:
            await asyncio.sleep(interval)
            self.carry_out(self.core.tick(self.now()))

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
                self.carry_out(self.core.update_info(
                    replace(info, memory_total=total, memory_usable=usable), self.now()))

    def _start_telemetry(self, url: str) -> None:
        from tbmesh.node.telemetry import Telemetry

        try:
            self.telemetry = Telemetry(url, self.config.cluster, self.core.id)
        except ValueError as error:
            raise StartupError(str(error)) from None
        self.telemetry.start()
        self._keep("the telemetry task", self._report_telemetry)

    async def _report_telemetry(self) -> None:
        """Hand the status to telemetry twice a second (status() is not free); it publishes
        only what changed, from its own task, so a slow broker never holds this loop."""
        while True:
            try:
                self.telemetry.update(self.status())
            except Exception:  # a bug in status() must not end telemetry for good
                log.exception("status for telemetry")
            await asyncio.sleep(0.5)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.carry_out(self.core.flush(self.now()))

    def carry_out(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                channel = self.channels.get(action.to)
                if channel is not None:
                    channel.send(action.message)
            elif isinstance(action, Disconnect):
                channel = self.channels.get(action.peer)
                if channel is not None:
                    channel.close("declared dead")
        for event in self.core.drain_events():
            self._record(event)
            if event.kind in LOSSY and event.node is not None and self.engine is not None:
                self.engine.on_node_trouble(event.node, gone=event.kind != "suspect")
        sound = self.core.sound_links()
        if sound != self._sound_links:
            troubled, self._sound_links = self.core.troubled_links(self._sound_links, sound), sound
            for pair in troubled if self.engine is not None else ():
                self.engine.on_link_trouble(*sorted(pair))
        view = (self.core.plan, self.core.preparing)
        if self.engine is not None and view != self._last_view:
            self._last_view = view
            self.engine.on_view(*view)
        elif self.engine is not None:
            self.engine.on_cluster_change()  # a member's shard, a suspicion: waiting requests look again

    def send(self, node: str, message: object) -> bool:
        """Send to `node` directly, or through the neighbour on the shortest path to it
        (a chain of Macs without a bridge: the entry and stage 0 may be two cables apart)."""
        channel = self.channels.get(node) or self.channels.get(self._next_hop(node) or "")
        return channel is not None and channel.send(message)

    def group_addresses(self, members: Sequence[str]) -> list[str]:
        """The IP address each member of a tensor group is reached at, from here: a member's,
        the far end of our connection to it; ours, the near end of our connection to the
        member before us (the ring's neighbour that dials us; a group's members are cabled
        all to all). Raises ConnectionError when we have no connection to a member."""
        me = self.core.id
        behind = members[(members.index(me) - 1) % len(members)]
        found = []
        for member in members:
            channel = self.channels.get(behind if member == me else member)
            name = "sockname" if member == me else "peername"
            address = channel.writer.get_extra_info(name) if channel is not None else None
            if not address:
                other = behind if member == me else member
                raise ConnectionError(f"no direct connection to {self.view().name(other)}, a member of the group")
            found.append(address[0])
        return found

    def _next_hop(self, node: str) -> str | None:
        graph: dict[str, set[str]] = collections.defaultdict(set)
        for link in self.core.links():
            graph[link.a].add(link.b)
            graph[link.b].add(link.a)
        first_hop = {n: n for n in graph[self.core.id] if n in self.channels}
        queue = collections.deque(sorted(first_hop))
        while queue:
            here = queue.popleft()
            if here == node:
                return first_hop[here]
            for there in sorted(graph[here]):
                if there not in first_hop and there != self.core.id:
                    first_hop[there] = first_hop[here]
                    queue.append(there)
        return None

    # ----- what the serving engine is handed (tbmesh.serving.host.Host) -----------------

    @property
    def me(self) -> str:
        return self.core.id

    @property
    def name(self) -> str:
        return self.core.info.name

    def view(self) -> ClusterView:
        core = self.core
        return ClusterView(core.id, core.plan, core.preparing, core.no_fit or "", core.leader, core.shards(),
                           {n: i.name for n, i in core.node_infos().items()}, core.members(),
                           core.model, core.info.memory_usable, core.config.context, core.disks(),
                           tuple(core.links()), core.rdma_devices())

    def shard_changed(self, state: ShardState | None) -> None:
        if state != self.core.shard:
            self.carry_out(self.core.set_shard(state, self.now()))

    def record(self, kind: str, node: str | None, detail: str) -> None:
        """An event of the data plane (a request resumed, ...) for the event log."""
        self._record(Event(self.now(), kind, node, detail))

    def _record(self, event: Event) -> None:
        self.events.append(StatusEvent(event.at, event.kind, event.node, event.detail))
        log.info("%s %s", event.kind, event.detail)
        if self.telemetry is not None:
            self.telemetry.event(self.events[-1])

    # ----- connections -----------------------------------------------------------------

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")
        if self._stopping or local is None or local[0] not in self.addresses:
            writer.close()  # stopping, or a connection on an interface we do not serve (Wi-Fi, Ethernet)
            return
        remote = writer.get_extra_info("peername")
        address = str(remote[0]) if remote else "?"
        try:
            channel = await peers.answer(reader, writer, self._me())
        except peers.Refused as error:  # a stranger may try again and again: a line a minute
            self._refusals.log(log, logging.WARNING, address, "refused a connection from %s: %s", address, error)
            return
        except (OSError, ConnectionError, asyncio.CancelledError):  # cancelled: the daemon stops
            writer.close()
            return
        if channel.peer.purpose == "probe":
            await self._answer_probe(channel)
        elif channel.peer.purpose == "bulk":
            await self._serve_bulk(channel, address)
        elif (first := await self._first_message(channel)) is not None:
            self._adopt(channel, first)

    async def _first_message(self, channel: peers.Channel) -> object | None:
        """The first message on a peer connection we accepted; None when the dialer refused our
        Welcome, closed, or said nothing in time. A dialer refuses the Welcome of a node other
        than the one it meant to reach (a stray mDNS record or a relay led it to us under another
        id); a dialer that meant us sends its heartbeat at once. Until then the connection is
        not ours to keep: adopting it would replace the one we have with that node, at each dial."""

        try:
            message = await asyncio.wait_for(channel.receive(), peers.HANDSHAKE_TIMEOUT)
            if message is None:
                raise ConnectionError("closed after our welcome")
        except asyncio.CancelledError:  # the daemon stops
            channel.close("daemon stopping")
            return None
        except (OSError, asyncio.TimeoutError, wire.ProtocolError) as error:
            log.info("a connection from %s ended before its first message: %s", channel.peer.name,
                     error or "timed out")
            channel.close("no first message")
            return None
        if isinstance(message, wire.Refuse):
            log.info("a connection from %s was not meant for us: %s", channel.peer.name, message.reason)
            channel.close("refused by its dialer")
            return None
        return message

    def _adopt(self, channel: peers.Channel, first: object | None = None) -> None:
        """A handshaken peer connection: keep it (or the one we had) and start reading
        (`first`: the message already read from it)."""
        if self._stopping:
            channel.close("daemon stopping")
            return
        peer = channel.peer_id
        existing = self.channels.get(peer)
        if existing is not None and not existing.closed:
            if not self._prefer(channel, existing):
                channel.close("duplicate connection")
                return
            existing.close("replaced by a newer connection")
        self.channels[peer] = channel
        self.carry_out(self.core.peer_connected(peer, channel.peer.incarnation, self.now()))
        self.carry_out(self.core.set_link_rdma(peer, self._rdma_device(channel), self.now()))
        self._spawn(self._read(channel, first))
        if channel.dialed and self.config.probe_links:
            self._spawn(self._probe(peer))

    def _prefer(self, new: peers.Channel, old: peers.Channel) -> bool:
        """Both ends dialled at once: both keep the connection the smaller id dialled."""
        if new.peer.incarnation != old.peer.incarnation:
            return new.peer.incarnation > old.peer.incarnation
        smaller_dialled = (self.core.id < new.peer_id) == new.dialed
        return smaller_dialled

    async def _read(self, channel: peers.Channel, first: object | None = None) -> None:
        peer = channel.peer_id
        try:
            async for message in _then(first, channel.messages()):
                if self.channels.get(peer) is not channel:
                    break
                try:
                    if isinstance(message, (wire.Tensor, wire.Tokens, wire.Cancel)):
                        self.engine.receive(message)
                        continue
                    self.carry_out(self.core.receive(peer, message, self.now()))
                except wire.ProtocolError as error:
                    log.warning("dropping %s: %s", channel.peer.name, error)
                    channel.close(f"protocol error: {error}")
                    break
                except Exception:  # a bug must cost one connection, not the daemon
                    log.exception("handling a message from %s", peer)
                    channel.close("internal error")
                    break
                self._schedule_flush()
        finally:
            channel.close(channel.close_reason or "reader stopped")
            if self.channels.get(peer) is channel:
                del self.channels[peer]
                log.info("connection to %s closed: %s", channel.peer.name, channel.close_reason)
                self.carry_out(self.core.peer_disconnected(peer, self.now()))
                self._wake_dialer(peer)

    # ----- discovery and dialling ------------------------------------------------------

    def _on_found(self, found: Found) -> None:
        if self._stopping or found.node_id == self.core.id:
            return
        if found.version != wire.PROTOCOL_VERSION:
            if self.known.get(found.node_id) != found:
                log.warning("not connecting to %s: it speaks protocol %d, we speak %d",
                            found.name, found.version, wire.PROTOCOL_VERSION)
            self.known[found.node_id] = found
            return
        self.known[found.node_id] = found
        if found.node_id not in self._dialers or self._dialers[found.node_id].done():
            peer = found.node_id
            self._dialers[peer] = asyncio.ensure_future(
                supervise(f"the dial loop to {found.name}", lambda: self._dial_loop(peer)))
        self._wake_dialer(found.node_id)

    def _on_removed(self, node_id: str) -> None:
        """A record went. Heartbeats decide whether a connected peer is gone (mDNS goodbyes
        are hints at best); a node we are not connected to is no longer dialled."""
        if node_id not in self.channels and self.known.pop(node_id, None) is not None:
            self._wake_dialer(node_id)  # its dial loop sees no record and ends

    def _wake_dialer(self, peer: str) -> None:
        self._wake.setdefault(peer, asyncio.Event()).set()

    async def _dial_loop(self, peer: str) -> None:
        """Keep one connection to `peer` while discovery knows it; back off on failure."""
        wake = self._wake.setdefault(peer, asyncio.Event())
        # usually the smaller id dials; the other waits a little to avoid crossing dials
        backoff = 0.0 if self.core.id < peer else DIAL_BACKOFF_MIN * 3
        last_error = ""
        while not self._stopping:
            channel = self.channels.get(peer)
            if channel is not None:
                if channel.closed:  # its reader has not cleaned up yet: let it run
                    await asyncio.sleep(0.02)
                else:
                    wake.clear()
                    await wake.wait()
                    backoff = 0.0
                continue
            if backoff:
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), backoff * random.uniform(0.5, 1.5))
                if peer in self.channels:
                    continue  # it dialled us meanwhile
            found = self.known.get(peer)
            if found is None or found.version != wire.PROTOCOL_VERSION:
                return  # its record went (or never was one we can speak to)
            try:
                channel = await self._dial_any(found)
            except (peers.Refused, OSError) as error:
                if str(error) != last_error:
                    log.info("cannot connect to %s: %s", found.name, error)
                    last_error = str(error)
                backoff = min(max(backoff * 2, DIAL_BACKOFF_MIN), DIAL_BACKOFF_MAX)
                continue
            last_error = ""
            self._adopt(channel)

    async def _dial_any(self, found: Found, purpose: str = "peer") -> peers.Channel:
        """Dial every advertised address at once; the first handshake wins.
        (A peer advertises all its cables' addresses; only some are reachable from here.)"""
        me = self._me()
        pending = {asyncio.ensure_future(peers.dial(a, found.port, me, purpose, expect=found.node_id))
                   for a in found.addresses}
        winner: peers.Channel | None = None
        refused: peers.Refused | None = None
        errors: list[BaseException] = []
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None and winner is None:
                        winner = task.result()
                    elif error is None:
                        task.result().close("another address answered first")
                    elif isinstance(error, peers.Refused):
                        refused = error
                    else:
                        errors.append(error)
        finally:
            for task in pending:
                task.cancel()
        if winner is not None:
            return winner
        if refused is not None:
            raise refused
        raise OSError(f"no address answered ({'; '.join(str(e) for e in errors[:3])})")

    # ----- link measurement ------------------------------------------------------------

    async def _probe(self, peer: str) -> None:
        """Measure the link's bandwidth on a separate connection, one probe at a time."""
        async with self._probe_lock:
            found = self.known.get(peer)
            channel = self.channels.get(peer)
            if found is None or channel is None:
                return
            try:
                host = channel.writer.get_extra_info("peername")[0]
                probe_channel = await peers.dial(host, found.port, self._me(), "probe", expect=peer)
                try:
                    if not await asyncio.wait_for(probe_channel.read(), 2):  # "go"
                        raise ConnectionError("the peer closed before the probe")
                    result = await probe.probe_send(probe_channel, PROBE_SECONDS)
                finally:
                    probe_channel.close("probe done")
            except (peers.Refused, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    probe.ProbeError, wire.ProtocolError) as error:
                log.info("bandwidth probe to %s failed: %s", peer, error)
                return
            self.carry_out(self.core.set_link_bandwidth(peer, result.bytes_per_s, self.now()))
            log.info("link to %s: %.2f Gbit/s", found.name, result.bytes_per_s * 8 / 1e9)

    async def _answer_probe(self, channel: peers.Channel) -> None:
        try:
            channel.write([b"G"])  # the dialer streams only after this: nothing is buffered
            result = await probe.probe_receive(channel)
            # both ends publish the figure the receiver measured
            self.carry_out(self.core.set_link_bandwidth(channel.peer_id, result.bytes_per_s,
                                                         self.now()))
        except (OSError, asyncio.TimeoutError, probe.ProbeError, wire.ProtocolError) as error:
            log.info("bandwidth probe from %s failed: %s", channel.peer.name, error)
        finally:
            channel.close("probe done")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(p) for p in list(self.channels)))

    async def _probe_links(self) -> tuple[LinkStatus, ...]:
        """POST /probe: every link measured again, then the links as /status gives them."""
        await self.probe_all()
        return self.status().links

    # ----- interfaces ------------------------------------------------------------------

    def _current_addresses(self) -> list[str]:
        found = netif.interface_addresses(self.interfaces)
        return sorted({a for addrs in found.values() for a in addrs if ":" not in a})

    async def _on_interfaces_changed(self) -> None:
        if self._stopping:
            return
        self.interfaces = netif.select_interfaces(self.config.interfaces, strict=False)
        addresses = self._current_addresses()
        if addresses != self.addresses:
            log.info("interfaces changed: %s %s", ",".join(self.interfaces), addresses)
            self.addresses = addresses
            for channel in list(self.channels.values()):
                local = channel.writer.get_extra_info("sockname")
                if local is not None and local[0] not in addresses:
                    channel.close("its interface went away")  # suspected now, not after silence
        await self._check_rdma()  # a cable plugged in: its port's RDMA is up now
        # listening there before we announce ourselves there (and again where a bind failed)
        for address, error in (await self._follow_addresses(addresses)).items():
            log.error("cannot listen on %s port %d: %s", address, self.port, error.strerror)
        if self._discovery is not None:
            # a cable plugged into a bridge changes no address, but there may be new peers
            # behind it: rebind if needed, announce ourselves and ask again either way
            await self._discovery.refresh(addresses)
        for peer in list(self.known):
            self._wake_dialer(peer)

    async def _check_rdma(self) -> None:
        """Read this Mac's RDMA status (tbmesh.net.rdma) and publish the device on each
        connection's cable: links whose two ends publish one run groups over jaccl."""
        status = await asyncio.to_thread(rdma.rdma_status)
        if status != self.rdma:
            active = [d.name for d in status.devices if d.active or not d.port_states]
            log.info("RDMA: %s", status.why_not or f"enabled, devices up: {', '.join(active) or 'none'}")
        self.rdma = status
        for peer, channel in list(self.channels.items()) if self.core is not None else ():
            self.carry_out(self.core.set_link_rdma(peer, self._rdma_device(channel), self.now()))

    def _rdma_device(self, channel: peers.Channel) -> str:
        local = channel.writer.get_extra_info("sockname")
        if local is None or not self.rdma.usable:
            return ""
        return rdma.link_device(local[0], netif.interface_addresses(self.interfaces), self.rdma)

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


async def _then(first: object | None, messages: AsyncIterator[object]) -> AsyncIterator[object]:
    """`first` (unless None), then `messages`."""
    if first is not None:
        yield first
    async for message in messages:
        yield message


def _port_free_everywhere(port: int) -> int:
    """`port` when no socket listens on it at any address, or with 0 a port no socket does
    (the kernel's choice); raises OSError (EADDRINUSE). Bound with SO_REUSEADDR as asyncio's
    listeners are: connections of an earlier run left in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # the wildcard conflicts with a listener on any address
        return sock.getsockname()[1]


def _layers_text(keep: KeepOnDisk) -> str:
    parts = [f"layers {a}-{b - 1}" if b - a > 1 else f"layer {a}" for a, b in keep.layers]
    return ", ".join(parts + [{"first": "the embedding", "last": "the head"}[end] for end in keep.ends])


def _replicas(model: ModelSpec | None, disks: dict[str, DiskState]) -> tuple[int, ...] | None:
    """How many reachable disks hold each layer (None when no node says what its disk holds)."""
    if model is None or not disks:
        return None
    return tuple(sum(d.has(i, i + 1) for d in disks.values() if d.model == model.name) for i in range(model.num_layers))
