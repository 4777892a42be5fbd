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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from tbmesh.core.generation import Sampling
from tbmesh.core.types import Plan
from tbmesh.net.wire import ProtocolError, Tensor

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
                "ends": list(self.ends), "cache": self.use_cache}

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
class Member:
    """One attempt in a step: a row of a decode step (it samples step `step`), or the one
    attempt of a prefill chunk. `position`: the tokens its caches hold before this step
    (every stage checks it). `origin` is set on the attempt's first step on the route."""

    attempt: str
    entry: str
    step: int
    position: int
    sampling: Sampling
    origin: Origin | None = None

    def meta(self) -> list[Any]:
        s, o = self.sampling, self.origin
        return [self.attempt, self.entry, self.step, self.position, s.temperature, s.top_p, s.seed,
                None if o is None else [o.entry, o.length], s.logprobs]

    @classmethod
    def from_meta(cls, item: Any) -> Member:
        attempt, entry, step, position, temperature, top_p, seed, origin, logprobs = item
        return cls(_text(attempt), _text(entry), _count(step), _count(position),
                   Sampling(_number(temperature), _number(top_p), None if seed is None else _count(seed),
                            None if logprobs is None else _count(logprobs)),
                   None if origin is None else Origin(_text(origin[0]), _count(origin[1])))


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
    seed, logprobs = meta["seed"], meta["logprobs"]
    return Sampling(_number(meta["temperature"]), _number(meta["top_p"]), None if seed is None else _count(seed),
                    None if logprobs is None else _count(logprobs))
