"""Tensor-parallel groups in a plan: which Macs may form one, what each member holds, and how
fast a plan of stages (one Mac, or a group) is expected to decode.

A group is Macs cabled all to all (every pair directly: jaccl, MLX's RDMA backend, connects
every pair; MLX's TCP ring is given the same cables). Its stage's layers are split as mlx-lm's
`Model.shard(group)` splits them: heads and hidden units in equal parts, so

    member bytes = (layer bytes - whole) / n + whole + [embedding if first] + [head if last]
                   + KV room / n

where `whole` (ModelSpec.whole_bytes, counted per layer in proportion to the layers held) is
what every member keeps entire: norms, the MoE router and MLA's down-projections; the
embedding and the head are whole on every member too (mlx-lm does not split them). The KV
cache is split by heads (MLA's latent included: mlx-lm caches it per head after expansion).

Speed is tbmesh.core.tensor_cost's decode model (a PROJECTION calibrated on exo's published
figures): a stage of n Macs takes tensor_s, a hand-over between stages hop_s. Each Mac reads
at its own memory bandwidth (NodeInfo.memory_bandwidth; unknown = the calibration's M3 Ultra),
a group at its slowest member's. A group's collectives run over jaccl when every pair of its
cables has RDMA (tensor_cost.TB5_RDMA), else over MLX's TCP ring with the links' measured
latency (rtt / 2) and bandwidth (unmeasured: tensor_cost.TB4_TCP's). Hops between stages go
over tbmesh's TCP data plane: measured, else TB4_TCP's figures.

The choice (tbmesh.core.planner, plan_layers(parallel="auto"|"tensor")): candidates are the
cliques of Macs cabled all to all whose size the model splits into (ModelSpec.tensor_ways),
the strongest few per size, alone or as disjoint sets (greedy per size, and largest first);
each is planned as a pipeline in which a group is one node (its members' smallest memory
times their number, less what each holds whole), with its best-cabled members tried as the
one that talks to the pipeline, with and without the other Macs as stages. A plan whose
member would be over its memory is shrunk and planned again, or dropped. "auto" (the
daemon's default) groups Macs over RDMA cables only, and takes the fastest expected decode if
it beats the pipeline's by MIN_SPEEDUP; "tensor" groups over any cables and takes the fastest
with a group, or the pipeline when no group can be made (one Mac, a model that does not
split); `Placement.why` gives the numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, get_args

from tbmesh.core.modelspec import MAX_GROUP
from tbmesh.core.tensor_cost import (
    BF16,
    TB4_TCP,
    TB5_RDMA,
    Calibration,
    Link,
    Work,
    all_reduce_s,
    calibration,
    hop_s,
    tensor_s,
)
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Stage

# How the planner may shape the stages: "pipeline", layers over Macs only (one Mac a stage);
# "auto", tensor groups too where they pay (MIN_SPEEDUP); "tensor", groups wherever possible.
# A node's default is DaemonConfig.parallel (tbmesh.node.config); the bare planner's, "pipeline".
Parallel = Literal["auto", "pipeline", "tensor"]
PARALLEL: tuple[Parallel, ...] = get_args(Parallel)
MIN_SPEEDUP = 1.2  # "auto" takes groups only when projected this much faster than the pipeline:
# the model is a projection, and a group stops as a whole when any member is lost
MAX_CLIQUES = 256  # cliques considered (a bigger cluster: the first found, largest first)


def link_between(links: Sequence[LinkInfo], a: str, b: str) -> LinkInfo | None:
    return next((x for x in links if x.joins(a, b)), None)


def cliques(ids: Sequence[str], links: Sequence[LinkInfo], sizes: Sequence[int]) -> list[tuple[str, ...]]:
    """Sets of nodes cabled all to all, of the given sizes (2..MAX_GROUP), largest first, then by ids."""
    ids = sorted(ids)
    adj = {x: {y for y in ids if y != x and link_between(links, x, y)} for x in ids}
    want = {s for s in sizes if 2 <= s <= MAX_GROUP}
    found: list[tuple[str, ...]] = []

    def grow(clique: tuple[str, ...], rest: list[str]) -> None:
        if len(found) >= MAX_CLIQUES:
            return
        if len(clique) in want:
            found.append(clique)
        if len(clique) >= max(want, default=0):
            return
        for i, y in enumerate(rest):
            grow(clique + (y,), [z for z in rest[i + 1 :] if z in adj[y]])

    for i, x in enumerate(ids):
        grow((x,), [z for z in ids[i + 1 :] if z in adj[x]])
    return sorted(found, key=lambda c: (-len(c), c))


def member_bytes(model: ModelSpec, start: int, end: int, size: int, first: bool, last: bool,
                 context: int = 0) -> int:
    """Bytes each of `size` members of a stage holding layers [start, end) needs (module notes);
    for size 1 the planner's stage cost: its weights and KV room."""
    layers = sum(model.layer_bytes[start:end])
    whole = _prorated(model.whole_bytes, model, start, end) if size > 1 else 0
    kv = model.kv_bytes(context, end - start)
    ends = (model.embed_bytes if first else 0) + (model.head_bytes if last else 0)
    return -(-(layers - whole) // size) + whole + ends + -(-kv // size)


def _prorated(total: int, model: ModelSpec, start: int, end: int) -> int:
    """A per-model total spread evenly over the layers: the share of [start, end), rounded up."""
    return -(-total * (end - start) // model.num_layers)


def group_link(members: Sequence[str], links: Sequence[LinkInfo]) -> Link:
    """How a group's collectives run: jaccl when every pair's cable has RDMA, else the TCP ring."""
    pairs = [link_between(links, a, b) for a, b in itertools.combinations(members, 2)]
    if all(p is not None and p.rdma for p in pairs):
        return TB5_RDMA
    return _tcp(pairs, "TCP ring (no RDMA)", mesh=False)


def hop_link(links: Sequence[LinkInfo], a: str, b: str) -> Link:
    """A hand-over between stages: tbmesh's TCP data plane over the cable (or routed)."""
    return _tcp([link_between(links, a, b)], "TCP", mesh=False)


def _tcp(pairs: Sequence[LinkInfo | None], name: str, mesh: bool) -> Link:
    rtts = [p.rtt_s for p in pairs if p is not None and p.rtt_s > 0]
    speeds = [p.bytes_per_s for p in pairs if p is not None and p.bytes_per_s > 0]
    measured = len(rtts) == len(pairs)
    latency = max(rtts) / 2 if measured else TB4_TCP.latency_s
    speed = min(speeds) if len(speeds) == len(pairs) else TB4_TCP.bytes_per_s
    return Link(name, latency, speed, mesh)


def stage_s(model: ModelSpec, stage: Stage, last: bool, nodes: dict[str, NodeInfo],
            links: Sequence[LinkInfo], cal: Calibration) -> float:
    """Expected seconds of one decoded token in this stage (its Macs' reads and collectives)."""
    work = stage_work(model, stage, last)
    bandwidth = min(nodes[m].memory_bandwidth or cal.bandwidth for m in stage.members)
    size = len(stage.members)
    link = group_link(stage.members, links) if size > 1 else TB5_RDMA
    return tensor_s(work, size, link, replace(cal, bandwidth=bandwidth))


def stage_work(model: ModelSpec, stage: Stage, last: bool) -> Work:
    """What one token reads in a stage: its layers' share of `read_bytes` (an MoE reads its
    active experts), whole parts included; the head when last (the embedding: one row)."""
    layers = sum(model.layer_bytes[stage.start : stage.end])
    total = sum(model.layer_bytes)
    read = layers * (model.read_bytes or total) / total if total else 0.0
    whole = min(_prorated(model.whole_bytes, model, stage.start, stage.end), read)
    head = model.head_bytes if last else 0
    return Work(stage.num_layers, model.hidden_size * BF16, read - whole, whole + head)


def decode_s(model: ModelSpec, stages: Sequence[Stage], nodes: Sequence[NodeInfo],
             links: Sequence[LinkInfo], cal: Calibration | None = None) -> float:
    """Expected seconds per token of one request through these stages (a PROJECTION)."""
    cal = cal or calibration()
    by_id = {n.id: n for n in nodes}
    total = 0.0
    for i, stage in enumerate(stages):
        total += stage_s(model, stage, i == len(stages) - 1, by_id, links, cal)
        if i:
            work = stage_work(model, stage, False)
            total += hop_s(work, hop_link(links, stages[i - 1].node, stage.node), cal)
    return total


def all_reduce_us(model: ModelSpec, members: Sequence[str], links: Sequence[LinkInfo]) -> float:
    """One all-reduce of a hidden state in this group, microseconds (for the plan's reason)."""
    work = Work(1, model.hidden_size * BF16, 0.0)
    return all_reduce_s(work, len(members), group_link(members, links), calibration()) * 1e6


def describe_link(link: Link) -> str:
    if link is TB5_RDMA:
        return "RDMA"
    return f"no RDMA: TCP ring, {link.latency_s * 1e6:.0f} µs a message"


def unsplittable(model: ModelSpec) -> str | None:
    """Why no group can hold this model at all, or None."""
    if not model.tensor_ways:
        return f"{model.name} cannot be split across Macs (its family or head counts do not allow it)"
    return None


def sizes_line(model: ModelSpec) -> str:
    return f"{model.name} splits into groups of {', '.join(map(str, model.tensor_ways))}"

