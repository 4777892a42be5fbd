"""A tensor-parallel stage this node is a member of: its rank's worker process.

A group stage (Stage.group, tbmesh.core.groups) is served by one worker process per member
(tbmesh.serving.tensor_worker): an mx.distributed group cannot be made twice in a process, so
each incarnation of a group is a new set of workers, which load while the old group (or the
old plan's stages) still serve, and stop when their layers go. The engine holds a GroupShard
where it would hold a Shard:

    rank 0 (the stage's `node`, the member the pipeline talks to): the engine hands each step
           to its worker (`Worker.run`), which passes it on to the other ranks
    rank k: holds its share; the engine only starts, watches and stops its worker

Every member derives the incarnation from the plan alone: the ranks in the group's order, the
ports from the plan's epoch and the stage (tbmesh.runtime.tensor.group_ports), the addresses
from its own connections to the members (Host.group_addresses), and MLX's backend from the
RDMA devices the members publish (ClusterView.rdma): `jaccl` when every two members have
a device at both ends of their cable, else `ring` (TCP). A worker that exits unasked
(it crashed, or another rank died and took the group with it) is a stage that died: the
engine lets the layers go and the leader plans again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbmesh.core.types import Stage
from tbmesh.net.rdma import Cable, DeviceMatrix, RdmaError, device_matrix, interface_of, jaccl_environment
from tbmesh.runtime.tensor import group_ports, ring_environment, ring_hostfile
from tbmesh.serving.tensor_worker import CONNECT_TIMEOUT_S, Worker
from tbmesh.weights.modeldir import read_config

log = logging.getLogger(__name__)

STRAY_S = 45.0  # a rank whose layers went waits this long for rank 0 to stop the group (its drain)


@dataclass
class GroupShard:
    """Our rank of a tensor group serving layers [stage.start, stage.end)."""

    stage: Stage
    epoch: int  # the plan epoch the incarnation was formed for (its ports)
    rank: int
    worker: Worker
    config: dict[str, Any]
    hostfile: Path  # the file the worker's environment names: ring's hostfile or jaccl's devices
    stopping: bool = field(default=False)

    @property
    def first(self) -> bool:
        return self.stage.start == 0

    @property
    def weight_bytes(self) -> int:
        return self.worker.weight_bytes

    def stop(self) -> None:
        """Stop our worker (rank 0 stops the whole group), in a thread: it may take seconds."""
        self.stopping = True

        def stop() -> None:
            # rank 0 stops every rank; another rank waits for that (rank 0 may drain its
            # requests a while), and is killed only if it never comes
            self.worker.stop(timeout=10.0 if self.rank == 0 else STRAY_S)
            with contextlib.suppress(OSError):
                self.hostfile.unlink()

        threading.Thread(target=stop, name=f"stop-group-{self.stage.start}", daemon=True).start()


@dataclass(frozen=True)
class Launch:
    """How our rank joins its group: MLX's backend, the worker's environment, and the text
    of the file that environment names (written there before the worker starts)."""

    backend: str  # "jaccl" or "ring"
    env: dict[str, str]
    text: str  # ring's hostfile, or jaccl's device matrix (JSON)
    why: str  # for the log: why this backend


def jaccl_devices(members: Sequence[str], rdma: Mapping[tuple[str, str], str],
                  name: Callable[[str], str] = str) -> DeviceMatrix | str:
    """jaccl's device matrix for a group whose rank i runs on members[i], or why it cannot
    run jaccl: every two members need an RDMA device at both ends of their cable.
    `rdma`: {(a, b): a's device on its cable to b} (ClusterView.rdma)."""
    for a, b in itertools.combinations(members, 2):
        if (a, b) not in rdma or (b, a) not in rdma:
            return f"no RDMA between {name(a)} and {name(b)}"
    cables = [Cable(a, interface_of(rdma[(a, b)]), b, interface_of(rdma[(b, a)]))
              for a, b in itertools.combinations(members, 2)]
    try:
        return device_matrix(members, cables)
    except RdmaError as error:
        return str(error)


def launch(stage: Stage, epoch: int, me: str, addresses: Sequence[str],
           rdma: Mapping[tuple[str, str], str], path: str, names: Mapping[str, str] | None = None) -> Launch:
    """How our rank of `stage` (plan `epoch`) starts, its file to be written at `path`
    (`names`: the members' names, for the log).

    jaccl's coordinator is rank 0's address with rank 0's port of the incarnation
    (group_ports): jaccl connects the ranks over RDMA, so the ring's ports are free, and the
    control port is taken by the control channel rank 0 also listens on."""
    rank = stage.group.index(me)
    ports, _ = group_ports(epoch, stage.start, len(stage.group))
    matrix = jaccl_devices(stage.group, rdma, lambda node: (names or {}).get(node, node))
    if not isinstance(matrix, str):
        return Launch("jaccl", jaccl_environment(rank, f"{addresses[0]}:{ports[0]}", path),
                      json.dumps(matrix), "RDMA between every two members")
    hostfile = ring_hostfile([f"{address}:{port}" for address, port in zip(addresses, ports)])
    return Launch("ring", ring_environment(rank, path), hostfile, matrix)


def start_group(model_dir: Path, stage: Stage, epoch: int, me: str, addresses: Sequence[str], name: str,
                stop: Callable[[], bool], places: dict[str, tuple[str, str]] | None = None,
                rdma: Mapping[tuple[str, str], str] | None = None, names: Mapping[str, str] | None = None,
                timeout: float = CONNECT_TIMEOUT_S) -> GroupShard:
    """Start our rank's worker for `stage` of the plan `epoch` and wait until every rank has
    loaded its share (blocking: call it from a thread), or stop() says to give up.
    `addresses`: each member's IP address (Host.group_addresses); `places`: where the tensors
    not in model_dir's files are (Disk.places); `rdma`: the members' RDMA devices
    (ClusterView.rdma); `names`: the members' names (ClusterView.names). Raises GroupFailed
    (or OSError) with the reason."""
    rank = stage.group.index(me)
    _, control = group_ports(epoch, stage.start, len(stage.group))
    handle, path = tempfile.mkstemp(prefix="tbmesh-group-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        how = launch(stage, epoch, me, addresses, rdma or {}, path, names)
        file.write(how.text)
    hostfile = Path(path)
    weights = _temporary(json.dumps(places)) if places is not None else None
    layers = f"layers {stage.start}-{stage.end - 1}"
    log.info("rank %d of the group for %s: backend %s (%s)", rank, layers, how.backend, how.why)
    try:
        worker = Worker.start(model_dir, stage.start, stage.end, how.env, f"{addresses[0]}:{control}", how.backend,
                              node=stage.node, name=f"{name}'s group ({layers})", weights=weights)
        try:
            worker.ready(timeout, stop)
        except BaseException:
            worker.stop(timeout=2.0)
            hostfile.unlink(missing_ok=True)
            raise
    finally:
        if weights is not None:  # read by now (or never will be)
            weights.unlink(missing_ok=True)
    return GroupShard(stage, epoch, rank, worker, read_config(model_dir), hostfile)


def _temporary(text: str) -> Path:
    handle, path = tempfile.mkstemp(prefix="tbmesh-group-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    return Path(path)


def watch(shard: GroupShard, on_exit: Callable[[GroupShard, int], None]) -> None:
    """Call on_exit(shard, status) (from a thread) when the worker exits unasked."""
    def wait() -> None:
        status = shard.worker.process.wait()
        if not shard.stopping:
            on_exit(shard, status)

    threading.Thread(target=wait, name=f"watch-group-{shard.stage.start}", daemon=True).start()
