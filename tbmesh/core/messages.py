"""Control-plane messages exchanged between direct peers, and what the core asks the shell to do.

The cluster view spreads by link-state flooding (as in OSPF): each node publishes one
`LinkState` about itself (its info, its direct neighbours, its term and leader, and the plan
when it leads), and every node forwards newer ones to its other neighbours. A node therefore
only ever talks to nodes it has a direct connection to; multi-hop clusters (a chain of Macs
without a Thunderbolt Bridge) need no routing for the control plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tbmesh.core.types import OMIT_DEFAULT, ModelSpec, NodeInfo, Plan


@dataclass(frozen=True)
class Heartbeat:
    """Sent to every direct peer each heartbeat interval; also measures round-trip time."""

    sender: str
    incarnation: int
    seq: int
    sent_at: float  # the sender's clock
    echo_at: float = 0.0  # the latest `sent_at` the sender received from the addressee
    echo_hold: float = 0.0  # how long the sender held that echo before sending this
    digest: int = 0  # fingerprint of the sender's link-state database (anti-entropy)


@dataclass(frozen=True)
class Adjacency:
    """A direct neighbour as seen by the node publishing the link state."""

    peer: str
    suspect: bool = False
    rtt_s: float = 0.0
    bytes_per_s: float = 0.0
    # our RDMA device on the cable to `peer` ("rdma_en2"), "" without one; omitted when
    # empty, so a Mac without RDMA (and every Linux box) sends what it sent before
    rdma: str = field(default="", metadata=OMIT_DEFAULT)
    # connections the publisher made to `peer`: a new one (a replaced connection, a cable that
    # flapped faster than anyone suspected it) may have lost what the old one carried
    connections: int = field(default=0, metadata=OMIT_DEFAULT)


@dataclass(frozen=True)
class ShardState:
    """The layers a node has in memory (or is loading), for the plan epoch they belong to.

    While a new plan is prepared this describes the node's stage in it, and `serving` says
    whether the node still holds its stage of the running plan (it keeps serving that one
    until the commit).
    """

    model: str
    start: int
    end: int
    epoch: int
    progress: float = 1.0  # 1.0 = every layer of [start, end) is in memory
    serving: int = 0  # the epoch of the committed plan whose stage this node can run now
    failed: str = ""  # why loading [start, end) failed (a damaged file): the leader plans without us

    @property
    def ready(self) -> bool:
        return self.progress >= 1.0


FIRST, LAST = "first", "last"  # the ends of a model: what the first stage reads beyond its
ENDS = (FIRST, LAST)             # layers (the embedding), what the last does (final norm, head)


@dataclass(frozen=True)
class Fetching:
    """A fetch of weights under way: `done` of `total` bytes, at `bytes_per_s`, from `sources`."""

    done: int
    total: int
    bytes_per_s: float = 0.0
    sources: tuple[str, ...] = ()  # node ids


@dataclass(frozen=True)
class DiskState:
    """The model's weights a node keeps on disk, and those it holds in memory only: what
    peers may fetch from it.

    A Mac needs only its shard on disk; the others fetch layers from the Macs whose disk
    state holds them, and the leader plans only when every layer is on some member's disk
    or in its memory (a Mac whose model directory vanished while it served still holds the
    layers it loaded). Copies for the cluster (tbmesh.core.replicas) count disks only.
    """

    model: str
    manifest: str = ""  # digest of the model's manifest (its tensors and files); "" until known
    spec: ModelSpec | None = None  # the planner's view of the model: a leader without one takes it
    layers: tuple[tuple[int, int], ...] = ()  # ranges [start, end) whose every tensor is on disk
    ends: tuple[str, ...] = ()  # the ends on disk: FIRST (embedding, ...), LAST (final norm, head)
    bytes: int = 0  # of the model's weights on this disk
    fetching: Fetching | None = None
    manifest_bytes: int = 0  # the manifest's size (peers fetch it by digest)
    part: str = ""  # without the manifest: the digest of the manifest of the part we hold
    part_bytes: int = 0  # (Macs that each pulled their stage's files make the whole from parts)
    free: int = 0  # bytes this disk may still take beyond its stage (slack left, within the disk's room)
    # layers and ends not on this disk that peers may fetch from the shards the node holds in memory
    memory: tuple[tuple[int, int], ...] = field(default=(), metadata=OMIT_DEFAULT)
    memory_ends: tuple[str, ...] = field(default=(), metadata=OMIT_DEFAULT)

    def has(self, start: int, end: int) -> bool:
        """Whether every layer of [start, end) is on this disk."""
        return all(any(a <= i < b for a, b in self.layers) for i in range(start, end))

    def serves(self, start: int, end: int) -> bool:
        """Whether peers may fetch every layer of [start, end) from this node: from its disk
        or from its memory."""
        return all(any(a <= i < b for a, b in (*self.layers, *self.memory)) for i in range(start, end))

    def serves_end(self, end: str) -> bool:
        return end in self.ends or end in self.memory_ends


@dataclass(frozen=True)
class KeepOnDisk:
    """From the leader: `node` keeps these layers on disk besides its stage (copies that
    keep each layer on enough disks, tbmesh.core.replicas)."""

    node: str
    layers: tuple[tuple[int, int], ...] = ()
    ends: tuple[str, ...] = ()  # FIRST, LAST


@dataclass(frozen=True)
class LinkState:
    """Everything one node publishes about itself. Newer = higher (incarnation, version)."""

    origin: str
    incarnation: int
    version: int
    info: NodeInfo
    neighbours: tuple[Adjacency, ...] = ()
    term: int = 0
    leader: str | None = None
    plan: Plan | None = None  # the plan the origin runs; authoritative only from its leader
    preparing: Plan | None = None  # the plan being loaded, to be committed when all are ready
    no_fit: str | None = None  # from a leader: why the model does not fit the group
    shard: ShardState | None = None  # the origin's loaded layers
    disk: DiskState | None = None  # the origin's weights on disk (None: the whole model, as before)
    keep: tuple[KeepOnDisk, ...] = ()  # from a leader: copies each member keeps on disk
    left: bool = False  # the origin said goodbye

    @property
    def key(self) -> tuple[int, int]:
        return (self.incarnation, self.version)


@dataclass(frozen=True)
class LinkStates:
    """A batch of link states being flooded or answering a summary."""

    sender: str
    states: tuple[LinkState, ...]


@dataclass(frozen=True)
class DatabaseSummary:
    """(origin, incarnation, version) of every link state the sender holds.

    Sent when heartbeat digests disagree; the receiver answers with the link states the
    sender lacks, and with its own summary when `reply` is set and it lacks some itself.
    """

    sender: str
    entries: tuple[tuple[str, int, int], ...]
    reply: bool = True


@dataclass(frozen=True)
class Goodbye:
    """A node leaving on purpose (SIGTERM): its peers mark it dead at once."""

    sender: str
    incarnation: int


Message = Heartbeat | LinkStates | DatabaseSummary | Goodbye


@dataclass(frozen=True)
class Send:
    """The shell must deliver `message` to the direct peer `to`."""

    to: str
    message: Message


@dataclass(frozen=True)
class Disconnect:
    """The shell must close its connection to `peer` (declared dead while connected)."""

    peer: str


Action = Send | Disconnect


@dataclass(frozen=True)
class Event:
    """Something worth a line in the event log and the status screen."""

    at: float
    kind: str  # joined, suspect, alive, dead, left, restarted, leader, plan, no-fit, other-model, ...
    node: str | None = None
    detail: str = ""
    data: dict = field(default_factory=dict, compare=False)
