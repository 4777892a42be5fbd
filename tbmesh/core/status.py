"""What GET /status answers: the cluster as one node sees it, as frozen dataclasses.

The daemon (tbmesh.node.daemon) builds a `Status`, the engine and its scheduler give their
parts of `runtime`; `to_json` (tbmesh.core.jsonform) makes the JSON that /status serves and
telemetry publishes, and `from_json(Status, data)` reads it back typed for `tbmesh status`,
the demo and other clients. The OpenAPI schema of /status is made from these types
(tbmesh.http.openapi.dataclass_schemas), so a key added here is described there.

Sizes are bytes, times seconds on the daemon's monotonic clock (`now`), bandwidths as named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tbmesh.core.jsonform import doc, flat, json_key
from tbmesh.core.types import Plan


@dataclass(frozen=True)
class ThisNode:
    """The node that answers."""

    id: str
    name: str
    incarnation: int
    port: int  # the control port
    interfaces: tuple[str, ...]
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ShardStatus:
    """The layers a node holds or is loading, of the plan epoch they belong to."""

    start: int
    end: int
    epoch: int
    bytes: int | None  # its stage's weight bytes in the running plan; None when it has none there
    progress: float  # of [start, end) in memory
    loaded: bool
    serving: int  # the epoch of the committed plan whose stage the node can run now


@dataclass(frozen=True)
class FetchStatus:
    """A fetch of weights under way."""

    done: int
    total: int
    bytes_per_s: float
    sources: tuple[str, ...] = field(metadata=json_key("from", **doc("the names of the nodes fetched from")))


@dataclass(frozen=True)
class DiskStatus:
    """The model's weights on a node's disk."""

    layers: tuple[tuple[int, int], ...]  # ranges [start, end) whose every tensor is on disk
    ends: tuple[str, ...]  # "first" (the embedding), "last" (the final norm and the head)
    bytes: int
    manifest: str  # the digest of the model's manifest; "" until known
    fetching: FetchStatus | None


@dataclass(frozen=True)
class NodeStatus:
    """A node of the cluster, as this node knows it."""

    id: str
    name: str
    chip: str
    state: Literal["alive", "suspect", "dead"]
    memory_total: int
    memory_usable: int  # what a model may take there
    flops: float
    role: Literal["leader", "follower"]
    shard: ShardStatus | None
    other_model: str | None = field(metadata=doc("why no plan uses it: it holds another model under the name"))
    disk: DiskStatus | None


@dataclass(frozen=True)
class LinkStatus:
    """A direct link, as measured by one of its ends."""

    a: str
    b: str
    bandwidth_bps: float  # bits per second, 0 until measured
    rtt_s: float
    rdma: bool  # both ends run RDMA on this cable (tensor groups use jaccl over it)


@dataclass(frozen=True)
class Preparing:
    """The next plan while its stages load (the running one serves meanwhile)."""

    plan: Plan = field(metadata=flat())
    progress: dict[str, float] = field(metadata=doc("each stage's node: how much of its stage it has loaded"))


@dataclass(frozen=True)
class LoadingStatus:
    """Layers this node is loading."""

    start: int
    end: int
    progress: float


@dataclass(frozen=True)
class EngineCounters:
    """What the serving engine counts (tbmesh.serving.engine.Counters)."""

    loads: int  # shards loaded
    layers_read: int  # layers read from disk
    layers_kept: int  # layers a new shard took from one already in memory
    peak_weight_bytes: int  # the most weight bytes held at once (at the end of a load)
    bytes_read: int
    resumed: int  # attempts started again on another route
    tokens: int  # tokens streamed by this entry
    steps: int  # steps this node's stages ran
    refused_nonfinite: int  # rows of steps refused here: activations or outputs not finite


@dataclass(frozen=True)
class SchedulerStatus:
    """The scheduler's batch and KV room, as stage 0 of the routes that start here."""

    queued: int
    decoding: int
    kv_tokens: int
    kv_room: int  # tokens of context a route may hold
    prefix_hits: int
    prefix_lookups: int
    prefix_hit_tokens: int
    admitted: int
    preempted: int
    decode_steps: int
    decoded: int  # tokens sampled in decode steps
    prefill_steps: int
    prefilled: int  # prompt tokens prefilled (not taken from the prefix cache)


@dataclass(frozen=True)
class CacheFigures:
    """The caches this node holds (its stages' and those of the groups it is rank 0 of)."""

    stage_requests: int
    kv_bytes: int
    prefix_entries: int
    prefix_tokens: int
    prefix_bytes: int


@dataclass(frozen=True)
class RuntimeStatus:
    """This node's serving engine. Its parts' keys are keys of this one object."""

    requests: int  # entering here, in flight
    held: tuple[tuple[int, int], ...]  # the layer ranges held in memory
    loading: LoadingStatus | None
    weight_bytes: int
    active_memory: int  # MLX's
    tokens_per_s: float  # streamed by this entry over the last 5 s
    counters: EngineCounters = field(metadata=flat())
    tight_loads: int = field(metadata=doc("loads begun after letting the running stage go"))
    scheduler: SchedulerStatus = field(metadata=flat())
    caches: CacheFigures = field(metadata=flat())


@dataclass(frozen=True)
class StatusEvent:
    """A line of the event log."""

    at: float  # on the clock of Status.now
    kind: str  # joined, suspect, alive, dead, left, leader, plan, no-fit, resumed, ...
    node: str | None
    detail: str


@dataclass(frozen=True)
class Status:
    """The cluster as this node sees it."""

    node: ThisNode
    cluster: str
    now: float = field(metadata=doc("the clock of events[].at"))
    leader: str | None
    term: int
    model: str | None
    nodes: tuple[NodeStatus, ...]
    replicas: tuple[int, ...] | None = field(
        metadata=doc("how many reachable disks hold each layer; null when no node says what its disk holds"))
    links: tuple[LinkStatus, ...]
    plan: Plan | None
    preparing: Preparing | None
    no_fit: str | None = field(metadata=doc("why the model fits no plan"))
    runtime: RuntimeStatus | None = field(metadata=doc("this node's serving engine; null without a model"))
    events: tuple[StatusEvent, ...] = field(metadata=doc("the newest 50"))
