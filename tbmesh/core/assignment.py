"""What one node must hold in memory, given the running plan and the one being prepared.

Both the daemon's runtime (MLX) and the simulator follow this, so the leader's commit rule
(every node of the new plan reports its stage loaded) is exercised the same way in both.

    running plan  A: [0, 40)  B: [40, 61)      B serves [40, 61) until the commit,
    preparing     A: [0, 30)  B: [30, 61)      and meanwhile loads [30, 61), keeping 40-60
"""

from __future__ import annotations

from dataclasses import dataclass

from tbmesh.core.messages import ShardState
from tbmesh.core.types import Plan, Stage

Range = tuple[int, int]


@dataclass(frozen=True)
class Assignment:
    model: str
    serve: Stage | None  # our stage of the running plan
    serve_epoch: int
    prepare: Stage | None  # our stage of the plan being prepared
    prepare_epoch: int

    @classmethod
    def of(cls, node: str, model: str | None, plan: Plan | None, preparing: Plan | None) -> Assignment:
        def ours(p: Plan | None) -> Stage | None:
            return p.stage_of(node) if p is not None and p.model == model else None

        return cls(model or "", ours(plan), plan.epoch if plan else 0,
                   ours(preparing), preparing.epoch if preparing else 0)

    @property
    def target(self) -> Range | None:
        """The range to load next: the stage being prepared, else the running one."""
        stage = self.prepare or self.serve
        return None if stage is None else (stage.start, stage.end)

    @property
    def keep(self) -> set[Range]:
        """Every range worth keeping in memory; anything else is dropped."""
        return {(s.start, s.end) for s in (self.serve, self.prepare) if s is not None}

    def state(self, held: set[Range], progress: float, failed: str = "") -> ShardState | None:
        """What to publish, holding the `held` ranges and `progress` of the target's load
        (or why it `failed`)."""
        if self.target is None:
            return None
        epoch = self.prepare_epoch if self.prepare else self.serve_epoch
        done = 1.0 if self.target in held else progress
        serving = self.serve_epoch if self.serve and (self.serve.start, self.serve.end) in held else 0
        return ShardState(self.model, *self.target, epoch, done, serving, failed)
