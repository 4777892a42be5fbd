"""What the serving engine needs to know of the cluster, and what it makes of it. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from tbmesh.core.messages import DiskState, ShardState
from tbmesh.core.types import LinkInfo, ModelSpec, Plan, Stage
from tbmesh.serving.messages import Route, route_of


@dataclass(frozen=True)
class ClusterView:
    """A snapshot of the control plane, as this node sees it."""

    me: str
    plan: Plan | None = None  # the running (committed) plan
    preparing: Plan | None = None  # the next plan, while its stages load
    no_fit: str = ""  # why the model does not fit the cluster, if it does not
    leader: str | None = None
    shards: dict[str, ShardState] = field(default_factory=dict)  # what each node holds
    names: dict[str, str] = field(default_factory=dict)  # node -> name
    suspected: dict[str, bool] = field(default_factory=dict)  # members, and whether suspected
    model: ModelSpec | None = None
    memory_usable: int = 0  # ours
    context: int = 0  # the KV room the planner reserves, in tokens
    disks: dict[str, DiskState] = field(default_factory=dict)  # the model's weights on each node's disk
    links: tuple[LinkInfo, ...] = ()  # direct links among members, with their measured bandwidth
    rdma: dict[tuple[str, str], str] = field(default_factory=dict)  # (a, b) -> a's RDMA device toward b

    def name(self, node: str) -> str:
        return self.names.get(node, node)


def usable(view: ClusterView) -> tuple[Route, int] | str:
    """The running plan's route and epoch when every stage of it serves, else why not."""
    plan = view.plan
    if view.no_fit:
        return f"the model does not fit the cluster: {view.no_fit}"
    if plan is None:
        if view.preparing is None:
            awaited = "a leader" if view.leader is None else "the leader's plan"
            return f"no plan yet: waiting for {awaited}"
        loading = [_loading(view, m, s, view.preparing) for s in view.preparing.stages for m in s.members]
        return "waiting for shards to load: " + ", ".join(filter(None, loading))
    gone = [view.name(m) for m in plan.members if view.suspected.get(m, True)]
    if gone:
        return f"{', '.join(gone)} stopped answering: waiting for a new plan"
    waiting = [view.name(m) for m in plan.members
               if (held := view.shards.get(m)) is None or held.serving != plan.epoch]
    if waiting:
        return f"waiting for {', '.join(waiting)} to serve epoch {plan.epoch}"
    return route_of(plan), plan.epoch


def _loading(view: ClusterView, node: str, stage: Stage, plan: Plan) -> str | None:
    held = view.shards.get(node)
    if held is not None and held.ready and (held.start, held.end, held.epoch) == (stage.start, stage.end, plan.epoch):
        return None
    progress = f" {held.progress:.0%}" if held is not None and held.epoch == plan.epoch else ""
    return f"{view.name(node)} (layers {stage.start}-{stage.end - 1}{progress})"
