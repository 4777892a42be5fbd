"""The worker process of one rank of a tensor group, and its parent's handle on it.

An mx.distributed group cannot be made twice in a process (init() returns the cached group),
so every incarnation of a group is one worker process per rank, which the daemon on that
rank's Mac starts and stops (`Worker.start`), and a worker that dies is a stage that died:

    parent (daemon) ==unix socket== rank 0 worker ----control (TCP)----> rank k worker == its parent
                                        \\________ mx.distributed (ring / jaccl) ________/

A worker joins the group (MLX's environment: tbmesh.runtime.tensor.ring_environment for
ring, tbmesh.net.rdma.jaccl_environment for jaccl), loads its share of layers [start, end)
(tbmesh.runtime.tensor), tells its parent it is ready, then runs what rank 0's parent asks,
on every rank in the same order:

    step   a Step (tbmesh.serving.messages) and its input: every rank runs it through its own
           StageCaches (tbmesh.serving.stage), which keep the KV caches of the requests here
           keyed by attempt, as a node's do; rank 0 answers with the Outcome (the hidden
           states or the sampled tokens) and what the caches now hold
    drop   forget the caches of the routes named (StageCaches.drop)
    stop   every rank exits

So a group stands in for a node's Shard + StageCaches: the engine hands the step to
`Worker.run` instead of `StageCaches.run`. The ops are wire.Tensor frames (made and read in
tbmesh.serving.messages), over blocking connections (tbmesh.net.blocking).

Rank 0 passes each op on to the other ranks over a TCP connection of its own (the control
channel), not over mx.distributed: measured here (MLX 0.32.4), a ring rank waiting 3 s in an
all_sum burned 2.98 s of CPU, so an idle group would spin a core per rank, while a socket's
reader sleeps. It also tells every rank at once that another died, even between steps (its
socket closes with its process; ring itself raises "connection to a peer was lost" at once
when a peer's sockets close during a collective, but hangs, spinning, when the peer stops
without closing them). So a worker exits when its parent's connection closes (its parent
went away), when the control channel closes (another rank died), and when an op takes
longer than `step_timeout` (a peer that vanished without closing anything: a Mac switched
off, a cable pulled).

    python -m tbmesh.serving.tensor_worker MODEL_DIR START END --fd N --control HOST:PORT [--weights JSON]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tbmesh.net import wire
from tbmesh.net.blocking import Connection
from tbmesh.serving.messages import (
    Held,
    Outcome,
    Range,
    Route,
    Step,
    held_frame,
    held_of,
    op_frame,
    outcome_frame,
    outcome_of,
    step_frame,
)

STEP_TIMEOUT_S = 120.0  # a step (or a load) longer than this means a rank is gone
CONNECT_TIMEOUT_S = 60.0  # ranks joining the control channel, and loading, at most
READY_POLL_S = 0.25  # how often a parent waiting for its worker to be ready asks whether to give up


class GroupFailed(RuntimeError):
    """The group cannot go on (a rank died, its parent left, a step timed out); one line."""


# --- the worker --------------------------------------------------------------------------------


class Control:
    """The control channel: rank 0 sends every op to the other ranks, which wait for it on
    a socket (sleeping, not spinning), and which all notice at once when another one dies."""

    def __init__(self, rank: int, size: int, address: str, timeout: float) -> None:
        host, _, port = address.rpartition(":")
        self.rank, self.peers = rank, []
        self.stopping = False  # a stop is on its way: the others close their ends, as they should
        if size == 1:
            return
        if rank == 0:
            with socket.create_server((host, int(port)), reuse_port=False) as server:
                server.settimeout(timeout)
                for _ in range(size - 1):
                    sock, _ = server.accept()
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.peers.append(Connection(sock))
            threading.Thread(target=self._watch, daemon=True, name="control-watch").start()
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    sock = socket.create_connection((host, int(port)), timeout=1.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise GroupFailed(f"rank {rank}: rank 0's control channel {address} never answered") from None
                    time.sleep(0.05)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peers.append(Connection(sock))

    def pass_on(self, message: wire.Tensor) -> None:
        """Rank 0: the op to every other rank."""
        for peer in self.peers:
            try:
                peer.send(message)
            except OSError:
                _die("another rank of the group is gone")

    def next(self) -> wire.Tensor:
        """Rank k: the next op from rank 0; a closed channel means rank 0 died."""
        message = self.peers[0].receive()
        if message is None:
            _die("rank 0 of the group is gone")
        return message

    def _watch(self) -> None:
        """Rank 0: the other ranks never write, so a readable socket is one that closed."""
        socks = [peer.sock for peer in self.peers]
        while True:
            ready, _, _ = select.select(socks, [], [])
            for sock in ready:
                with contextlib.suppress(OSError):
                    if sock.recv(4096):
                        continue  # never sent; read and ignored, so it cannot spin this loop
                if not self.stopping:
                    _die("another rank of the group is gone")
                return


_parent: Connection | None = None


def _die(why: str, status: int = 1) -> None:
    """End the worker at once, from any thread, telling the parent why if it still listens."""
    if _parent is not None:
        with contextlib.suppress(OSError, ValueError, TimeoutError):
            _parent.send(op_frame("error", reason=why), timeout=1.0)
    os._exit(status)


class Watchdog:
    """Ends the worker when one op runs longer than it may (a peer that vanished without
    closing its sockets leaves the others waiting in a collective forever)."""

    TICK_S = 0.25

    def __init__(self) -> None:
        self.deadline: tuple[float, str] | None = None
        threading.Thread(target=self._run, daemon=True, name="watchdog").start()

    def arm(self, seconds: float, what: str) -> None:
        self.deadline = (time.monotonic() + seconds, f"{what} took more than {seconds:g} s")

    def disarm(self) -> None:
        self.deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_S)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline[0]:
                _die(f"{deadline[1]}: a rank of the group is gone")


def _read_parent(parent: Connection, inbox: queue.Queue) -> None:
    """Every message of the parent into `inbox`; the worker ends when the parent goes away."""
    while True:
        try:
            message = parent.receive()
        except (OSError, wire.ProtocolError):
            message = None
        if message is None:
            os._exit(0)
        inbox.put(message)


def serve(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from tbmesh.runtime.tensor import load_tensor_shard
    from tbmesh.serving.stage import StageCaches

    global _parent
    parent = _parent = Connection(socket.socket(fileno=args.fd))
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read_parent, args=(parent, inbox), daemon=True, name="parent").start()
    watchdog = Watchdog()
    watchdog.arm(CONNECT_TIMEOUT_S, "joining the group and loading")
    group = mx.distributed.init(backend=args.backend, strict=True)
    rank, size = group.rank(), group.size()
    control = Control(rank, size, args.control, CONNECT_TIMEOUT_S)
    tensors = None
    if args.weights is not None:  # fetched from peers: in the store, not all in the model's files
        from tbmesh.weights.store import load_places

        places = {name: tuple(place) for name, place in json.loads(args.weights.read_text()).items()}
        tensors = lambda: load_places(places)  # noqa: E731
    shard = load_tensor_shard(args.model, args.start, args.end, group, tensors)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank has loaded
    watchdog.disarm()
    parent.send(op_frame("ready", rank=rank, size=size, weight_bytes=shard.weight_bytes))
    from tbmesh.weights.modeldir import load_tokenizer

    tokenizer = functools.cache(lambda: load_tokenizer(args.model))  # for the grammars of a last stage, once
    caches = StageCaches(args.node, args.name, tokenizer)
    while True:
        if rank == 0:
            message = inbox.get()
            control.stopping = message.meta.get("op") == "stop"
            control.pass_on(message)
        else:
            message = control.next()
        op = message.meta.get("op")
        if op == "stop":
            return 0
        watchdog.arm(args.step_timeout, f"a {op}")
        if op == "step":
            step = Step.from_meta(message.meta)
            x = wire.array_from_tensor(message) if step.kind != "flush" else None
            outcome = caches.run(shard, step, x)
            if outcome.out is not None:
                mx.eval(outcome.out)
        elif op == "drop":
            gone = {tuple(tuple(s) for s in route) for route in message.meta["routes"]}
            caches.drop(lambda route, gone=gone: route not in gone)
            outcome = None
        else:
            raise wire.ProtocolError(f"unknown op {op!r:.40}")
        watchdog.disarm()
        if rank == 0:
            held = Held(frozenset(caches.in_use()), caches.figures(), tuple(caches.routes()), caches.attempts())
            parent.send(outcome_frame(outcome, held) if outcome is not None else held_frame(held))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One rank of a tbmesh tensor group (started by the daemon).")
    parser.add_argument("model", type=Path)
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("--fd", type=int, required=True, help="the parent's connection (inherited)")
    parser.add_argument("--control", required=True, help="HOST:PORT rank 0 listens on for the other ranks")
    parser.add_argument("--backend", default="ring", choices=("ring", "jaccl"))
    parser.add_argument("--node", default="", help="the node id routes name this stage by")
    parser.add_argument("--name", default="tensor group", help="the stage's name in error messages")
    parser.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT_S)
    parser.add_argument("--weights", type=Path, help="JSON {tensor: [safetensors file, name in it]} of tensors "
                                                     "not in MODEL_DIR's files (tbmesh.weights.store.Local.places)")
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except Exception as error:  # noqa: BLE001  (the parent reads why, in one line)
        _die(f"{type(error).__name__}: {' '.join(str(error).split())}"[:500])
        return 1


# --- the parent's side --------------------------------------------------------------------------


class Worker:
    """A rank's worker process, seen from its parent. Rank 0's parent runs the steps."""

    def __init__(self, process: subprocess.Popen, connection: Connection) -> None:
        self.process = process
        self.connection = connection
        self.rank = self.size = self.weight_bytes = 0
        self.held = Held()

    @classmethod
    def start(cls, model_dir: str | Path, start: int, end: int, env: dict[str, str], control: str,
              backend: str = "ring", node: str = "", name: str = "tensor group",
              step_timeout: float = STEP_TIMEOUT_S, python: str = sys.executable,
              weights: Path | None = None) -> Worker:
        """Start the worker of one rank; `env` is its group's (ring_environment, jaccl_environment);
        `weights` names where tensors not in model_dir's files are (see --weights)."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [python, "-m", "tbmesh.serving.tensor_worker", str(model_dir), str(start), str(end),
                 "--fd", str(theirs.fileno()), "--control", control, "--backend", backend, "--node", node,
                 "--name", name, "--step-timeout", str(step_timeout),
                 *(["--weights", str(weights)] if weights is not None else [])],
                env={**os.environ, **env}, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        return cls(process, Connection(ours))

    def ready(self, timeout: float = CONNECT_TIMEOUT_S, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait until the group is joined and this rank's share is loaded; GroupFailed when
        stop() says to give up first (a newer plan wants other layers) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not select.select([self.connection.sock], [], [], READY_POLL_S)[0]:
            if stop():
                raise GroupFailed("abandoned while the group formed")
            if time.monotonic() > deadline:
                raise GroupFailed(f"the tensor group was not ready in {timeout:g} s (a member missing?)")
        meta = self._receive(timeout).meta
        if meta.get("op") != "ready":
            raise GroupFailed(f"the worker said {meta.get('op')!r} before it was ready")
        self.rank, self.size, self.weight_bytes = meta["rank"], meta["size"], meta["weight_bytes"]

    def run(self, step: Step, x: Any, timeout: float = STEP_TIMEOUT_S) -> Outcome:
        """Rank 0: run `step` with input `x` (token ids at stage 0, else hidden states) on the
        group; its Outcome, as StageCaches.run gives it on one node."""
        self._send(step_frame(step, x))
        outcome, self.held = outcome_of(self._receive(timeout))
        return outcome

    def drop(self, keep: Callable[[Route], bool], timeout: float = STEP_TIMEOUT_S) -> None:
        """Rank 0: forget every route for which keep(route) is false (StageCaches.drop)."""
        gone = [route for route in self.held.routes if not keep(route)]
        if gone:
            self._send(op_frame("drop", routes=[[list(s) for s in route] for route in gone]))
            self.held = held_of(self._receive(timeout).meta)

    def in_use(self) -> set[Range]:
        return set(self.held.in_use)

    def figures(self) -> dict[str, int]:
        return dict(self.held.figures)

    def stop(self, timeout: float = 10.0) -> int:
        """Rank 0: stop every rank. Any rank: wait for the process, kill it if it lingers."""
        with contextlib.suppress(OSError, GroupFailed):
            if self.rank == 0 and self.process.poll() is None:
                self._send(op_frame("stop"))
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self.connection.close()

    def _send(self, message: wire.Tensor) -> None:
        try:
            self.connection.send(message)
        except OSError:
            self._receive(5.0)  # the worker is gone: its last word says why
            raise GroupFailed("the tensor group's worker stopped reading") from None

    def _receive(self, timeout: float) -> wire.Tensor:
        try:
            message = self.connection.receive(timeout)
        except TimeoutError:
            raise GroupFailed(f"the tensor group's worker did not answer in {timeout:g} s") from None
        except (OSError, wire.ProtocolError):
            message = None
        if message is None:
            try:
                status = self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                status = None
            raise GroupFailed(f"the tensor group's worker exited (status {status})")
        if message.meta.get("op") == "error":
            raise GroupFailed(f"the tensor group failed: {message.meta.get('reason')}")
        return message


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown: MLX 0.32 may abort in it (ml-explore/mlx#3126)
