"""The steps of the routes through our layers, run in the MLX thread: stage 0's, which the
scheduler makes whenever the thread has no step to run (`pump`, so that a batch takes every
request ready at the last moment), and the other stages', which come from the stage before
(`run`). What a step makes goes on: hidden states to the next stage, sampled tokens to
stage 0 and the entries, and a Cancel to the entry of each attempt that cannot go on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tbmesh.core.assignment import Range
from tbmesh.net import wire
from tbmesh.runtime.shard import Shard
from tbmesh.serving.counters import Counters
from tbmesh.serving.group import GroupShard
from tbmesh.serving.messages import Member, Outcome, Route, Step
from tbmesh.serving.mlx_thread import MlxThread
from tbmesh.serving.scheduler import Scheduler
from tbmesh.serving.stage import StageCaches
from tbmesh.serving.tensor_worker import GroupFailed

log = logging.getLogger(__name__)

SCAN_EVERY_S = 60.0  # a held shard's weights are looked over for NaN at most this often (a prompt
                     # that overflows the model's dtype makes NaN again at every retry, on any Mac)

Snapshot = tuple[set[Range], dict[str, int]]  # what the loop side keeps of the caches: layers in use, figures
Computed = tuple[Outcome, wire.Tensor | None, Snapshot, str | None]


class Steps:
    def __init__(self, me: str, name: str, thread: MlxThread, scheduler: Scheduler,
                 held: dict[Range, Shard | GroupShard], deliver: Callable[[str, Any], bool],
                 node_name: Callable[[str], str], observed: Callable[[set[Range]], None],
                 damaged: Callable[[Range, str], None], counters: Counters,
                 tokenizer: Callable[[], Any] | None = None) -> None:
        self.me = me
        self.thread = thread
        self.scheduler = scheduler  # stage 0's, of the routes that start here
        self.held = held  # the layers we hold (a group stage's: our rank's worker); not ours to change
        self.deliver = deliver  # a data-plane message to a node (False: no route there)
        self.node_name = node_name
        self.observed = observed  # the layers the caches use changed
        self.damaged = damaged  # layers whose weights are not finite
        self.counters = counters
        self.caches = StageCaches(me, name, tokenizer)  # the thread's
        self.figures = self.caches.figures()  # as of the last change in the thread
        self.closed = False
        self._busy = 0  # steps in the thread
        self._scanned: dict[int, float] = {}  # id of a held shard -> when its weights were looked over (thread's)

    def pump(self) -> None:
        """Stage 0's next steps, while the thread has none to run."""
        while self._busy == 0 and not self.closed:
            found = self.scheduler.next_step()
            for refused in self.scheduler.take_refused():
                self.deliver(refused.entry, wire.Cancel(refused.attempt, refused.entry, refused.reason,
                                                        "preempt" if refused.preempted else "fail"))
            if found is None:
                return
            step, tokens = found
            array = np.array(tokens, dtype=np.int32).reshape((len(step.members), 1) if step.kind == "decode"
                                                              else (1, len(tokens)))
            self.run(step, wire.tensor_from_array(array))  # stage 0 has the step itself: no meta

    def run(self, step: Step, tensor: wire.Tensor) -> None:
        shard = self.held.get(step.layers)
        if (shard is None or isinstance(shard, GroupShard) and shard.rank != 0) and step.kind != "flush":
            self._failed(step, step.members, f"{self.node_name(self.me)} does not run layers "
                                             f"{step.layers[0]}-{step.layers[1] - 1}")
            return
        self._busy += 1
        self.thread.submit(lambda: self._compute(shard, step, tensor),
                           lambda result, error: self._computed(step, result, error))

    def drop_caches(self, keep: Callable[[Route], bool], groups: bool = True) -> None:
        """Forget the caches of every route for which keep(route) is false, here and (with
        `groups`) in the groups we are rank 0 of (in the thread, after the steps queued before)."""
        def drop() -> None:
            self.caches.drop(keep)
            for shard in self._rank0_groups() if groups else ():
                with contextlib.suppress(GroupFailed):  # a dead group holds nothing
                    shard.worker.drop(keep)

        def done(snapshot: Any, error: BaseException | None) -> None:
            if error is not None:
                log.error("worker job failed: %r", error)
            else:
                self._observe(snapshot)

        self.thread.submit(lambda: (drop(), self._snapshot())[1], done)

    # ----- in the thread ---------------------------------------------------------------

    def _compute(self, shard: Shard | GroupShard | None, step: Step, tensor: wire.Tensor) -> Computed:
        """A group's rank 0 runs the step on every rank (GroupFailed if it cannot). When our
        layers made NaN or inf of finite inputs, their weights are looked at: the name of
        one that is not finite (the shard is damaged) comes last, else None."""
        x = wire.array_from_tensor(tensor) if step.kind != "flush" else None
        damaged = None
        if isinstance(shard, GroupShard):
            outcome = shard.worker.run(step, x)
        else:
            outcome = self.caches.run(shard, step, x) if shard is not None else Outcome()
            if outcome.nonfinite and shard is not None and self._scan_due(shard):
                damaged = shard.damaged()
        forward = None
        if not step.last:
            following = step.onward(outcome.ran if outcome.out is not None else None)
            if outcome.out is not None:
                forward = wire.tensor_from_array(outcome.out, step.lane, 0, following.meta())
            else:
                forward = wire.tensor_from_array(np.zeros((0,), np.int32), step.lane, 0, following.meta())
        return outcome, forward, self._snapshot(), damaged

    def _scan_due(self, shard: Shard) -> bool:
        """Whether to look over the shard's weights now (see SCAN_EVERY_S)."""
        now = time.monotonic()
        if now - self._scanned.get(id(shard), -SCAN_EVERY_S) < SCAN_EVERY_S:
            return False
        self._scanned = {key: at for key, at in self._scanned.items() if now - at < SCAN_EVERY_S}
        self._scanned[id(shard)] = now
        return True

    def _snapshot(self) -> Snapshot:
        """The caches' layers in use and figures, ours and those of the groups we are rank 0 of."""
        in_use, figures = self.caches.in_use(), self.caches.figures()
        for shard in self._rank0_groups():
            in_use |= shard.worker.in_use()
            for key, value in shard.worker.figures().items():
                figures[key] = figures.get(key, 0) + value
        return in_use, figures

    def _rank0_groups(self) -> list[GroupShard]:
        """The groups we run the steps of (rank 0): their caches are ours to report and drop."""
        return [s for s in list(self.held.values()) if isinstance(s, GroupShard) and s.rank == 0]

    # ----- back on the loop --------------------------------------------------------------

    def _observe(self, snapshot: Snapshot) -> None:
        in_use, self.figures = snapshot
        self.observed(in_use)

    def _computed(self, step: Step, result: Computed | None, error: BaseException | None) -> None:
        self._busy -= 1
        if error is not None:
            log.error("a %s step of layers %d-%d failed: %r", step.kind, *step.layers, error)
            self._failed(step, step.members, f"{self.node_name(self.me)} failed to compute a step")
        elif result is not None:
            outcome, forward, snapshot, damaged = result
            self._observe(snapshot)
            self.counters.steps += step.kind != "flush"
            if outcome.failed:
                self.counters.refused_nonfinite += outcome.refused
                for member, why in outcome.failed:
                    self._failed(step, (member,), why)
            if damaged is not None:
                self.damaged(step.layers, damaged)
            if forward is not None:
                if not self.deliver(step.route[step.stage + 1][0], forward):
                    self._failed(step, outcome.ran, f"no route to {self.node_name(step.route[step.stage + 1][0])}")
            elif step.kind == "decode" and step.last:
                self._send_tokens(step, outcome)
        self.pump()

    def _send_tokens(self, step: Step, outcome: Outcome) -> None:
        sampled = [(m, _sampled(m, outcome)) for m in outcome.ran]
        stage0 = step.route[0][0]
        self.deliver(stage0, wire.Tokens(stage0, step.lane, tuple(s for _, s in sampled)))
        for entry in dict.fromkeys(m.entry for m, _ in sampled if m.entry != stage0):
            self.deliver(entry, wire.Tokens(entry, step.lane, tuple(s for m, s in sampled if m.entry == entry)))

    def _failed(self, step: Step, members: tuple[Member, ...], why: str) -> None:
        """Attempts that cannot go on: their entry and stage 0 hear why."""
        stage0 = step.route[0][0]
        for member in members:
            for node in dict.fromkeys((stage0, member.entry)):
                self.deliver(node, wire.Cancel(member.attempt, node, why, "fail"))


def _sampled(member: Member, outcome: Outcome) -> wire.Sampled:
    """A member's token as the last stage sends it, with its log-probabilities if it asked."""
    token = outcome.tokens[member.attempt]
    logprobs = outcome.logprobs.get(member.attempt)
    if logprobs is None:
        return wire.Sampled(member.attempt, member.step, token)
    return wire.Sampled(member.attempt, member.step, token, _surprisal(logprobs.logprob),
                        tuple((t, _surprisal(p)) for t, p in logprobs.top))


def _surprisal(logprob: float) -> float:
    return min(-logprob, SURPRISAL_MAX)  # finite, as every wire number: a probability of 0 is e**-1e9


SURPRISAL_MAX = 1e9
