"""Which layers this node holds, loads and lets go. Pure: the serving engine (with MLX) and
the simulator (with virtual loads) drive the same rules.

A node holds its stage of the running plan and, while a new plan is prepared, its stage of
that one too (see core/assignment.py); it loads the newest and publishes what it holds.
Layers no plan wants any more go once nothing uses them: requests in flight finish on the
route they started on (a commit that only moves layers costs them nothing; a re-prefill
would), so layers stay while attempts use them, up to DRAIN_S. While no plan gives us a
stage, unused layers stay LINGER_S: a Mac that ran alone and joins keeps what it holds for
the stage the next plan gives it, a moment later. A tight node (its running and prepared
stages do not fit its memory together) lets the running one go at once. A load that failed
(a damaged file) is tried again after LOAD_RETRY_S; meanwhile the leader plans without us.
Held layers found damaged (they computed NaN or inf, and their weights hold some) go, and
count as a load that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tbmesh.core.assignment import Assignment, Range
from tbmesh.core.messages import ShardState

DRAIN_S = 30.0  # the longest requests in flight keep layers a new plan moved away
LINGER_S = 5.0  # layers no plan wants and no request uses stay this long (a join may want them)
LOAD_RETRY_S = 10.0  # a load that failed is tried again after this long
RECHECK_S = 1.0  # how often layers waiting to go are looked at again


@dataclass(frozen=True)
class Load:
    """Load `target`, taking what it can from the held layers (only the parts it reuses when
    `tight`, so the rest is freed before reading)."""

    target: Range
    tight: bool


@dataclass(frozen=True)
class Abandon:
    """The load under way is for a plan we left: stop it at its next layer."""


@dataclass(frozen=True)
class Drop:
    layers: Range


@dataclass(frozen=True)
class Publish:
    state: ShardState | None


@dataclass(frozen=True)
class WakeAt:
    """Call `tick` at this time."""

    at: float


Action = Load | Abandon | Drop | Publish | WakeAt


@dataclass
class Keeper:
    drain_s: float = DRAIN_S
    linger_s: float = LINGER_S
    retry_s: float = LOAD_RETRY_S
    held: set[Range] = field(default_factory=set)
    loading: Range | None = None
    progress: float = 0.0  # of the load under way
    tight_loads: int = 0
    assignment: Assignment | None = None
    _failed: tuple[Range, float, str] | None = None  # the last load that failed: when, why
    _unwanted_since: dict[Range, float] = field(default_factory=dict)
    _published: ShardState | None = None

    def assign(self, assignment: Assignment, now: float, in_use: set[Range],
               stale: frozenset[Range] = frozenset()) -> list[Action]:
        """The running plan or the one being prepared changed. `stale`: layers held or loading
        one way that the new plan wants another (alone instead of by a tensor group, or by
        another group): they go at once, and load again the new way."""
        self.assignment = assignment
        if self.loading in stale:
            self.loading = None
        return [self._forget(layers) for layers in sorted(stale) if layers in self.held] + self._follow(now, in_use)

    def tick(self, now: float, in_use: set[Range]) -> list[Action]:
        return self._follow(now, in_use)

    def loaded(self, target: Range, now: float, in_use: set[Range]) -> list[Action]:
        if self.loading == target:
            self.loading = None
        self.held.add(target)
        return self._follow(now, in_use)

    def load_failed(self, target: Range, why: str, now: float, in_use: set[Range]) -> list[Action]:
        if self.loading == target:
            self.loading = None
        self._failed = (target, now, why)
        return self._follow(now, in_use) + [WakeAt(now + self.retry_s)]

    def damaged(self, layers: Range, why: str, now: float, in_use: set[Range]) -> list[Action]:
        """The held `layers` are damaged (weights in memory that are not finite): they go at
        once, and the stage is published as a load that failed, saying `why` (the leader plans
        without us, and a load tried after retry_s reads them from disk again)."""
        self._failed, self.progress = (layers, now, why), 0.0
        return self.forget(layers, now, in_use) + [WakeAt(now + self.retry_s)]

    def forget(self, layers: Range, now: float, in_use: set[Range]) -> list[Action]:
        """The held `layers` cannot serve any more: a tensor group's worker died, or the plan
        now wants them held another way (alone instead of by a group, or by another group)."""
        return ([self._forget(layers)] if layers in self.held else []) + self._follow(now, in_use)

    def _forget(self, layers: Range) -> Drop:
        self.held.discard(layers)
        self._unwanted_since.pop(layers, None)
        return Drop(layers)

    @property
    def published(self) -> ShardState | None:
        """What was last published."""
        return self._published

    def load_abandoned(self, target: Range) -> None:
        if self.loading == target:
            self.loading = None

    def progressed(self, target: Range, progress: float) -> list[Action]:
        """Progress of the load under way; published in steps of a tenth."""
        if self.loading != target or progress - self.progress < 0.1:
            return []
        self.progress = progress
        return self._publish()

    def _follow(self, now: float, in_use: set[Range]) -> list[Action]:
        assignment = self.assignment
        if assignment is None:
            return []
        target = assignment.target
        failed = self._failed is not None and self._failed[0] == target and now - self._failed[1] < self.retry_s
        actions: list[Action] = []
        if target is not None and target not in self.held and self.loading != target and not failed:
            self.loading, self.progress, self._failed = target, 0.0, None
            self.tight_loads += assignment.tight
            actions.append(Load(target, assignment.tight))  # first: it keeps any held layer it can use
        elif target != self.loading and self.loading is not None:
            self.loading = None
            actions.append(Abandon())
        actions += self._let_go(assignment.keep, target is None, assignment.tight, now, in_use)
        return actions + self._publish()

    def _let_go(self, keep: set[Range], linger: bool, at_once: bool, now: float,
                in_use: set[Range]) -> list[Action]:
        actions: list[Action] = []
        for layers in sorted(self.held):
            if layers in keep:
                self._unwanted_since.pop(layers, None)
                continue
            since = self._unwanted_since.setdefault(layers, now)
            unused = layers not in in_use
            if at_once or now - since >= self.drain_s or (unused and (not linger or now - since >= self.linger_s)):
                self.held.discard(layers)
                del self._unwanted_since[layers]
                actions.append(Drop(layers))
        if self._unwanted_since:
            actions.append(WakeAt(now + RECHECK_S))
        return actions

    def _publish(self) -> list[Action]:
        assignment = self.assignment
        if assignment is None:
            return []
        failed = self._failed[2] if self._failed and self._failed[0] == assignment.target else ""
        state = assignment.state(self.held, self.progress, failed)
        if state == self._published:
            return []
        self._published = state
        return [Publish(state)]
