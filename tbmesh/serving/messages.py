"""What travels on the data plane, beyond the tensors themselves: pure descriptions, checked.

A request is conducted by its *entry* (the node whose API it entered). Each attempt at it
runs on a *route*: the node and layer range of every stage, fixed when the attempt starts.
The node of stage 0 schedules the route's work; every other stage does what stage 0 decided,
in the order it decided it (TCP between consecutive stages keeps that order):

    entry --Admit(prompt)--> stage 0 --Step(hidden)--> ... --> last stage
      ^                       ^                                    |
      +-----------------------+--------Tokens(sampled)-------------+
                 (stage 0 feeds them back; the entry streams them)

An `Admit` and a `Step` travel as a `wire.Tensor`: the token ids or hidden states are its
payload, the description its `meta` (made by `to_meta`, read back, untrusted, by
`from_meta`, and `Admit.from_tensor` with its tokens, which raise `wire.ProtocolError` on
anything malformed).

A tensor group's ops (its parent and its worker processes, tensor_worker.py) travel as a
`wire.Tensor` too, at the end of this module, with the `Outcome` of a step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from tbmesh.core.generation import Sampling, TokenLogprobs
from tbmesh.core.types import Plan
from tbmesh.net.wire import ProtocolError, Tensor, array_from_tensor, tensor_from_array

Route = tuple[tuple[str, int, int], ...]  # (node, start, end) per stage
Range = tuple[int, int]


def route_of(plan: Plan) -> Route:
    return tuple((s.node, s.start, s.end) for s in plan.stages)


@dataclass(frozen=True)
class Admit:
    """An attempt at a request, sent by its entry to stage 0 of its route.

    `tokens` are the prompt and the `produced` tokens generated before this attempt (a
    resumed request prefills them too); the attempt samples step `produced` first and ends
    at step `max_tokens`, or at a token in `ends`."""

    attempt: str
    route: Route
    entry: str
    tokens: tuple[int, ...]
    produced: int
    max_tokens: int
    sampling: Sampling
    ends: tuple[int, ...]
    use_cache: bool = True  # may start from the route's prefix cache

    @property
    def to(self) -> str:
        return self.route[0][0]

    def meta(self) -> dict[str, Any]:
        s = self.sampling
        return {"kind": "admit", "to": self.to, "route": [list(r) for r in self.route],
                "entry": self.entry, "produced": self.produced, "max_tokens": self.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "logprobs": s.logprobs,
                "ends": list(self.ends), "cache": self.use_cache,
                **({} if s.grammar is None else {"grammar": s.grammar})}  # unconstrained: the bytes as before

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Admit:
        """The admission a tensor carries: its tokens as the int32 payload (as the entry sends
        them), the rest in its meta."""
        if tensor.dtype != "int32" or len(tensor.shape) != 1:
            raise ProtocolError(f"admit: tokens as {tensor.dtype}{list(tensor.shape)}, expected int32[n]")
        tokens = np.frombuffer(tensor.data, np.int32)
        if tokens.size and tokens.min() < 0:
            raise ProtocolError(f"admit: token id {tokens.min()}")
        return cls.from_meta(tensor.request, tokens.tolist(), tensor.meta)

    @classmethod
    def from_meta(cls, attempt: str, tokens: list[int], meta: dict[str, Any]) -> Admit:
        with _checking("admit"):
            admit = cls(str(attempt), _route(meta["route"]), _text(meta["entry"]), tuple(tokens),
                        _count(meta["produced"]), _count(meta["max_tokens"]), _sampling(meta),
                        tuple(_count(t) for t in meta["ends"]), _flag(meta["cache"]))
        if not admit.tokens or admit.produced >= admit.max_tokens:
            raise ProtocolError(f"admit: {len(admit.tokens)} tokens, produced {admit.produced} "
                                f"of {admit.max_tokens}")
        return admit


@dataclass(frozen=True)
class Origin:
    """Where an attempt's KV cache starts on every stage: `length` tokens of the prefix-cache
    entry `entry`, or empty (entry "", length 0)."""

    entry: str = ""
    length: int = 0


@dataclass(frozen=True)
class Constraint:
    """The grammar of a constrained attempt, told to the last stage with its first step:
    `answer` are the tokens generated before this attempt, which its matcher takes first."""

    grammar: str
    answer: tuple[int, ...] = ()


@dataclass(frozen=True)
class Member:
    """One attempt in a step: a row of a decode step (it samples step `step`), or the one
    attempt of a prefill chunk. `position`: the tokens its caches hold before this step
    (every stage checks it). `origin` is set on the attempt's first step on the route."""

    attempt: str
    entry: str
    step: int
    position: int
    sampling: Sampling  # its grammar is not sent with every step: `constraint` carries it once
    origin: Origin | None = None
    constraint: Constraint | None = None  # with the first step of a constrained attempt

    def meta(self) -> list[Any]:
        s, o, c = self.sampling, self.origin, self.constraint
        item = [self.attempt, self.entry, self.step, self.position, s.temperature, s.top_p, s.seed,
                None if o is None else [o.entry, o.length], s.logprobs]
        # unconstrained: as before; flat, as the wire nests no deeper than 4
        return item if c is None else [*item, c.grammar, list(c.answer)]

    @classmethod
    def from_meta(cls, item: Any) -> Member:
        attempt, entry, step, position, temperature, top_p, seed, origin, logprobs, *rest = item
        if len(rest) not in (0, 2):
            raise ValueError(f"a member of {len(item)} fields")
        constraint = Constraint(_text(rest[0]), tuple(_count(t) for t in rest[1])) if rest else None
        return cls(_text(attempt), _text(entry), _count(step), _count(position),
                   Sampling(_number(temperature), _number(top_p), None if seed is None else _count(seed),
                            None if logprobs is None else _count(logprobs)),
                   None if origin is None else Origin(_text(origin[0]), _count(origin[1])), constraint)


