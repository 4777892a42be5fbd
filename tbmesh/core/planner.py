"""Layer planner: which contiguous range of layers each node holds.

Pure code: no I/O, no clock, no randomness. Same inputs give the same plan, whatever the
order of `nodes` and `links` (everything is sorted by node id first).

Terms
-----
- A layer's *cost* on a node is its weight bytes plus KV room for the configured context
  (`kv_bytes_per_token_per_layer * context`). The first stage also holds the embedding, the
  last one the head. A node's *capacity* is its `memory_usable`.
- Nodes that cannot hold the smallest layer are *too small*: left out before anything else.
  The others are *eligible*; node i's *share* is `L * usable_i / sum(usable of eligible)`.
- The *band* of a node is the layer counts k with |k - share| <= 1 (k = 0 allowed when
  share <= 1: the node may be left out as not needed).
- A hop's speed is compared in buckets floor(log2(bytes_per_s)), so a few % of measurement
  noise does not reshuffle a plan. A pair with no link is `NO_LINK`; a link not measured
  yet is bucket 0 (a cable of unknown speed still beats no cable); a plan with one stage has
  no hop at all (`NO_HOP`, the best).

Objective
---------
Plans are ranked lexicographically by
  1. in-band: a plan with every node in its band beats any other (proportional to memory
     unless capacity forces otherwise);
  2. bottleneck: the slowest hop between consecutive stages, fastest first;
  3. deviation: sum over nodes of max(0, |k - share| - 1)^2 (0 for in-band plans);
  4. moved bytes: `bytes_to_load` summed against `previous` (a join or leave does not
     reshuffle everyone);
  5. closeness: sum of (k - share)^2, so that among equals the most proportional wins;
  6. ties: the first found, searching in node-id order (between candidate orders: the
     tuple of stage node ids), so the result never depends on the input order.

Search
------
A dynamic programme over (nodes so far, layers covered so far) picks the layer counts
minimising (deviation, moved, closeness); it is vectorised with numpy over the layers
covered. For the bottleneck, thresholds t are tried from the fastest bucket down: at t, a
stage may only follow one joined to it by a link of bucket >= t (at NO_LINK, any pair).
- Up to 6 eligible nodes, every order at once: the state is (set of nodes used, last node,
  covered), 2^n n states; at NO_LINK the last node does not matter and is dropped.
- Beyond, a few candidate orders, each with a DP over (position in the order, covered):
  "dense" (each node takes k layers, k = 0 leaves it out; at NO_LINK) or "sparse" (state:
  last position that took layers; a link of bucket >= t joins it to the next). When every
  node must take layers, an order's bottleneck is simply its slowest hop. The orders: the
  previous plan's with new nodes inserted where the bottleneck is best, a greedy
  max-bottleneck chain over the links (start at the least-linked node, always take the
  fastest link to an unvisited node), id order, and (relaxed) the feasibility check's.
The band (k within 1 of the share) is searched first; only when it has no solution does the
relaxed search (any k that fits) run. Typical cost: under 20 ms for 256 nodes (bench/planner.py).

Tensor groups (`parallel` other than "pipeline"): a stage may be a group of Macs cabled all
to all, each holding its share of every layer; tbmesh.core.groups says how they are chosen.

Feasibility (`feasible_order`, `fits_anywhere`) only asks whether *some* partition exists:
a bitmask DP, exact up to 12 eligible nodes, a greedy heuristic beyond.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from tbmesh.core.groups import (
    MIN_SPEEDUP,
    PARALLEL,
    Parallel,
    all_reduce_us,
    cliques,
    decode_s,
    describe_link,
    group_link,
    link_between,
    member_bytes,
    unsplittable,
)
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Placement, Stage

GB = 1e9
NO_LINK = -1  # bucket of a pair of nodes with no link
NO_HOP = 1 << 30  # bottleneck of a one-stage plan: no hop at all

_BIG = 1 << 61  # unreachable DP state; valid keys stay far below, so sums never overflow
_DEV_QUANTUM = 1 << 10  # deviations are squared layers * quantum, rounded: exact integer sums
_EXACT_ORDERS = 6  # every order (subset DP) up to this many eligible nodes
_EXACT_FEASIBILITY = 12  # bitmask feasibility DP up to this many eligible nodes
_LIST_MAX = 8  # reasons name nodes one by one up to this many


# ---------------------------------------------------------------------------- public helpers


def stage_bytes(model: ModelSpec, start: int, end: int, first: bool, last: bool) -> int:
    """Weight bytes of a stage holding layers [start, end) (plus embedding/head at the ends)."""
    ends = (model.embed_bytes if first else 0) + (model.head_bytes if last else 0)
    return sum(model.layer_bytes[start:end]) + ends


def bytes_to_load(
    model: ModelSpec, stages: Sequence[Stage], previous: Sequence[Stage] | None
) -> dict[str, int]:
    """Per node of `stages`: weight bytes it owns there but did not own in `previous`.

    Layers count by range overlap; the embedding counts when a node becomes the first stage,
    the head when it becomes the last.
    """
    new = sorted(stages, key=lambda s: s.start)
    old = sorted(previous or (), key=lambda s: s.start)
    old_range = {s.node: (s.start, s.end) for s in old}
    old_first = old[0].node if old else None
    old_last = old[-1].node if old else None
    out: dict[str, int] = {}
    for i, s in enumerate(new):
        a, b = old_range.get(s.node, (0, 0))
        kept = sum(model.layer_bytes[max(s.start, a) : min(s.end, b)])
        moved = sum(model.layer_bytes[s.start : s.end]) - kept
        if i == 0 and s.node != old_first:
            moved += model.embed_bytes
        if i == len(new) - 1 and s.node != old_last:
            moved += model.head_bytes
        out[s.node] = moved
    return out


def link_bucket(bytes_per_s: float) -> int:
    """floor(log2(bytes_per_s)), exactly (frexp); 0 for a link not measured yet."""
    if bytes_per_s <= 0:
        return 0
    return max(0, math.frexp(bytes_per_s)[1] - 1)


def fits_anywhere(model: ModelSpec, nodes: Sequence[NodeInfo], context: int = 0) -> bool:
    """Whether some partition exists (any subset of nodes, any order, any cut points)."""
    return feasible_order(model, nodes, context) is not None


def feasible_order(
    model: ModelSpec, nodes: Sequence[NodeInfo], context: int = 0
) -> tuple[str, ...] | None:
    """Ids of nodes, in pipeline order, of some valid partition (capacities only), or None.

    Exact up to 12 eligible nodes (bitmask DP), a greedy heuristic beyond.
    """
    costs = _Costs.of(model, context)
    cand = sorted(
        ((n.id, n.memory_usable) for n in nodes if n.memory_usable >= costs.min_layer),
    )
    ids = [i for i, _ in cand]
    caps = [c for _, c in cand]
    order = _feasible(costs, caps)
    return None if order is None else tuple(ids[i] for i in order)


def extra_capacity_needed(model: ModelSpec, nodes: Sequence[NodeInfo], context: int = 0) -> int:
    """Smallest usable bytes of one more node that make the model fit (0 if it fits).

    Exact up to 12 eligible nodes: the new node takes the gap between the most that a set A
    of nodes covers from the front and the least that the other nodes cover from the back.
    Beyond, a binary search with the greedy feasibility heuristic.
    """
    costs = _Costs.of(model, context)
    caps = sorted(n.memory_usable for n in nodes if n.memory_usable >= costs.min_layer)
    if len(caps) <= _EXACT_FEASIBILITY:
        return _extra_exact(costs, caps)
    return _extra_search(costs, caps)


# ---------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class _Costs:
    """Layer costs (weights + KV room) as a prefix sum, and the two ends."""

    L: int
    E: int
    H: int
    cum: tuple[int, ...]  # cum[i] = cost of layers [0, i)
    min_layer: int
    max_layer: int

    @classmethod
    def of(cls, model: ModelSpec, context: int) -> _Costs:
        kv = model.kv_bytes_per_token_per_layer * context
        per = [b + kv for b in model.layer_bytes]
        cum = tuple(itertools.accumulate(per, initial=0))
        return cls(
            model.num_layers, model.embed_bytes, model.head_bytes, cum,
            min(per, default=0), max(per, default=0),
        )

    @property
    def need(self) -> int:
        return self.cum[-1] + self.E + self.H

    def span(self, p: int, q: int) -> int:
        """Cost of a stage holding layers [p, q)."""
        ends = (self.E if p == 0 else 0) + (self.H if q == self.L else 0)
        return self.cum[q] - self.cum[p] + ends

    def fill(self, p: int, cap: int) -> int:
        """Furthest end e < L a non-last stage starting at p can reach (p: not one layer)."""
        limit = self.cum[p] + cap - (self.E if p == 0 else 0)
        e = min(bisect.bisect_right(self.cum, limit) - 1, self.L - 1)
        return max(e, p)

    def back_fill(self, q: int, cap: int) -> int:
        """Earliest start s >= 1 a non-first stage ending at q can reach (q: not one layer)."""
        limit = self.cum[q] - cap + (self.H if q == self.L else 0)
        s = max(bisect.bisect_left(self.cum, limit), 1)
        return min(s, q)


# ---------------------------------------------------------------------------- feasibility


def _feasible(costs: _Costs, caps: Sequence[int]) -> list[int] | None:
    if len(caps) <= _EXACT_FEASIBILITY:
        return _feasible_exact(costs, caps)
    return _feasible_greedy(costs, caps)


def _feasible_exact(costs: _Costs, caps: Sequence[int]) -> list[int] | None:
    """Bitmask DP: best[mask] = most layers covered from layer 0 by the nodes of mask.

    Each node fills its stage as far as it can: covering more with earlier stages never
    hurts the later ones (the rest only shrinks), so greedy fill is optimal for an order,
    and the DP over subsets covers every order. A node that cannot take a layer is skipped.
    """
    n, L = len(caps), costs.L
    best = [0] * (1 << n)
    parent: list[tuple[int, int]] = [(-1, -1)] * (1 << n)
    for mask in range(1 << n):
        p = best[mask]
        for j in range(n):
            bit = 1 << j
            if mask & bit:
                continue
            if costs.span(p, L) <= caps[j]:  # j can be the last stage
                return _unwind(parent, best, mask) + [j]
            e = costs.fill(p, caps[j])
            if parent[mask | bit][0] < 0 or e > best[mask | bit]:
                best[mask | bit] = e
                parent[mask | bit] = (mask, j)
    return None


def _unwind(parent: list[tuple[int, int]], best: list[int], mask: int) -> list[int]:
    """Nodes that took layers on the way to `mask`, in pipeline order."""
    order: list[int] = []
    while mask:
        prev, j = parent[mask]
        if best[mask] > best[prev]:
            order.append(j)
        mask = prev
    return order[::-1]


def _greedy_orders(caps: Sequence[int]) -> list[list[int]]:
    by_cap = sorted(range(len(caps)), key=lambda i: (-caps[i], i))
    big_last = by_cap[1:] + by_cap[:1]
    return [by_cap, big_last, list(range(len(caps)))]


def _fill_order(costs: _Costs, caps: Sequence[int], order: Sequence[int]) -> list[int] | None:
    """Greedy fill in a fixed order (optimal for that order); the used nodes, or None."""
    p, used = 0, []
    for j in order:
        if costs.span(p, costs.L) <= caps[j]:
            return used + [j]
        e = costs.fill(p, caps[j])
        if e > p:
            used.append(j)
            p = e
    return None


def _feasible_greedy(costs: _Costs, caps: Sequence[int]) -> list[int] | None:
    """Heuristic for many nodes: greedy fill in three orders (biggest first, biggest last, id)."""
    for order in _greedy_orders(caps):
        used = _fill_order(costs, caps, order)
        if used is not None:
            return used
    return None


def _extra_exact(costs: _Costs, caps: Sequence[int]) -> int:
    """Exact smallest capacity of one more node that makes a partition exist."""
    n, L = len(caps), costs.L
    full = (1 << n) - 1
    front = [0] * (1 << n)  # most layers covered from the front, without the last stage
    back = [L] * (1 << n)  # earliest start covered to the end (with the head), not the first
    for mask in range(1 << n):
        for j in range(n):
            bit = 1 << j
            if mask & bit:
                continue
            front[mask | bit] = max(front[mask | bit], costs.fill(front[mask], caps[j]))
            back[mask | bit] = min(back[mask | bit], costs.back_fill(back[mask], caps[j]))
    if any(costs.span(0, L) <= c for c in caps):
        return 0
    extra = costs.need
    for a in range(1 << n):
        p, q = front[a], back[full & ~a]
        if p >= q:  # the two halves meet (q < L here since p < L): it already fits
            return 0
        extra = min(extra, costs.span(p, q))
    return extra


def _extra_search(costs: _Costs, caps: Sequence[int]) -> int:
    """Binary search on a virtual node's capacity with the greedy feasibility heuristic."""
    if _feasible_greedy(costs, caps) is not None:
        return 0
    lo, hi = 0, costs.need  # hi: the virtual node alone holds everything
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible_greedy(costs, [*caps, mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------------------- planning context


@dataclass
class _Row:
    """One eligible node as the DP sees it in one mode (band or relaxed)."""

    index: int  # in _Context.ids
    cap: int
    kmin: int  # 0: the node may be left out
    kmax: int
    dev: list[int]  # dev[k], quantised
    close: list[int]  # closeness[k], quantised, in packed-key units
    moved: np.ndarray  # moved(p, q) = moved[q] - moved[p], in packed-key units
    embed_moved: int  # packed units charged when the node becomes the first stage
    head_moved: int


@dataclass
class _Context:
    costs: _Costs
    cum: np.ndarray
    weights: np.ndarray  # prefix of layer weight bytes
    ids: list[str]  # eligible node ids, sorted
    caps: list[int]
    total: int  # sum of eligible capacity (denominator of the shares)
    buckets: dict[tuple[str, str], int]
    adj: dict[str, dict[str, int]]  # node -> linked node -> bucket
    prev_range: dict[str, tuple[int, int]]
    prev_first: str | None
    prev_last: str | None
    prev_order: list[str]

    def share(self, i: int) -> float:
        return self.costs.L * self.caps[i] / self.total

    def hop(self, a: str, b: str) -> int:
        return self.buckets.get((a, b) if a < b else (b, a), NO_LINK)

    def bottleneck(self, ids: Sequence[str]) -> int:
        return min((self.hop(a, b) for a, b in itertools.pairwise(ids)), default=NO_HOP)


def _buckets(links: Sequence[LinkInfo], ids: set[str]) -> dict[tuple[str, str], int]:
    """Best bucket per pair (both ends may report the link); unknown nodes are ignored."""
    out: dict[tuple[str, str], int] = {}
    for link in links:
        if link.a == link.b or link.a not in ids or link.b not in ids:
            continue
        pair = (link.a, link.b) if link.a < link.b else (link.b, link.a)
        out[pair] = max(out.get(pair, NO_LINK), link_bucket(link.bytes_per_s))
    return out


def _context(
    model: ModelSpec, costs: _Costs, eligible: list[NodeInfo],
    links: Sequence[LinkInfo], previous: Sequence[Stage] | None,
) -> _Context:
    ids = [n.id for n in eligible]
    caps = [n.memory_usable for n in eligible]
    old = sorted(previous or (), key=lambda s: s.start)
    L = costs.L
    buckets = _buckets(links, set(ids))
    adj: dict[str, dict[str, int]] = {i: {} for i in ids}
    for (a, b), bucket in buckets.items():
        adj[a][b] = adj[b][a] = bucket
    return _Context(
        costs=costs,
        cum=np.array(costs.cum, dtype=np.int64),
        weights=np.array(list(itertools.accumulate(model.layer_bytes, initial=0)), dtype=np.int64),
        ids=ids,
        caps=caps,
        total=sum(caps) or len(caps),
        buckets=buckets,
        adj=adj,
        prev_range={s.node: (min(s.start, L), min(s.end, L)) for s in old},
        prev_first=old[0].node if old else None,
        prev_last=old[-1].node if old else None,
        prev_order=[s.node for s in old],
    )


def _rows(ctx: _Context, band: bool) -> list[_Row]:
    """Per eligible node: allowed counts and the per-k / per-range terms of the objective."""
    L, U = ctx.costs.L, ctx.total
    caps = ctx.caps if sum(ctx.caps) else [1] * len(ctx.caps)  # all-zero model: equal shares
    ranges = []
    for c, real in zip(caps, ctx.caps):
        if band:  # |k - share| <= 1, exactly, in integers
            lo = max(0, -((U - L * c) // U))
            hi = min(L, (L * c + U) // U)
        else:
            lo = 0
            hi = min(L, real // ctx.costs.min_layer) if ctx.costs.min_layer else L
        ranges.append((lo, hi))
    close_f = [[((k * U - L * c) / U) ** 2 for k in range(hi + 1)]
               for c, (_, hi) in zip(caps, ranges)]
    scale, fm = _close_scale(ctx, close_f)
    rows = []
    for i, (c, (lo, hi)) in enumerate(zip(caps, ranges)):
        dev = [round(max(0.0, abs(k * U - L * c) / U - 1) ** 2 * _DEV_QUANTUM)
               for k in range(hi + 1)]
        node = ctx.ids[i]
        a, b = ctx.prev_range.get(node, (0, 0))
        kept = ctx.weights[np.clip(np.arange(L + 1), a, b)]
        rows.append(_Row(
            index=i, cap=ctx.caps[i], kmin=lo, kmax=hi, dev=dev,
            close=[round(x * scale) for x in close_f[i]],
            moved=(ctx.weights - kept) * fm,
            embed_moved=0 if node == ctx.prev_first else ctx.costs.E * fm,
            head_moved=0 if node == ctx.prev_last else ctx.costs.H * fm,
        ))
    return rows


def _close_scale(ctx: _Context, close_f: list[list[float]]) -> tuple[int, int]:
    """Quantum for closeness and the factor packing (moved, closeness) into one int64.

    key = moved * fm + closeness, with closeness < fm. Closeness is only a tie-break, so
    its quantum shrinks (to 0 if need be) to keep keys far below _BIG.
    """
    worst = sum(max(c) for c in close_f)
    moved_max = ctx.costs.E + ctx.costs.H + int(ctx.weights[-1]) + 1
    scale = 1 << 10
    while scale:
        fm = int(worst * scale) + len(close_f) + 1
        if moved_max * fm < _BIG >> 2:
            return scale, fm
        scale >>= 1
    return 0, 1


# ---------------------------------------------------------------------------- the DP


@dataclass
class _State:
    """Best keys per layers covered q in [lo, hi], with the choice that led there."""

    lo: int
    hi: int
    key: np.ndarray  # packed (moved, closeness); _BIG = unreachable
    dev: np.ndarray | None  # primary key in relaxed mode
    pred: np.ndarray  # predecessor position (-1: the start)
    k: np.ndarray  # layers taken by this node

    @classmethod
    def empty(cls, lo: int, hi: int, relaxed: bool) -> _State:
        w = hi - lo + 1
        return cls(
            lo, hi, np.full(w, _BIG, np.int64),
            np.full(w, _BIG, np.int64) if relaxed else None,
            np.full(w, -1, np.int32), np.zeros(w, np.int32),
        )

    @classmethod
    def start(cls, key: int, dev: int, relaxed: bool) -> _State:
        s = cls.empty(0, 0, relaxed)
        s.key[0] = key
        if s.dev is not None:
            s.dev[0] = dev
        return s

    def alive(self) -> bool:
        return bool((self.key if self.dev is None else self.dev).min() < _BIG)

    def keys_at(self, q: int) -> tuple[int, ...]:
        i = q - self.lo
        return (int(self.key[i]),) if self.dev is None else (int(self.dev[i]), int(self.key[i]))

    def floor(self) -> tuple[int, ...]:
        """Lexicographic minimum: a lower bound of every plan that goes on from here."""
        if self.dev is None:
            return (int(self.key.min()),)
        d = self.dev.min()
        return (int(d), int(self.key[self.dev == d].min()))


def _extend(ctx: _Context, src: _State, src_pos: int, row: _Row, kfrom: int,
            out: _State, extra_key: int = 0, extra_dev: int = 0) -> None:
    """Merge into `out` every way `row` can go on from `src` taking k >= kfrom layers.

    extra_* are the terms of nodes left out between src and row (sparse DP).
    Ties keep the earlier candidate, so the result is deterministic.
    """
    if src.lo == src.hi:
        _extend_point(ctx, src, src_pos, row, kfrom, out, extra_key, extra_dev)
        return
    L, cum = ctx.costs.L, ctx.cum
    for k in range(kfrom, row.kmax + 1):
        q0, q1 = max(src.lo + k, out.lo), min(src.hi + k, out.hi)
        if q0 > q1:
            continue
        p0, p1 = q0 - k, q1 - k
        s = slice(p0 - src.lo, p1 - src.lo + 1)
        key = src.key[s] + (row.close[k] + extra_key)
        ok = None
        if k > 0:
            cost = cum[q0 : q1 + 1] - cum[p0 : p1 + 1]
            key += row.moved[q0 : q1 + 1] - row.moved[p0 : p1 + 1]
            if p0 == 0:
                cost[0] += ctx.costs.E
                key[0] += row.embed_moved
            if q1 == L:
                cost[-1] += ctx.costs.H
                key[-1] += row.head_moved
            ok = cost <= row.cap
            key[~ok] = _BIG
        np.minimum(key, _BIG, out=key)
        o = slice(q0 - out.lo, q1 - out.lo + 1)
        if out.dev is None:
            better = key < out.key[o]
        else:
            dev = src.dev[s] + (row.dev[k] + extra_dev)
            if ok is not None:
                dev[~ok] = _BIG
            np.minimum(dev, _BIG, out=dev)
            od = out.dev[o]
            better = (dev < od) | ((dev == od) & (key < out.key[o]))
            np.copyto(od, dev, where=better)
        np.copyto(out.key[o], key, where=better)
        np.copyto(out.pred[o], src_pos, where=better)
        np.copyto(out.k[o], k, where=better)


def _extend_point(ctx: _Context, src: _State, src_pos: int, row: _Row, kfrom: int,
                  out: _State, extra_key: int, extra_dev: int) -> None:
    """`_extend` from a state with a single q (the start): scalar code, much cheaper."""
    p, L = src.lo, ctx.costs.L
    base_key = int(src.key[0]) + extra_key
    base_dev = int(src.dev[0]) + extra_dev if src.dev is not None else 0
    if base_key >= _BIG or base_dev >= _BIG:
        return
    for k in range(kfrom, row.kmax + 1):
        q = p + k
        if q > out.hi or (k > 0 and ctx.costs.span(p, q) > row.cap):
            break  # a stage only gets dearer with more layers
        if q < out.lo:
            continue
        key = base_key + row.close[k]
        if k > 0:
            key += int(row.moved[q] - row.moved[p])
            key += (row.embed_moved if p == 0 else 0) + (row.head_moved if q == L else 0)
        i = q - out.lo
        if out.dev is None:
            better = key < out.key[i]
        else:
            dev = base_dev + row.dev[k]
            better = (dev, key) < (out.dev[i], out.key[i])
            if better:
                out.dev[i] = dev
        if better:
            out.key[i], out.pred[i], out.k[i] = key, src_pos, k


@dataclass(frozen=True)
class _Result:
    stages: tuple[tuple[int, int, int], ...]  # (eligible index, start, end)
    ids: tuple[str, ...]
    bottleneck: int
    keys: tuple[int, ...]

    @property
    def rank(self) -> tuple:
        return (-self.bottleneck, self.keys, self.ids)


def _result(ctx: _Context, stages: list[tuple[int, int, int]], keys: tuple[int, ...]) -> _Result:
    stages = stages[::-1]  # built from the back
    ids = tuple(ctx.ids[i] for i, _, _ in stages)
    return _Result(tuple(stages), ids, ctx.bottleneck(ids), keys)


def _remaining(rows: Sequence[_Row]) -> tuple[list[int], list[int]]:
    """Least / most layers the nodes from position m on can still take."""
    lo, hi = [0] * (len(rows) + 1), [0] * (len(rows) + 1)
    for m in range(len(rows) - 1, -1, -1):
        lo[m] = lo[m + 1] + rows[m].kmin
        hi[m] = hi[m + 1] + rows[m].kmax
    return lo, hi


def _dense(ctx: _Context, rows: Sequence[_Row], relaxed: bool,
           bound: tuple[int, ...] | None) -> _Result | None:
    """Nodes in this order, each taking k layers (0 = left out); hops ignored.

    Gives up as soon as every partial plan is already worse than `bound`.
    """
    L = ctx.costs.L
    least, most = _remaining(rows)
    if not least[0] <= L <= most[0]:
        return None
    cur = _State.start(0, 0, relaxed)
    history = []
    for m, row in enumerate(rows):
        lo = max(cur.lo + row.kmin, L - most[m + 1])
        hi = min(cur.hi + row.kmax, L - least[m + 1])
        if lo > hi:
            return None
        out = _State.empty(lo, hi, relaxed)
        _extend(ctx, cur, m - 1, row, row.kmin, out)
        if not out.alive() or (bound is not None and out.floor() > bound):
            return None
        history.append(out)
        cur = out
    stages, q = [], L
    for m in range(len(rows) - 1, -1, -1):
        k = int(history[m].k[q - history[m].lo])
        if k:
            stages.append((rows[m].index, q - k, q))
            q -= k
    return _result(ctx, stages, cur.keys_at(L))


def _sparse(ctx: _Context, rows: Sequence[_Row], relaxed: bool, threshold: int) -> _Result | None:
    """Stages joined only by hops of bucket >= threshold; nodes in between are left out.

    State (position of the last node that took layers, layers covered). With
    threshold NO_HOP no hop is allowed: one-stage plans only.
    """
    n, L = len(rows), ctx.costs.L
    pos = {ctx.ids[r.index]: m for m, r in enumerate(rows)}
    must = list(itertools.accumulate((r.kmin > 0 for r in rows), initial=0))  # count before m
    skip_key = list(itertools.accumulate((r.close[0] for r in rows), initial=0))
    skip_dev = list(itertools.accumulate((r.dev[0] for r in rows), initial=0))
    least, most = _remaining(rows)
    linked: list[list[int]] = [[] for _ in range(n)]
    if threshold != NO_HOP:
        for (a, b), bucket in ctx.buckets.items():
            if bucket >= threshold and a in pos and b in pos:
                i, j = sorted((pos[a], pos[b]))
                linked[j].append(i)
    if not _may_reach(rows, linked, must, L):
        return None
    start = _State.start(0, 0, relaxed)
    states: list[_State | None] = [None] * n
    for j, row in enumerate(rows):
        srcs = []
        if must[j] == 0:
            srcs.append((-1, start, skip_key[j], skip_dev[j]))
        for i in sorted(linked[j]):
            if states[i] is not None and must[j] == must[i + 1]:
                left_out = (skip_key[j] - skip_key[i + 1], skip_dev[j] - skip_dev[i + 1])
                srcs.append((i, states[i], *left_out))
        if not srcs:
            continue
        kfrom = max(1, row.kmin)
        lo = max(min(s.lo for _, s, _, _ in srcs) + kfrom, L - most[j + 1])
        hi = min(max(s.hi for _, s, _, _ in srcs) + row.kmax, L - least[j + 1], L)
        if lo > hi:
            continue
        out = _State.empty(lo, hi, relaxed)
        for i, src, ek, ed in srcs:
            _extend(ctx, src, i, row, kfrom, out, ek, ed)
        states[j] = out if out.alive() else None
    best: tuple[tuple[int, ...], int] | None = None
    for j, st in enumerate(states):
        if st is None or st.hi < L or must[n] != must[j + 1]:
            continue
        keys = st.keys_at(L)
        if keys[0] >= _BIG:
            continue
        tail = (skip_key[n] - skip_key[j + 1],)
        if relaxed:
            tail = (skip_dev[n] - skip_dev[j + 1], *tail)
        keys = tuple(a + b for a, b in zip(keys, tail))
        if best is None or keys < best[0]:
            best = (keys, j)
    if best is None:
        return None
    stages, q, j = [], L, best[1]
    while j >= 0:
        st = states[j]
        assert st is not None
        k, i = int(st.k[q - st.lo]), int(st.pred[q - st.lo])
        stages.append((rows[j].index, q - k, q))
        q, j = q - k, i
    return _result(ctx, stages, best[0])

def _windows(rows: Sequence[_Row], L: int) -> tuple[list[int], list[int]]:
    """Per mask of nodes that all took layers: the range of layers they can have covered."""
    n = len(rows)
    took = [0] * (1 << n)  # least layers the nodes of mask took (>= 1 each)
    most = [0] * (1 << n)
    must = [0] * (1 << n)  # least the nodes outside... summed inside mask, for the complement
    for mask in range(1, 1 << n):
        j = (mask & -mask).bit_length() - 1
        rest = mask & (mask - 1)
        took[mask] = took[rest] + max(1, rows[j].kmin)
        most[mask] = most[rest] + rows[j].kmax
        must[mask] = must[rest] + rows[j].kmin
    full = (1 << n) - 1
    lo = [max(took[m], L - most[full ^ m]) for m in range(1 << n)]
    hi = [min(most[m], L - must[full ^ m], L) for m in range(1 << n)]
    return lo, hi


def _left_out_terms(rows: Sequence[_Row], mask: int, relaxed: bool) -> tuple[int, ...] | None:
    """Objective terms of the nodes outside mask (left out), or None if one must take layers."""
    key = dev = 0
    for j, r in enumerate(rows):
        if not mask >> j & 1:
            if r.kmin > 0:
                return None
            key += r.close[0]
            dev += r.dev[0]
    return (dev, key) if relaxed else (key,)


def _subset_dp(
    ctx: _Context, rows: Sequence[_Row], relaxed: bool, threshold: int
) -> _Result | None:
    """Every order at once, for a few nodes: DP over (set of nodes used, last node, covered).

    Only hops of bucket >= threshold join stages; with NO_LINK any pair does, so the
    last node does not matter and is dropped from the state (2^n states instead of n 2^n).
    """
    n, L = len(rows), ctx.costs.L
    lo, hi = _windows(rows, L)
    anyhop = threshold == NO_LINK
    ids = [ctx.ids[r.index] for r in rows]
    joined = [[anyhop or (threshold != NO_HOP and ctx.hop(a, b) >= threshold) for b in ids]
              for a in ids]  # joined[last][j]: j may follow last (last = -1 only when anyhop)
    start = _State.start(0, 0, relaxed)
    states: dict[tuple[int, int], _State] = {}

    def extend(src: _State, last: int, mask: int, j: int) -> None:
        m2 = mask | 1 << j
        if lo[m2] > hi[m2]:
            return
        key = (m2, -1 if anyhop else j)
        if key not in states:
            states[key] = _State.empty(lo[m2], hi[m2], relaxed)
        _extend(ctx, src, j if anyhop else last, rows[j], max(1, rows[j].kmin), states[key])

    for j in range(n):
        extend(start, -1, 0, j)
    for mask in range(1, 1 << n):
        for last in ([-1] if anyhop else range(n)):
            src = states.get((mask, last))
            if src is None or not src.alive():
                continue
            for j in range(n):
                if mask >> j & 1:
                    continue
                if joined[last][j]:
                    extend(src, last, mask, j)
    best: tuple[tuple[int, ...], int, int] | None = None
    for (mask, last), st in states.items():
        terms = _left_out_terms(rows, mask, relaxed)
        if terms is None or st.hi < L or not st.alive():
            continue
        keys = st.keys_at(L)
        if keys[0] >= _BIG:
            continue
        keys = tuple(a + b for a, b in zip(keys, terms))
        if best is None or keys < best[0]:
            best = (keys, mask, last)
    if best is None:
        return None
    keys, mask, last = best
    stages, q = [], L
    while mask:
        st = states[(mask, last)]
        k, pred = int(st.k[q - st.lo]), int(st.pred[q - st.lo])
        j = pred if anyhop else last
        stages.append((rows[j].index, q - k, q))
        mask, q = mask ^ 1 << j, q - k
        last = -1 if anyhop else pred
    return _result(ctx, stages, keys)


def _may_reach(rows: Sequence[_Row], linked: list[list[int]], must: list[int], L: int) -> bool:
    """Cheap necessary condition for `_sparse`: some allowed chain can take L layers."""
    n = len(rows)
    most = [-1] * n  # most layers a chain ending at j can take (-1: no chain)
    for j in range(n):
        prev = [0] if must[j] == 0 else []
        prev += [most[i] for i in linked[j] if most[i] >= 0 and must[j] == must[i + 1]]
        if prev:
            most[j] = max(prev) + rows[j].kmax
    return any(most[j] >= L and must[n] == must[j + 1] for j in range(n))


# ---------------------------------------------------------------------------- orders


def _greedy_chain(ctx: _Context) -> list[str]:
    """Max-bottleneck walk over the links: start at the least-linked node, follow the fastest."""
    adj = ctx.adj
    unvisited = set(ctx.ids)
    order: list[str] = []
    while unvisited:
        here = order[-1] if order else None
        nbrs = [x for x in adj[here] if x in unvisited] if here else []
        if nbrs:
            nxt = min(nbrs, key=lambda x: (-adj[here][x], x))
        else:  # (re)start at the least-linked node; isolated nodes last
            nxt = min(unvisited, key=lambda x: (len(adj[x]) == 0, len(adj[x]), x))
        order.append(nxt)
        unvisited.remove(nxt)
    return order


def _previous_order(ctx: _Context) -> list[str] | None:
    """The previous pipeline order, each new node where the bottleneck is best (latest on ties)."""
    present = set(ctx.ids)
    order = [x for x in ctx.prev_order if x in present]
    if not order:
        return None
    placed = set(order)
    hops = [ctx.hop(a, b) for a, b in itertools.pairwise(order)]  # hops[i]: order[i] - order[i+1]
    for new in sorted(present - placed):
        # Away from its links a new node adds a NO_LINK hop: only the ends and its
        # neighbours' sides can be better, and the end (the latest) wins ties among the rest.
        where = {0, len(order)}
        for other in ctx.adj[new]:
            if other in placed:
                at = order.index(other)
                where |= {at, at + 1}
        best_at, best_b, sides = 0, NO_LINK - 1, []
        for at in sorted(where):
            left = [ctx.hop(order[at - 1], new)] if at else []
            right = [ctx.hop(new, order[at])] if at < len(order) else []
            b = min(hops[: max(at - 1, 0)] + hops[at:] + left + right, default=NO_HOP)
            if b >= best_b:
                best_at, best_b, sides = at, b, left + right
        if 0 < best_at < len(order):  # the hop it splits becomes its two sides
            hops[best_at - 1 : best_at] = sides
        elif best_at == 0:
            hops.insert(0, sides[0])
        else:
            hops.append(sides[0])
        order.insert(best_at, new)
        placed.add(new)
    return order


def _orders(ctx: _Context, relaxed: bool) -> list[list[int]]:
    """Orders to try for many nodes, as eligible indices, most promising first, no duplicates."""
    index = {x: i for i, x in enumerate(ctx.ids)}
    tries = [_previous_order(ctx), _greedy_chain(ctx), list(ctx.ids)]
    if relaxed:
        used = _feasible(ctx.costs, ctx.caps)
        if used is not None:
            rest = [x for i, x in enumerate(ctx.ids) if i not in used]
            tries.append([ctx.ids[i] for i in used] + rest)
    out, seen = [], set()
    for t in tries:
        if t is not None and tuple(t) not in seen:
            seen.add(tuple(t))
            out.append([index[x] for x in t])
    return out


# ---------------------------------------------------------------------------- search


def _best_in_order(ctx: _Context, rows: list[_Row], relaxed: bool, thresholds: list[int],
                   best: _Result | None) -> _Result | None:
    """Best plan of this order if it beats `best`, else `best`."""
    def bound(t: int) -> tuple[int, ...] | None:
        return best.keys if best is not None and best.bottleneck == t else None

    if all(r.kmin > 0 for r in rows):  # every node is a stage: the bottleneck is known
        t = ctx.bottleneck([ctx.ids[r.index] for r in rows])
        if best is not None and t < best.bottleneck:
            return best
        found = _dense(ctx, rows, relaxed, bound(t))
    else:
        found = None
        for t in thresholds:
            if best is not None and t < best.bottleneck:
                break
            if t == NO_LINK:
                found = _dense(ctx, rows, relaxed, bound(t))
            else:
                found = _sparse(ctx, rows, relaxed, t)
            if found is not None:
                break
    if found is not None and (best is None or found.rank < best.rank):
        return found
    return best


def _search(ctx: _Context, relaxed: bool) -> _Result | None:
    rows = _rows(ctx, band=not relaxed)
    if sum(r.kmin for r in rows) > ctx.costs.L or sum(r.kmax for r in rows) < ctx.costs.L:
        return None
    thresholds = [*sorted(set(ctx.buckets.values()), reverse=True), NO_LINK]
    if any(r.kmax >= ctx.costs.L for r in rows):  # a one-stage plan is possible
        thresholds.insert(0, NO_HOP)
    if len(rows) <= _EXACT_ORDERS:
        for t in thresholds:
            found = _subset_dp(ctx, rows, relaxed, t)
            if found is not None:
                return found
        return None
    best = None
    for order in _orders(ctx, relaxed):
        best = _best_in_order(ctx, [rows[i] for i in order], relaxed, thresholds, best)
    return best


# ---------------------------------------------------------------------------- plan_layers


def _gb(b: float) -> str:
    return f"{b / GB:.1f}"


def _gb_up(b: float) -> str:
    """Rounded up to 0.1 GB: "at least X" must really be enough."""
    return f"{math.ceil(b / 1e8 - 1e-9) / 10:.1f}"


def _label(n: NodeInfo) -> str:
    return n.name or n.id


def plan_layers(
    model: ModelSpec,
    nodes: Sequence[NodeInfo],
    links: Sequence[LinkInfo] = (),
    context: int = 0,
    previous: Sequence[Stage] | None = None,
    parallel: Parallel = "pipeline",
) -> Placement:
    """Partition the model's layers over the nodes (see the module docstring).

    `parallel` (tbmesh.core.groups.Parallel): "pipeline" splits layers over Macs only (one Mac
    a stage; the bare planner's default, while a node asks for its --parallel, "auto" unless
    told: tbmesh.node.config.DaemonConfig); "auto" also tries
    tensor-parallel groups as stages and takes the shape with the fastest expected decode
    (tbmesh.core.groups: a group only if at least MIN_SPEEDUP faster); "tensor" takes the
    fastest shape with a group, and does not fit when none is possible. Except with
    "pipeline", `why` says what was chosen and why, with the numbers.

    Raises ValueError for a model with no layers, a negative context, duplicate node ids or
    an unknown `parallel`. When it does not fit: fits=False, a reason with numbers, and the
    too-small nodes in left_out.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, not {parallel!r}")
    pipe = _plan_pipeline(model, nodes, links, context, previous)
    if parallel == "pipeline" or not pipe.fits:
        return pipe
    return _with_groups(model, sorted(nodes, key=lambda n: n.id), links, context, previous, pipe, parallel)


def _plan_pipeline(model: ModelSpec, nodes: Sequence[NodeInfo], links: Sequence[LinkInfo],
                   context: int, previous: Sequence[Stage] | None) -> Placement:
    if model.num_layers == 0:
        raise ValueError(f"model {model.name!r} has no layers")
    if context < 0:
        raise ValueError("context must be >= 0")
    nodes = sorted(nodes, key=lambda n: n.id)
    if len({n.id for n in nodes}) != len(nodes):
        raise ValueError("duplicate node ids")
    costs = _Costs.of(model, context)
    eligible = [n for n in nodes if n.memory_usable >= costs.min_layer]
    small = [n for n in nodes if n.memory_usable < costs.min_layer]
    if costs.need > sum(n.memory_usable for n in eligible):
        return _not_fitting(model, nodes, small, costs, context)
    ctx = _context(model, costs, eligible, links, previous)
    relaxed = False
    found = _search(ctx, relaxed=False)
    if found is None:
        relaxed = True
        found = _search(ctx, relaxed=True)
    if found is None:
        return _not_fitting(model, nodes, small, costs, context)
    return _placement(model, ctx, found, nodes, small, costs, relaxed)


def _placement(model: ModelSpec, ctx: _Context, found: _Result, nodes: list[NodeInfo],
               small: list[NodeInfo], costs: _Costs, relaxed: bool) -> Placement:
    last = len(found.stages) - 1
    stages = tuple(
        Stage(ctx.ids[i], s, e, stage_bytes(model, s, e, first=m == 0, last=m == last))
        for m, (i, s, e) in enumerate(found.stages)
    )
    used = set(found.ids)
    by_id = {n.id: n for n in nodes}
    notes = [_too_small_note(n, costs) for n in small]
    for i, x in enumerate(ctx.ids):
        if x not in used:
            label = _label(by_id[x])
            notes.append(
                f"{label}: left out, not needed (its memory share is {ctx.share(i):.2f} "
                f"layers and the other nodes hold all {costs.L} layers)"
            )
    if relaxed:
        notes.append(
            "layer counts are not within one layer of the memory shares: capacity "
            "(embedding, head, KV room or uneven layers) does not allow it"
        )
    return Placement(
        fits=True,
        stages=stages,
        left_out=tuple(n.id for n in nodes if n.id not in used),
        notes=tuple(notes),
    )


def _too_small_note(n: NodeInfo, costs: _Costs) -> str:
    return (
        f"{_label(n)}: left out, too small to hold even one layer ({_gb(n.memory_usable)} GB "
        f"usable, the smallest layer needs {_gb(costs.min_layer)} GB)"
    )


def _not_fitting(model: ModelSpec, nodes: list[NodeInfo], small: list[NodeInfo],
                 costs: _Costs, context: int) -> Placement:
    need = costs.need
    usable = sum(n.memory_usable for n in nodes)
    extra = _gb_up(extra_capacity_needed(model, nodes, context))
    kv = model.kv_bytes_per_token_per_layer * context > 0
    shorter = ", or a shorter context" if kv else ""
    listing = _listing(nodes)
    if not nodes:
        reason = (f"no nodes: the model needs {_gb(need)} GB; "
                  f"add a Mac with at least {extra} GB usable")
    elif need > usable:
        reason = (
            f"needs {_gb(need)} GB; usable {_gb(usable)} GB on {len(nodes)} "
            f"node{'s' if len(nodes) > 1 else ''} ({listing}); "
            f"short by {_gb_up(need - usable)} GB: "
            f"add a Mac with at least {extra} GB usable, or use a smaller quantization{shorter}"
        )
    else:
        reason = (
            f"needs {_gb(need)} GB and {_gb(usable)} GB is usable in total ({listing}), but "
            f"layers cannot be split: {_split_causes(nodes, small, costs, kv)}; "
            f"add a Mac with at least {extra} GB usable{shorter}"
        )
    return Placement(
        fits=False,
        left_out=tuple(n.id for n in small),
        reason=reason,
        notes=tuple(_too_small_note(n, costs) for n in small),
    )


def _listing(nodes: list[NodeInfo]) -> str:
    """Each node's usable GB, or the range for a big cluster."""
    if len(nodes) <= _LIST_MAX:
        return ", ".join(f"{_label(n)} {_gb(n.memory_usable)}" for n in nodes)
    sizes = [n.memory_usable for n in nodes]
    return f"{_gb(min(sizes))} to {_gb(max(sizes))} GB each"


def _split_causes(nodes: list[NodeInfo], small: list[NodeInfo], costs: _Costs, kv: bool) -> str:
    """Why enough memory in total still gives no partition, most specific first."""
    with_kv = " with KV room for the context" if kv else ""
    parts = [f"the largest layer is {_gb(costs.max_layer)} GB{with_kv}"]
    if small:
        names = ", ".join(_label(n) for n in small)
        if len(small) > _LIST_MAX:
            names = f"{len(small)} nodes"
        parts.append(f"{names} cannot hold even one layer")
    biggest = max(n.memory_usable for n in nodes)
    L = costs.L
    if L == 1:
        parts.append(f"the one stage needs {_gb(costs.span(0, 1))} GB with embedding and head "
                     f"and the largest node has {_gb(biggest)} GB")
    else:
        if costs.span(0, 1) > biggest:
            parts.append(f"the first stage needs {_gb(costs.span(0, 1))} GB (embedding "
                         f"{_gb(costs.E)} GB and the first layer) and the largest node has "
                         f"{_gb(biggest)} GB")
        if costs.span(L - 1, L) > biggest:
            parts.append(f"the last stage needs {_gb(costs.span(L - 1, L))} GB (head "
                         f"{_gb(costs.H)} GB and the last layer) and the largest node has "
                         f"{_gb(biggest)} GB")
    if len(parts) == 1:
        parts.append("whole layers do not pack into the nodes' memory")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- tensor groups


def _with_groups(model: ModelSpec, nodes: list[NodeInfo], links: Sequence[LinkInfo], context: int,
                 previous: Sequence[Stage] | None, pipe: Placement, parallel: Parallel) -> Placement:
    """The pipeline `pipe` or a shape with tensor groups, whichever decodes fastest (groups.py)."""
    pipe_s = decode_s(model, pipe.stages, nodes, links)
    best: tuple[float, Placement] | None = None
    cause = unsplittable(model)
    if cause is None:
        least = min(model.layer_bytes) + model.kv_bytes(context, 1)
        eligible = [n.id for n in nodes if n.memory_usable >= least]
        # auto groups Macs over RDMA only: over TCP the all-reduces' latency is a guess until
        # measured, and a group that is slower than the pipeline costs more than it gives
        cabled = [x for x in links if x.rdma] if parallel == "auto" else list(links)
        found = cliques(eligible, cabled, model.tensor_ways)
        if not found:
            cause = _no_clique(model, eligible, links, cabled)
        for groups in _candidates(_strongest(found, nodes)):
            # the groups with the other Macs as stages (the layer planner gives each its memory's
            # share), or the groups only, the others left out
            for ordered, alone in itertools.product(_head_choices(groups, links), (False, True)):
                placement = _grouped(model, nodes, links, context, previous, ordered, alone)
                if placement is None:
                    continue
                seconds = decode_s(model, placement.stages, nodes, links)
                if best is None or seconds < best[0]:
                    best = (seconds, placement)
        if best is None and cause is None:
            cause = "no tensor group fits in its members' memory (each member holds its share of every " \
                    "layer of the stage plus the parts mlx-lm keeps whole)"
    expected = f"{1 / pipe_s:.1f} tok/s expected"
    if best is None:  # "tensor" too: a Mac alone, or a model no group splits, still serves
        return replace(pipe, why=f"pipeline ({expected}): no tensor group possible: {cause}")
    seconds, grouped = best
    gain = pipe_s / seconds
    versus = f"{gain:.2f}x the pipeline's expected decode ({1 / seconds:.1f} vs {1 / pipe_s:.1f} tok/s)"
    shape = _shape(model, grouped.stages, links, named=bool(grouped.left_out))
    if parallel == "tensor":
        return replace(grouped, why=f"{shape} (forced: parallel tensor): {versus}")
    if gain >= MIN_SPEEDUP:
        return replace(grouped, why=f"{shape}: {versus}")
    shown = math.floor(gain * 100) / 100  # never "1.20x, below 1.2x"
    return replace(pipe, why=f"pipeline ({expected}): the best shape with groups, {shape}, would be "
                             f"{shown:.2f}x ({1 / seconds:.1f} tok/s), below the {MIN_SPEEDUP}x a group must gain")


def _no_clique(model: ModelSpec, ids: list[str], links: Sequence[LinkInfo], cabled: Sequence[LinkInfo]) -> str:
    sizes = ", ".join(map(str, model.tensor_ways))
    if len(ids) < 2:
        return "one Mac: no group to make"
    if not any(link_between(links, a, b) for a, b in itertools.combinations(ids, 2)):
        return "no two Macs are cabled directly (a group needs a cable between every two members)"
    if len(cabled) < len(links) and cliques(ids, links, model.tensor_ways):
        return ("no Macs cabled all to all have RDMA between them (auto makes groups over RDMA only; "
                "--parallel tensor makes them over TCP too)")
    return (f"{model.name} splits into groups of {sizes} only, and no such set of Macs is cabled all "
            f"to all (a group needs a cable between every two members)")


_PER_SIZE = 6  # cliques tried alone per group size: those of the most memory and bandwidth


def _strongest(found: list[tuple[str, ...]], nodes: list[NodeInfo]) -> list[tuple[str, ...]]:
    """Per size, the cliques whose weakest member has the most memory, then bandwidth (a group
    is as fast and as big as its weakest member), then by ids; largest sizes first."""
    by_id = {n.id: n for n in nodes}

    def key(c: tuple[str, ...]) -> tuple:
        weakest = min((by_id[m].memory_usable, by_id[m].memory_bandwidth) for m in c)
        return (-len(c), -weakest[0], -weakest[1], c)

    ranked = sorted(found, key=key)
    return [c for c in ranked if sum(1 for d in ranked[: ranked.index(c)] if len(d) == len(c)) < _PER_SIZE]


def _candidates(found: list[tuple[str, ...]]) -> list[tuple[tuple[str, ...], ...]]:
    """Sets of disjoint groups to try: each clique alone; per size the cliques taken greedily;
    and cliques taken greedily largest first (e.g. a group of 4 and one of 2 on six Macs)."""
    out: list[tuple[tuple[str, ...], ...]] = [(c,) for c in found]
    for size in [*sorted({len(c) for c in found}, reverse=True), 0]:  # 0: any size
        taken: list[tuple[str, ...]] = []
        for c in found:
            if size in (0, len(c)) and not any(set(c) & set(t) for t in taken):
                taken.append(c)
        if len(taken) > 1 and tuple(taken) not in out:
            out.append(tuple(taken))
    return out


_HEAD_CHOICES = 16  # head assignments tried per set of groups (the pipeline hops between heads)


def _head_choices(groups: tuple[tuple[str, ...], ...],
                  links: Sequence[LinkInfo]) -> list[tuple[tuple[str, ...], ...]]:
    """The groups, each with the member that talks to the pipeline first: per group its members
    cabled to most Macs outside it first (then by id); several groups try combinations, so that
    consecutive heads can be cabled."""
    def outside(group: tuple[str, ...], x: str) -> int:
        return sum(1 for link in links if x in (link.a, link.b) and not {link.a, link.b} <= set(group))

    heads = [sorted(g, key=lambda x: (-outside(g, x), x)) for g in groups]
    if len(groups) == 1:  # one group: its best-cabled members only
        heads = [heads[0][:2]]
    out = []
    for choice in itertools.islice(itertools.product(*heads), _HEAD_CHOICES):
        out.append(tuple((h, *sorted(x for x in g if x != h)) for h, g in zip(choice, groups)))
    return out


def _grouped(model: ModelSpec, nodes: list[NodeInfo], links: Sequence[LinkInfo], context: int,
             previous: Sequence[Stage] | None, ordered: tuple[tuple[str, ...], ...],
             alone: bool = False) -> Placement | None:
    """The pipeline over the groups `ordered` (each, head first, one node of their summed memory
    less what every member holds whole) and the other nodes, or None when it does not fit;
    members' memory checked."""
    by_id = {n.id: n for n in nodes}
    members = {m for g in ordered for m in g}
    whole = model.embed_bytes + model.head_bytes + model.whole_bytes + 2 * model.num_layers
    caps = {g[0]: len(g) * min(by_id[m].memory_usable for m in g) - (len(g) - 1) * whole for g in ordered}
    heads = {g[0]: g for g in ordered}
    keep = [n for n in nodes if (n.id not in members and not alone) or n.id in heads]
    kept = {n.id for n in keep}
    vlinks = [x for x in links if x.a in kept and x.b in kept]
    for _ in range(3):  # the estimate is rarely short; then shrink by what was over
        vnodes = [replace(n, memory_usable=max(0, caps[n.id])) if n.id in heads else n for n in keep]
        placement = _plan_pipeline(model, vnodes, vlinks, context, previous)
        if not placement.fits:
            return None
        last = len(placement.stages) - 1
        stages = tuple(replace(s, group=heads.get(s.node, ())) for s in placement.stages)
        over = {}
        for i, s in enumerate(stages):
            if s.group:
                need = member_bytes(model, s.start, s.end, len(s.group), i == 0, i == last, context)
                excess = need - min(by_id[m].memory_usable for m in s.group)
                if excess > 0:
                    over[s.node] = excess * len(s.group)
        if not over:
            used = {m for s in stages for m in s.members}
            notes = placement.notes + tuple(f"{_label(n)}: left out, the plan decodes faster without it"
                                            for n in nodes if n.id not in used and n.id not in kept)
            return replace(placement, stages=stages, left_out=tuple(n.id for n in nodes if n.id not in used),
                           notes=notes)
        for head, excess in over.items():
            caps[head] -= excess
    return None


def _shape(model: ModelSpec, stages: Sequence[Stage], links: Sequence[LinkInfo], named: bool = False) -> str:
    """"tensor group of 4 (RDMA, 51 µs all-reduce)", and the single Macs of the pipeline; a group
    is named by its members unless it is the whole plan and `named` is False."""
    groups = [s for s in stages if s.group]
    parts = []
    for s in groups:
        link = describe_link(group_link(s.group, links))
        names = "" if len(stages) == 1 and not named else f" {'+'.join(s.group)}"
        parts.append(f"tensor group of {len(s.group)}{names} ({link}, "
                     f"{all_reduce_us(model, s.group, links):.0f} µs all-reduce)")
    singles = len(stages) - len(groups)
    text = " and ".join(parts)
    if singles:
        text += f" in a pipeline with {singles} single Mac{'s' if singles > 1 else ''}"
    elif len(groups) > 1:
        text += " in a pipeline"
    return text
