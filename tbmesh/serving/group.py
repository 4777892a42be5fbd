"""A tensor-parallel stage this node is a member of: its rank's worker process.

A group stage (Stage.group, tbmesh.core.groups) is served by one worker process per member
(tbmesh.runtime.tensor_worker): an mx.distributed group cannot be made twice in a process, so
each incarnation of a group is a new set of workers, which load while the old group (or the
old plan's stages) still serve, and stop when their layers go. The engine holds a GroupShard
where it would hold a Shard:

    rank 0 (the stage's `node`, the member the pipeline talks to): the engine hands each step
           to its worker (`Worker.run`), which passes it on to the other ranks
    rank k: holds its share; the engine only starts, watches and stops its worker

Every member derives the incarnation from the plan alone: the ranks in the group's order, the
ports from the plan's epoch and the stage (tbmesh.runtime.tensor.group_ports), the addresses
from its own connections to the members (Host.group_addresses). A worker that exits unasked
(it crashed, or another rank died and took the group with it) is a stage that died: the
engine lets the layers go and the leader plans again.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbmesh.core.types import Stage
from tbmesh.runtime.modeldir import read_config
from tbmesh.runtime.tensor import group_ports, ring_environment, ring_hostfile
from tbmesh.runtime.tensor_worker import CONNECT_TIMEOUT_S, Worker

STRAY_S = 45.0  # a rank whose layers went waits this long for rank 0 to stop the group (its drain)
BACKEND = "ring"  # MLX's TCP ring; jaccl (RDMA, Macs) takes tbmesh.net.rdma's environment


@dataclass
class GroupShard:
    """Our rank of a tensor group serving layers [stage.start, stage.end)."""

    stage: Stage
    epoch: int  # the plan epoch the incarnation was formed for (its ports)
    rank: int
    worker: Worker
    config: dict[str, Any]
    hostfile: Path
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


def start_group(model_dir: Path, stage: Stage, epoch: int, me: str, addresses: Sequence[str], name: str,
                stop: Callable[[], bool], places: dict[str, tuple[str, str]] | None = None,
                timeout: float = CONNECT_TIMEOUT_S) -> GroupShard:
    """Start our rank's worker for `stage` of the plan `epoch` and wait until every rank has
    loaded its share (blocking: call it from a thread), or stop() says to give up.
    `addresses`: each member's IP address (Host.group_addresses); `places`: where the tensors
    not in model_dir's files are (Disk.places). Raises GroupFailed (or OSError) with the reason."""
    rank = stage.group.index(me)
    ports, control = group_ports(epoch, stage.start, len(stage.group))
    hostfile = _temporary(ring_hostfile([f"{address}:{port}" for address, port in zip(addresses, ports)]))
    weights = _temporary(json.dumps(places)) if places is not None else None
    layers = f"layers {stage.start}-{stage.end - 1}"
    try:
        worker = Worker.start(model_dir, stage.start, stage.end, ring_environment(rank, str(hostfile)),
                              f"{addresses[0]}:{control}", BACKEND, node=stage.node,
                              name=f"{name}'s group ({layers})", weights=weights)
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