@dataclass(frozen=True)
class Release:
    """An attempt leaves the route's stages: its cache (`length` tokens) is freed, or kept
    as the prefix-cache entry `save_as`."""

    attempt: str
    length: int
    save_as: str = ""


@dataclass(frozen=True)
class Step:
    """One forward on every stage of `route`, as stage 0 scheduled it.

    decode:  one token of each member, in the lane `lane` (a batch whose KV caches the
             stages keep together; its members are the lane's rows, in order: members that
             left are gone from the list, new ones are appended at its end)
    prefill: positions [start, start + length) of the one member's prompt
    flush:   no forward; only the releases and evictions

    Before the forward, every stage applies `releases` and drops the prefix-cache entries
    in `evictions`, so that all stages hold the same caches as stage 0 believes."""

    route: Route
    stage: int
    kind: Literal["decode", "prefill", "flush"]
    lane: str = ""
    members: tuple[Member, ...] = ()
    start: int = 0
    length: int = 0
    releases: tuple[Release, ...] = ()
    evictions: tuple[str, ...] = ()
    ahead: bool = False  # a lane's next step will most likely be this one again (see stage.py)

    @property
    def to(self) -> str:
        return self.route[self.stage][0]

    @property
    def layers(self) -> Range:
        return self.route[self.stage][1:]

    @property
    def last(self) -> bool:
        return self.stage == len(self.route) - 1

    @property
    def rows(self) -> int:
        """Rows of the tensor the step carries."""
        return len(self.members) if self.kind == "decode" else 1

    def onward(self, ran: tuple[Member, ...] | None) -> Step:
        """The step for the next stage, once this one ran the members `ran` (None: nothing
        ran here, and only the releases and evictions go on)."""
        if ran is None:
            return replace(self, stage=self.stage + 1, kind="flush", members=())
        return replace(self, stage=self.stage + 1, members=ran)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "to": self.to, "route": [list(r) for r in self.route],
                "stage": self.stage, "lane": self.lane, "members": [m.meta() for m in self.members],
                "start": self.start, "length": self.length,
                "releases": [[r.attempt, r.length, r.save_as] for r in self.releases],
                "evictions": list(self.evictions), "ahead": self.ahead}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Step:
        with _checking("step"):
            kind = meta["kind"]
            if kind not in ("decode", "prefill", "flush"):
                raise ValueError(f"kind {kind!r:.20}")
            step = cls(_route(meta["route"]), _count(meta["stage"]), kind, _text(meta["lane"]),
                       tuple(Member.from_meta(m) for m in meta["members"]), _count(meta["start"]),
                       _count(meta["length"]),
                       tuple(Release(_text(a), _count(n), _text(s)) for a, n, s in meta["releases"]),
                       tuple(_text(e) for e in meta["evictions"]), _flag(meta["ahead"]))
        if step.stage >= len(step.route) or (kind == "prefill" and (len(step.members) != 1 or not step.length)):
            raise ProtocolError(f"step: stage {step.stage} of {len(step.route)}, {kind} of "
                                f"{len(step.members)} members and {step.length} tokens")
        return step


