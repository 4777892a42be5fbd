"""Descriptions shared by the whole core: nodes, links, models, plans.

All sizes are bytes, bandwidths bytes per second, times seconds. Everything here is
immutable and plain, so it can be compared, hashed, and sent over the wire as a dict
(tbmesh.net.wire) or as JSON (tbmesh.core.jsonform: /status, telemetry, `tbmesh plan --json`).
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field
from typing import Any

# Fields marked so are left out of a message when they hold their default (tbmesh.net.wire):
# what a peer without them sends and reads stays as it was, byte for byte.
OMIT_DEFAULT = {"wire": "omit_default"}


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself: who it is and what it can hold and compute."""

    id: str
    name: str
    chip: str = ""
    memory_total: int = 0
    memory_usable: int = 0  # what a model may take here (Metal's working set, not all RAM)
    flops: float = 0.0
    memory_bandwidth: float = field(default=0.0, metadata=OMIT_DEFAULT)  # bytes/s, 0 = unknown


@dataclass(frozen=True)
class LinkInfo:
    """A direct connection between two nodes, as measured by one of its ends."""

    a: str
    b: str
    bytes_per_s: float = 0.0  # 0 = not measured yet
    rtt_s: float = 0.0
    rdma: bool = field(default=False, metadata=OMIT_DEFAULT)  # both ends run RDMA on this cable

    def joins(self, x: str, y: str) -> bool:
        return {self.a, self.b} == {x, y}


@dataclass(frozen=True)
class ModelSpec:
    """A transformer as the planner sees it: per-layer weight bytes plus the two ends.

    `head_bytes` is the final norm plus the output projection; with tied embeddings the
    last stage needs the embedding matrix again, so it counts here too.
    """

    name: str
    layer_bytes: tuple[int, ...]
    embed_bytes: int = 0
    head_bytes: int = 0
    kv_bytes_per_token_per_layer: int = 0
    # What a tensor group needs to know (tbmesh.core.groups); the defaults mean "cannot split".
    tensor_ways: tuple[int, ...] = field(default=(), metadata=OMIT_DEFAULT)  # group sizes it splits into
    hidden_size: int = field(default=0, metadata=OMIT_DEFAULT)  # one hidden state: hidden_size x 2 bytes
    read_bytes: int = field(default=0, metadata=OMIT_DEFAULT)  # layer bytes a token reads (MoE: active experts); 0 = all
    whole_bytes: int = field(default=0, metadata=OMIT_DEFAULT)  # layer bytes a group keeps whole on every member

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes

    def kv_bytes(self, context: int, layers: int) -> int:
        return self.kv_bytes_per_token_per_layer * context * layers


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: `node` holds layers [start, end) and `bytes` of weights.

    A tensor-parallel stage has a `group` of Macs cabled all to all, `node` first (the member
    the pipeline talks to): each member holds its share of every layer (tbmesh.core.groups).
    A one-Mac stage has no group (and is sent exactly as before groups existed).
    """

    node: str
    start: int
    end: int
    bytes: int  # the stage's weight bytes (a group's members share them, see groups.member_bytes)
    group: tuple[str, ...] = field(default=(), metadata=OMIT_DEFAULT)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def members(self) -> tuple[str, ...]:
        return self.group or (self.node,)


@dataclass(frozen=True)
class Plan:
    """A partition stamped by the leader that made it.

    (term, epoch) orders plans: a node refuses a plan older than one it accepted.
    """

    term: int
    epoch: int
    model: str
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    left_out: tuple[str, ...] = ()  # nodes the planner considered and gave nothing
    # the digest of the model's manifest (its files and tensors, tbmesh.weights.manifest): two
    # copies under one name are one model only when theirs agree; "" when not known
    manifest: str = field(default="", metadata=OMIT_DEFAULT)

    @property
    def key(self) -> tuple[int, int]:
        return (self.term, self.epoch)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.stages)

    @property
    def members(self) -> tuple[str, ...]:
        """Every node holding layers: each stage's members (a group's all), in stage order."""
        return tuple(m for s in self.stages for m in s.members)

    @property
    def considered(self) -> frozenset[str]:
        """Every node the plan was made for: the stages' members and the left-out ones."""
        return frozenset(self.members) | frozenset(self.left_out)

    def stage_of(self, node: str) -> Stage | None:
        """The stage `node` holds layers of (alone, or as a member of its group)."""
        return next((s for s in self.stages if node in s.members), None)


@dataclass(frozen=True)
class Placement:
    """The planner's answer: stages when the model fits, otherwise why not."""

    fits: bool
    stages: tuple[Stage, ...] = ()
    left_out: tuple[str, ...] = ()  # nodes given no layers (too small, or not needed)
    reason: str | None = None  # why it does not fit, with numbers and what would make it fit
    notes: tuple[str, ...] = ()  # e.g. why a node was left out
    why: str = ""  # why this shape (pipeline, tensor groups), with the numbers; "" for parallel="pipeline"

    def stamp(self, term: int, epoch: int, model: str, manifest: str = "") -> Plan:
        if not self.fits:
            raise ValueError("cannot stamp a placement that does not fit")
        return Plan(term, epoch, model, self.stages, self.left_out, manifest)


def omits_default(f: Field) -> bool:
    """Whether field `f` is left out of a message (and of its JSON) while it holds its default."""
    return f.metadata == OMIT_DEFAULT


def omitted(obj: Any, f: Field) -> bool:
    """Whether `obj`'s field `f` is left out of its message now (see OMIT_DEFAULT)."""
    return omits_default(f) and getattr(obj, f.name) == f.default


def ranges_of(indices: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted indices as ranges [a, b) of consecutive ones: [0, 1, 2, 5] -> ((0, 3), (5, 6))."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return tuple(runs)
