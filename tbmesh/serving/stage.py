"""A stage's MLX work: the steps of the routes this node serves a stage of, over its layers,
with the KV caches stage 0 decided it keeps. Runs in the engine's MLX worker thread only.

What a node keeps for a route:
- the cache of each attempt whose prompt is being prefilled (mlx-lm's KVCache, its own);
- per lane, one batched cache of all its rows (mlx-lm's BatchKVCache: rows left-padded to a
  common length and masked, so each row's attention sees exactly its own tokens). A row
  joins by `extend` and leaves by `filter`; both copy the lane's cache once, not per step;
- the prefix-cache entries, each a cache of exactly its tokens, copied and trimmed when an
  attempt starts from one.

Every cache's length is also counted here in Python, and checked against what stage 0 says
each step expects: a stage that missed a step (a connection lost with it) refuses the
attempt instead of computing on a cache out of step.

At the last stage each row is sampled on its own (its temperature, top-p, and the key of
its seed and step), so a seeded request draws the same tokens whatever else is in its batch.

Nothing that is not finite goes on: a row whose activations from the previous stage, or
whose outputs here (hidden states; logits at the last stage), hold a NaN or an inf fails,
as a row on a dead stage does (its entry starts it again), and leaves the caches here
first, so no entry of the prefix cache is ever made from it. The check is one
reduction per tensor, evaluated with the step's outputs. (A last stage computes no logits
while it prefills: its own damage shows at the first decode step, before any token.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np

from tbmesh.runtime.grammar import GrammarMatcher
from tbmesh.runtime.sampling import draw, token_logprobs
from tbmesh.runtime.shard import Shard
from tbmesh.serving.messages import Member, Origin, Outcome, Range, Route, Step
from tbmesh.serving.settings import KV_BLOCK

Cache = list[Any]  # one mlx-lm cache object per layer of the shard


@dataclass
class Alone:
    """The cache of one attempt outside any lane (its prompt is being prefilled)."""

    route: Route
    cache: Cache
    length: int


@dataclass
class LaneCache:
    members: list[str] = field(default_factory=list)  # attempt per row
    lengths: list[int] = field(default_factory=list)  # tokens in each row's cache
    cache: Cache | None = None  # batched, one per layer; None while the lane has no row
    ahead: Rows | None = None  # the tokens of the lane's next step, already on its way (see _decode)


@dataclass
class Entry:
    """A prefix-cache entry: the cache of exactly `length` tokens, and its bytes."""

    cache: Cache
    length: int
    nbytes: int


class StageCaches:
    def __init__(self, me: str, name: str, tokenizer: Callable[[], Any] | None = None) -> None:
        self.me = me  # this node's id
        self.name = name  # and name, for the reasons given to entries
        self.tokenizer = tokenizer  # the model's (mlx-lm's wrapper), for the grammars of a last stage
        self.matchers: dict[str, GrammarMatcher] = {}  # at a last stage: constrained attempts' grammars
        self.alone: dict[str, Alone] = {}
        self.lanes: dict[tuple[Route, str], LaneCache] = {}
        self.entries: dict[tuple[Route, str], Entry] = {}  # the prefix cache

    # ----- bookkeeping -----------------------------------------------------------------

    def attempts(self) -> int:
        """Attempts holding a KV cache here."""
        return len(self.alone) + sum(len(lane.members) for lane in self.lanes.values())

    def routes(self) -> set[Route]:
        """Routes holding caches here (what `drop` decides on)."""
        return {a.route for a in self.alone.values()} | {r for r, _ in self.lanes} | {r for r, _ in self.entries}

    def in_use(self) -> set[Range]:
        """Layer ranges that attempts hold caches on (they keep those layers in memory)."""
        routes = [a.route for a in self.alone.values()] + [r for (r, _), lane in self.lanes.items() if lane.members]
        return {(s, e) for route in routes for n, s, e in route if n == self.me}

    def figures(self) -> dict[str, int]:
        """What the status shows of the caches held here."""
        live = [a.cache for a in self.alone.values()] + [lane.cache for lane in self.lanes.values() if lane.cache]
        prefix_bytes = sum(entry.nbytes for entry in self.entries.values())
        return {"stage_requests": self.attempts(),
                "kv_bytes": sum(c.nbytes for cache in live for c in cache) + prefix_bytes,
                "prefix_entries": len(self.entries),
                "prefix_tokens": sum(entry.length for entry in self.entries.values()),
                "prefix_bytes": prefix_bytes}

    def drop(self, keep: Any) -> None:
        """Forget every route for which keep(route) is false."""
        for attempt in [a for a, alone in self.alone.items() if not keep(alone.route)]:
            del self.alone[attempt]
        for key in [k for k in self.lanes if not keep(k[0])]:
            del self.lanes[key]
        for key in [k for k in self.entries if not keep(k[0])]:
            del self.entries[key]

    # ----- one step --------------------------------------------------------------------

    def run(self, shard: Shard, step: Step, x: mx.array) -> Outcome:
        """Step `step` over our layers with input `x` (token ids at stage 0, else hidden
        states), one row per member of a decode step, the chunk of a prefill."""
        for release in step.releases:
            self._release(step.route, release.attempt, release.length, release.save_as)
        for entry in step.evictions:
            self.entries.pop((step.route, entry), None)
        if step.kind == "flush":
            outcome = Outcome()
        elif step.kind == "prefill":
            outcome = self._prefill(shard, step, x)
        else:
            outcome = self._decode(shard, step, x)
        self.lanes = {key: lane for key, lane in self.lanes.items() if lane.members}
        if self.matchers:  # a matcher lives as long as its attempt's cache here
            held = set(self.alone) | {a for lane in self.lanes.values() for a in lane.members}
            self.matchers = {a: m for a, m in self.matchers.items() if a in held}
        return outcome

    def _constrain(self, shard: Shard, members: tuple[Member, ...]) -> None:
        """A last stage builds the matcher of a constrained attempt at its first step, past the
        tokens it generated before (a resumed attempt continues its answer exactly)."""
        for member in members:
            if shard.last and member.constraint is not None:
                if self.tokenizer is None:  # never silently unconstrained
                    raise RuntimeError("a last stage without the model's tokenizer cannot apply a grammar")
                c = member.constraint
                self.matchers[member.attempt] = GrammarMatcher(c.grammar, self.tokenizer(), list(c.answer))

    def _prefill(self, shard: Shard, step: Step, x: mx.array) -> Outcome:
        (member,) = step.members
        self._constrain(shard, step.members)
        alone = self.alone.get(member.attempt)
        if alone is None and member.origin is not None:
            alone = self._start(shard, step.route, member.origin)
            if isinstance(alone, str):
                return Outcome(failed=[(member, alone)])
            self.alone[member.attempt] = alone
        if alone is None or alone.length != step.start:
            self.alone.pop(member.attempt, None)
            return Outcome(failed=[(member, f"{self.name} lost the request's cache")])
        out = shard.forward(x, alone.cache)
        alone.length += step.length
        ins = None if shard.first else finite_rows(x)
        outs = mx.array([True]) if shard.last else finite_rows(out)  # a prefill's logits are not computed
        fine = both(ins, outs)
        mx.eval([c.state for c in alone.cache] if shard.last else out, fine)
        failed, own = self._not_finite(step, step.members, ins, outs, fine)
        if failed:
            self.alone.pop(member.attempt, None)  # its cache holds them now
            return Outcome(failed=failed, refused=len(failed), nonfinite=own)
        return Outcome(ran=step.members) if shard.last else Outcome(out, step.members)

    def _decode(self, shard: Shard, step: Step, x: mx.array) -> Outcome:
        lane = self.lanes.setdefault((step.route, step.lane), LaneCache())
        self._constrain(shard, step.members)
        wanted = [m.attempt for m in step.members]
        self._leave(lane, [a for a in lane.members if a not in wanted])
        outcome = Outcome()
        if lane.members != wanted[: len(lane.members)]:  # never from stage 0: rows only leave or join at the end
            outcome.failed += [(m, f"{self.name} holds the batch in another order") for m in step.members]
            self._leave(lane, list(lane.members))
            return outcome
        joining = []
        for member in step.members[len(lane.members):]:
            alone = self.alone.pop(member.attempt, None)
            if alone is None and member.origin is not None:
                alone = self._start(shard, step.route, member.origin)
            if isinstance(alone, Alone):
                joining.append((member, alone))
            else:
                outcome.failed.append((member, alone or f"{self.name} lost the request's cache"))
        if joining:
            self._join(lane, joining)
        out_of_step = [m for m in step.members if m.attempt in lane.members
                       and lane.lengths[lane.members.index(m.attempt)] != m.position]
        self._leave(lane, [m.attempt for m in out_of_step])
        outcome.failed += [(m, f"{self.name} lost the request's cache") for m in out_of_step]
        ran = tuple(m for m in step.members if m.attempt in lane.members)
        if not ran:
            self.lanes.pop((step.route, step.lane), None)
            return outcome
        outcome.ran = ran
        ins = None  # whether each row's activations from the previous stage are finite
        if lane.ahead is not None:  # this very step is on its way already: same rows, same inputs
            rows, lane.ahead = lane.ahead, None
        else:
            if len(ran) < len(step.members):
                x = x[mx.array([i for i, m in enumerate(step.members) if m.attempt in lane.members])]
            out = shard.forward(x, lane.cache)
            ins = None if shard.first else finite_rows(x)
            if not shard.last:
                outs = finite_rows(out)
                fine = both(ins, outs)
                mx.eval(out, fine)
                lane.lengths = [n + 1 for n in lane.lengths]
                failed, outcome.nonfinite = self._not_finite(step, ran, ins, outs, fine)
                kept = self._refuse(lane, outcome, failed)
                outcome.out = out if len(kept) == len(ran) else out[mx.array(kept)] if kept else None
                return outcome
            rows = sample_rows(out, ran, self.matchers)
        tokens = rows.tokens
        lane.lengths = [n + 1 for n in lane.lengths]
        fine = both(ins, rows.finite)
        mx.async_eval(tokens, fine)
        # (not with a grammar: its next mask needs this step's tokens read first)
        constrained = any(m.attempt in self.matchers for m in ran)
        if step.ahead and shard.first and not constrained and all(c.is_trimmable() for c in lane.cache):
            # A route of one stage feeds its own tokens back: the next step is built from them
            # before they are read, and computes while this one's go out (mlx-lm's async_eval
            # overlap). When the next step differs (a row ends or joins), it is taken back.
            following = tuple(replace(m, step=m.step + 1) for m in ran)
            lane.ahead = sample_rows(shard.forward(tokens[:, None], lane.cache), following)
            mx.async_eval(lane.ahead.tokens)
        failed, outcome.nonfinite = self._not_finite(step, ran, ins, rows.finite, fine)
        kept = set(self._refuse(lane, outcome, failed))
        outcome.tokens = {m.attempt: t for i, (m, t) in enumerate(zip(ran, tokens.tolist())) if i in kept}
        for attempt, token in outcome.tokens.items():
            if attempt in self.matchers:
                self.matchers[attempt].advance(token)
        if rows.logprobs is not None:  # only when a member asked: the top-k costs a sort a row
            for i, m in enumerate(ran):
                if m.sampling.logprobs is not None and i in kept:
                    outcome.logprobs[m.attempt] = token_logprobs(rows.logprobs[i], outcome.tokens[m.attempt],
                                                                 m.sampling.logprobs)  # fmt: skip
        return outcome

    def _not_finite(self, step: Step, members: tuple[Member, ...], ins: mx.array | None,
                    outs: mx.array, fine: mx.array) -> tuple[list[tuple[Member, str]], bool]:
        """The members whose activations from the previous stage (`ins`) or whose outputs here
        (`outs`) are not all finite (`fine`, evaluated: both are), each with why; and whether
        some were ours alone (finite inputs, not finite outputs)."""
        if all(fine.tolist()):
            return [], False
        first, last = step.layers[0], step.layers[1] - 1
        before = step.route[step.stage - 1][0] if step.stage else ""
        fine_in = ins.tolist() if ins is not None else [True] * len(members)
        failed, own = [], False
        for member, fine_before, fine_here in zip(members, fine_in, outs.tolist()):
            if not fine_before:
                failed.append((member, f"{self.name} refused activations that are not finite (NaN or inf) "
                                       f"from {before} for layers {first}-{last}"))
            elif not fine_here:
                own = True
                failed.append((member, f"{self.name} computed values that are not finite (NaN or inf) "
                                       f"in layers {first}-{last}"))
        return failed, own

    def _refuse(self, lane: LaneCache, outcome: Outcome, failed: list[tuple[Member, str]]) -> list[int]:
        """The `failed` rows of a decode step leave the lane (their caches here hold the values
        refused, and go), and the outcome; returns the indices in outcome.ran of the others."""
        gone = {m.attempt for m, _ in failed}
        kept = [i for i, m in enumerate(outcome.ran) if m.attempt not in gone]
        if gone:
            self._leave(lane, list(gone))
            outcome.failed += failed
            outcome.refused += len(failed)
            outcome.ran = tuple(outcome.ran[i] for i in kept)
        return kept

    # ----- caches ----------------------------------------------------------------------

    def _start(self, shard: Shard, route: Route, origin: Origin) -> Alone | str:
        """A new cache: empty, or a copy of a prefix-cache entry trimmed to origin.length."""
        if not origin.entry:
            return Alone(route, _fresh(shard), 0)
        held = self.entries.get((route, origin.entry))
        if held is None or held.length < origin.length:
            return f"{self.name} does not hold prefix-cache entry {origin.entry}"
        cache = copy.deepcopy(held.cache)
        for c in cache:
            c.trim(held.length - origin.length)
        return Alone(route, cache, origin.length)

    @staticmethod
    def _take_back(lane: LaneCache) -> None:
        """Undo the step built ahead (its position in every row's cache is given up)."""
        if lane.ahead is not None and lane.cache is not None:
            for c in lane.cache:
                c.trim(1)
        lane.ahead = None

    def _join(self, lane: LaneCache, joining: list[tuple[Member, Alone]]) -> None:
        self._take_back(lane)
        # mlx-lm's KVCache.merge: the rows as one batched cache, left-padded to the longest
        merged = [type(layer[0]).merge(list(layer)) for layer in zip(*(alone.cache for _, alone in joining))]
        if lane.cache is None:
            lane.cache = merged
        else:
            for mine, theirs in zip(lane.cache, merged):
                mine.extend(theirs)
        for c in lane.cache:
            c.step = KV_BLOCK
        lane.members += [m.attempt for m, _ in joining]
        lane.lengths += [alone.length for _, alone in joining]

    def _leave(self, lane: LaneCache, attempts: list[str]) -> None:
        if not attempts:
            return
        self._take_back(lane)
        keep = [i for i, a in enumerate(lane.members) if a not in attempts]
        lane.members = [lane.members[i] for i in keep]
        lane.lengths = [lane.lengths[i] for i in keep]
        if not keep:
            lane.cache = None
        elif lane.cache is not None:
            for c in lane.cache:
                c.filter(keep)

    def _release(self, route: Route, attempt: str, length: int, save_as: str) -> None:
        alone = self.alone.pop(attempt, None)
        cache, held = (alone.cache, alone.length) if alone is not None else (None, -1)
        for (lane_route, _), lane in self.lanes.items():
            if lane_route == route and attempt in lane.members and lane.cache is not None:
                self._take_back(lane)
                row = lane.members.index(attempt)
                held = lane.lengths[row]
                cache = [c.extract(row) for c in lane.cache] if save_as else None
                self._leave(lane, [attempt])
                break
        if save_as and cache is not None and held == length:  # a cache out of step is no entry
            for c in cache:
                c.step = KV_BLOCK
            mx.eval([c.state for c in cache])  # unevaluated, a row would hold on to its whole batch
            self.entries[(route, save_as)] = Entry(cache, length, sum(c.nbytes for c in cache))


def _fresh(shard: Shard) -> Cache:
    cache = shard.make_cache()
    for c in cache:
        c.step = KV_BLOCK
    return cache


@dataclass
class Rows:
    """A step's sampled tokens (lazy), whether each row's logits are finite (lazy), and its
    log-probabilities when a member asked for them."""

    tokens: mx.array
    finite: mx.array
    logprobs: mx.array | None = None


def sample_rows(logits: mx.array, members: tuple[Member, ...],
                matchers: dict[str, GrammarMatcher] | None = None) -> Rows:  # fmt: skip
    """Each row's token (lazy): greedy rows by one argmax, the others drawn with their own keys.
    A row with a grammar (`matchers`) has the tokens it forbids masked first, as LocalBackend does."""
    finite = finite_rows(logits)  # of the model's logits: a mask's -inf is no damage
    if matchers and any(m.attempt in matchers for m in members):
        vocab = logits.shape[-1]
        allowed = np.stack([matchers[m.attempt].allowed(vocab) if m.attempt in matchers else np.ones(vocab, bool)
                            for m in members]).reshape(logits.shape)  # fmt: skip
        logits = mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy = mx.argmax(logprobs, axis=-1)
    wanted = logprobs if any(m.sampling.logprobs is not None for m in members) else None
    if all(m.sampling.temperature == 0 for m in members):
        return Rows(greedy, finite, wanted)
    return Rows(mx.concatenate([greedy[i : i + 1] if m.sampling.temperature == 0 else draw(logprobs[i : i + 1], m.sampling, m.step)
                                for i, m in enumerate(members)]), finite, wanted)


def finite_rows(x: mx.array) -> mx.array:
    """Whether each row (first axis) of `x` is finite everywhere: lazy, evaluated with the step
    (one pass over activations a step computes anyway)."""
    return mx.isfinite(x).all(axis=tuple(range(1, x.ndim)))


def both(ins: mx.array | None, outs: mx.array) -> mx.array:
    """Per row: the inputs (None: token ids, at stage 0) and the outputs are finite (lazy)."""
    return outs if ins is None else mx.logical_and(ins, outs)