# --- what a step produced, and a tensor group's ops ------------------------------------------
#
# A group's rank 0 worker (tensor_worker.py) runs a step for its parent and answers with the
# Outcome. The parent and its workers talk in ops, each a Tensor: the op and its fields in
# `meta`, a step's input or output the payload. Between a daemon and the worker processes it
# started: read as they are, not checked as a peer's messages are.


@dataclass
class Outcome:
    """What a step produced here: `out` for the next stage (hidden states, an mx.array) or the
    sampled tokens (last stage: member -> token), the members it ran, and those it could not."""

    out: Any = None
    ran: tuple[Member, ...] = ()
    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # of the members that asked
    failed: list[tuple[Member, str]] = field(default_factory=list)
    refused: int = 0  # rows of `failed` refused for values that are not finite
    nonfinite: bool = False  # our layers made NaN or inf of finite inputs (are their weights damaged?)


@dataclass(frozen=True)
class Held:
    """What a group's caches hold after an op, as StageCaches reports it."""

    in_use: frozenset[Range] = frozenset()
    figures: dict[str, int] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    attempts: int = 0


def op_frame(op: str, array: Any = None, **fields: Any) -> Tensor:
    """An op (step, drop, stop; a worker's ready, done, error), its fields in meta."""
    return tensor_from_array(np.zeros((0,), np.int32) if array is None else array, meta={**fields, "op": op})


def step_frame(step: Step, x: Any) -> Tensor:
    return op_frame("step", x, **step.meta())


def outcome_frame(outcome: Outcome, held: Held) -> Tensor:
    """Rank 0's answer to a step: the Outcome, its hidden states as the payload."""
    logprobs = {attempt: [lp.token, lp.logprob, [t for t, _ in lp.top], [p for _, p in lp.top]]
                for attempt, lp in outcome.logprobs.items()}
    return op_frame("done", outcome.out, ran=[m.meta() for m in outcome.ran],
                    failed=[m.meta() for m, _ in outcome.failed], why=[why for _, why in outcome.failed],
                    refused=outcome.refused, tokens=outcome.tokens, logprobs=logprobs, **_held_fields(held))


def held_frame(held: Held) -> Tensor:
    """Rank 0's answer to a drop: what the caches hold now."""
    return op_frame("done", **_held_fields(held))


def _held_fields(held: Held) -> dict[str, Any]:
    return {"in_use": [list(r) for r in sorted(held.in_use)], "figures": held.figures,
            "routes": [[list(s) for s in route] for route in held.routes], "attempts": held.attempts}


def held_of(meta: dict[str, Any]) -> Held:
    return Held(frozenset((s, e) for s, e in meta["in_use"]), dict(meta["figures"]),
                tuple(tuple((n, s, e) for n, s, e in route) for route in meta["routes"]), meta["attempts"])


def outcome_of(frame: Tensor) -> tuple[Outcome, Held]:
    meta = frame.meta
    logprobs = {a: TokenLogprobs(token, logprob, tuple(zip(tokens, probs)))
                for a, (token, logprob, tokens, probs) in meta["logprobs"].items()}
    outcome = Outcome(array_from_tensor(frame) if frame.shape != (0,) else None,
                      tuple(Member.from_meta(m) for m in meta["ran"]), dict(meta["tokens"]), logprobs,
                      [(Member.from_meta(m), why) for m, why in zip(meta["failed"], meta["why"])],
                      refused=meta["refused"])
    return outcome, held_of(meta)


# --- checks of untrusted fields ----------------------------------------------------------------


@contextmanager
def _checking(what: str) -> Iterator[None]:
    """Turns what a malformed meta raises into one ProtocolError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ProtocolError(f"{what} meta: {type(error).__name__}: {error}"[:200]) from None


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a count, got {value!r:.40}")
    return value


def _number(value: Any) -> float:
    """A finite float (an int too, as wire allows): not a string float() would parse ("inf")."""
    if type(value) not in (float, int) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r:.40}")
    return float(value)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a string, got {value!r:.40}")
    return value


def _flag(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"expected a bool, got {value!r:.40}")
    return value


def _route(value: Any) -> Route:
    route = tuple((_text(n), _count(s), _count(e)) for n, s, e in value)
    if not route or any(s >= e for _, s, e in route):
        raise ValueError(f"route {route!r:.80}")
    return route


def _sampling(meta: dict[str, Any]) -> Sampling:
    seed, logprobs, grammar = meta["seed"], meta["logprobs"], meta.get("grammar")
    return Sampling(_number(meta["temperature"]), _number(meta["top_p"]), None if seed is None else _count(seed),
                    None if logprobs is None else _count(logprobs), None if grammar is None else _text(grammar))
