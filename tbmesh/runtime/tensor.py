"""A tensor-parallel stage: layers [start, end) of a model held by every rank of an
mx.distributed group, each rank with its share of every layer's weights.

The shard is loaded as any other (tbmesh.runtime.shard.load_shard: the model built lazily,
cut to the stage's layers, its tensors read lazily), and before any weight is read mlx-lm's
own `Model.shard(group)` splits each layer: the attention heads and the MLP's (or each
expert's) hidden units are divided among the ranks, and the attention's and the MLP's output
projections sum the ranks' parts with an all-reduce (mx.distributed.all_sum). So a rank holds
only its share (a layer's tensors are read whole, sliced, and let go), and the forward is Shard.forward unchanged: every rank runs the
same step on the same input and ends with the same hidden states (or logits). The
embedding, the final norm and the head are whole on every rank (mlx-lm does not split them).

Every rank must run every step, in the same order, with the same input: a rank that skips
one leaves the others waiting in an all-reduce (tbmesh.serving.tensor_worker keeps them in
step). The ranks find each other through MLX's environment: `ring_environment` below for
the ring backend (TCP), tbmesh.net.rdma.jaccl_environment for jaccl (RDMA, Macs).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.utils import _get_classes

from tbmesh.core.modelspec import TENSOR_FAMILIES
from tbmesh.core.modelspec import tensor_unfit as core_tensor_unfit
from tbmesh.runtime.shard import FAMILIES, Shard, ShardError, load_shard
from tbmesh.weights.modeldir import read_config

# shard.py's FAMILIES whose mlx-lm model class has `shard(group)` live in core (the planner
# needs them); tests/test_tensor.py checks each against mlx-lm.
assert TENSOR_FAMILIES <= set(FAMILIES)


def family(config: dict[str, Any]) -> str | None:
    """The mlx-lm module a config.json is built with ("llama" for mistral, "deepseek_v3" for
    kimi_k2), or None when mlx-lm does not know the model type."""
    try:
        model_class, _ = _get_classes(config)
    except (ValueError, KeyError):
        return None
    return model_class.__module__.rsplit(".", 1)[-1]


def tensor_unfit(config: dict[str, Any], size: int) -> str | None:
    """Why a model cannot be split over `size` ranks (one line), or None when it can
    (tbmesh.core.modelspec.tensor_unfit, with mlx-lm's own family of the config)."""
    return core_tensor_unfit(config, size, family(config))


def load_tensor_shard(model_dir: str | Path, start: int, end: int, group: mx.distributed.Group,
                      tensors: Callable[[], dict[str, mx.array]] | None = None) -> Shard:
    """Layers [start, end) of the model in `model_dir`, this rank's share of each layer (see
    the module notes). Every rank of `group` must call it, with the same arguments: reading
    the weights is local, but a step after it needs all of them. `tensors`: as load_shard's."""
    config = read_config(Path(model_dir))
    why = tensor_unfit(config, group.size())
    if why is not None:
        raise ShardError(f"{Path(model_dir).name}: {why}")

    def split(model: nn.Module) -> None:
        model.shard(group)

    return load_shard(model_dir, start, end, tensors=tensors, split=split)


# --- how the ranks find each other ----------------------------------------------------------


def ring_hostfile(addresses: Sequence[str]) -> str:
    """MLX's ring hostfile: rank i listens on addresses[i] ("ip:port"); write it to a file
    and name it in MLX_HOSTFILE (MLX docs, "Distributed Without mlx.launch", Ring)."""
    return json.dumps([[address] for address in addresses])


def ring_environment(rank: int, hostfile: str) -> dict[str, str]:
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile}


GROUP_PORTS = (20000, 32000)  # where ring ranks and a group's control channel listen: below the
# ephemeral ports of Linux (32768) and macOS (49152), so an outgoing connection never holds one


def group_ports(epoch: int, start: int, size: int) -> tuple[list[int], int]:
    """The ports of one group incarnation's ranks, and of its control channel. Every member
    derives them from the plan alone (no exchange), and each plan epoch and stage gets others:
    a new incarnation loads while the old one still serves."""
    slots = (GROUP_PORTS[1] - GROUP_PORTS[0]) // 10  # ten ports a slot: MAX_GROUP ranks and the control
    base = GROUP_PORTS[0] + 10 * ((epoch * 131 + start * 17) % slots)
    return [base + rank for rank in range(size)], base + 9


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on `host` now (for a group on loopback)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
