"""What one node must hold in memory, given the running plan and the one being prepared.

Both the daemon's runtime (MLX) and the simulator follow this, so the leader's commit rule
(every node of the new plan reports its stage loaded) is exercised the same way in both.

    running plan  A: [0, 40)  B: [40, 61)      B serves [40, 61) until the commit,
    preparing     A: [0, 30)  B: [30, 61)      and meanwhile loads [30, 61), keeping 40-60

Holding both stages at once peaks at their union. When that union (and the KV room the
planner reserves for the new stage) exceeds the node's usable memory, the node is *tight*:
it lets the running stage go before loading, keeping only the layers the new stage reuses,
and the old plan stops serving until the commit (requests resume on the new plan) rather
than a Mac running out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from tbmesh.core.messages import ShardState
from tbmesh.core.types import ModelSpec, Plan, Stage

Range = tuple[int, int]


@dataclass(frozen=True)
class Assignment:
    model: str
    serve: Stage | None  # our stage of the running plan
    serve_epoch: int
    prepare: Stage | None  # our stage of the plan being prepared
    prepare_epoch: int
    tight: bool = False  # both stages do not fit our memory together: the running one goes first

    @classmethod
    def of(cls, node: str, model: str | None, plan: Plan | None, preparing: Plan | None,
           spec: ModelSpec | None = None, memory: int = 0, context: int = 0) -> Assignment:
        """Our part of the plans; with the model's `spec` and our usable `memory` (bytes),
        also whether we are tight (see above)."""
        def ours(p: Plan | None) -> Stage | None:
            return p.stage_of(node) if p is not None and p.model == model else None

        serve, prepare = ours(plan), ours(preparing)
        tight = spec is not None and memory > 0 and serve is not None and prepare is not None \
            and union_bytes(spec, serve, prepare) + kv_room(spec, prepare, context) > memory
        return cls(model or "", serve, plan.epoch if plan else 0,
                   prepare, preparing.epoch if preparing else 0, tight)

    @property
    def target(self) -> Range | None:
        """The range to load next: the stage being prepared, else the running one."""
        stage = self.prepare or self.serve
        return None if stage is None else (stage.start, stage.end)

    @property
    def keep(self) -> set[Range]:
        """Every range worth keeping in memory; anything else is dropped."""
        stages = (self.prepare,) if self.tight else (self.serve, self.prepare)
        return {(s.start, s.end) for s in stages if s is not None}

    def state(self, held: set[Range], progress: float, failed: str = "") -> ShardState | None:
        """What to publish, holding the `held` ranges and `progress` of the target's load
        (or why it `failed`)."""
        if self.target is None:
            return None
        epoch = self.prepare_epoch if self.prepare else self.serve_epoch
        done = 1.0 if self.target in held else progress
        serving = self.serve_epoch if self.serve and (self.serve.start, self.serve.end) in held else 0
        return ShardState(self.model, *self.target, epoch, done, serving, failed)


def union_bytes(spec: ModelSpec, a: Stage, b: Stage) -> int:
    """Weight bytes of holding stages a and b at once (shared layers and ends counted once)."""
    layers = set(range(a.start, a.end)) | set(range(b.start, b.end))
    first = a.start == 0 or b.start == 0
    last = spec.num_layers in (a.end, b.end)
    return sum(spec.layer_bytes[i] for i in layers) + (spec.embed_bytes if first else 0) + \
        (spec.head_bytes if last else 0)


def kv_room(spec: ModelSpec, stage: Stage, context: int) -> int:
    """The KV cache room the planner reserves for a stage (context tokens of each layer)."""
    return spec.kv_bytes_per_token_per_layer * context * (stage.end - stage.start)
