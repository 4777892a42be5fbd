"""Layer planner: properties against independent brute force on tiny clusters.

The brute force below enumerates every subset of nodes, every order and every cut point
(n <= 4 nodes, L <= 7 layers). It shares no code with the planner.
"""

from __future__ import annotations

import itertools
import math
import random
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tbmesh.core import planner
from tbmesh.core.planner import (
    bytes_to_load,
    extra_capacity_needed,
    fits_anywhere,
    plan_layers,
    stage_bytes,
)
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Placement, Stage

G = 10**9
FAST, SLOW = 1.4 * 2**33, 1.4 * 2**27  # mid-bucket bandwidths (bytes/s)


# ---------------------------------------------------------------------------- brute force


def layer_cost(model: ModelSpec, context: int) -> list[int]:
    return [b + model.kv_bytes_per_token_per_layer * context for b in model.layer_bytes]


def eligible_shares(model: ModelSpec, nodes: list[NodeInfo], context: int) -> dict[str, float]:
    smallest = min(layer_cost(model, context))
    ok = [n for n in nodes if n.memory_usable >= smallest]
    total = sum(n.memory_usable for n in ok)
    return {n.id: model.num_layers * n.memory_usable / total for n in ok}


def all_plans(model: ModelSpec, nodes: list[NodeInfo], context: int):
    """Every valid plan as a list of (node id, start, end)."""
    L, cost = model.num_layers, layer_cost(model, context)
    cap = {n.id: n.memory_usable for n in nodes}
    for size in range(1, min(len(nodes), L) + 1):
        for order in itertools.permutations([n.id for n in nodes], size):
            for cuts in itertools.combinations(range(1, L), size - 1):
                bounds = (0, *cuts, L)
                plan = [(order[i], bounds[i], bounds[i + 1]) for i in range(size)]
                if all(
                    sum(cost[s:e]) + (model.embed_bytes if s == 0 else 0)
                    + (model.head_bytes if e == L else 0) <= cap[x]
                    for x, s, e in plan
                ):
                    yield plan


def in_band(plan, shares: dict[str, float]) -> bool:
    counts = {x: e - s for x, s, e in plan}
    if any(x not in shares for x in counts):
        return False
    return all(abs(counts.get(x, 0) - s) <= 1 + 1e-9 for x, s in shares.items())


def moved(model: ModelSpec, plan, previous) -> int:
    """Bytes newly owned, computed layer by layer."""
    def owned(p):
        out = {}
        for i, (x, s, e) in enumerate(p):
            out[x] = {("layer", j) for j in range(s, e)}
            if i == 0:
                out[x].add("embed")
            if i == len(p) - 1:
                out[x].add("head")
        return out

    size = {("layer", j): b for j, b in enumerate(model.layer_bytes)}
    size.update({"embed": model.embed_bytes, "head": model.head_bytes})
    old = owned(previous)
    return sum(size[w] for x, ws in owned(plan).items() for w in ws - old.get(x, set()))


def as_plan(p: Placement):
    return [(s.node, s.start, s.end) for s in p.stages]


# ---------------------------------------------------------------------------- strategies


@st.composite
def models(draw, max_layers: int = 7, unit: int = 1) -> ModelSpec:
    L = draw(st.integers(1, max_layers))
    if draw(st.booleans()):
        layers = (draw(st.integers(1, 20)),) * L
    else:
        layers = tuple(draw(st.lists(st.integers(1, 20), min_size=L, max_size=L)))
    ends = draw(st.booleans())
    return ModelSpec(
        "m",
        tuple(b * unit for b in layers),
        embed_bytes=draw(st.integers(0, 15)) * unit if ends else 0,
        head_bytes=draw(st.integers(0, 15)) * unit if ends else 0,
        kv_bytes_per_token_per_layer=draw(st.sampled_from([0, 0, 1, 2])) * unit,
    )


@st.composite
def clusters(draw, max_nodes: int = 4, max_cap: int = 80, unit: int = 1) -> list[NodeInfo]:
    n = draw(st.integers(1, max_nodes))
    names = draw(st.permutations("abcdefghijkl"))[:n]
    return [NodeInfo(x, x, memory_usable=draw(st.integers(0, max_cap)) * unit) for x in names]


contexts = st.sampled_from([0, 1, 3])


def check_valid(model: ModelSpec, nodes: list[NodeInfo], context: int, p: Placement) -> None:
    """Coverage, contiguity, pipeline order, capacity, bytes, left_out."""
    assert p.fits and p.reason is None
    L, cap = model.num_layers, {n.id: n.memory_usable for n in nodes}
    assert p.stages[0].start == 0 and p.stages[-1].end == L
    for a, b in itertools.pairwise(p.stages):
        assert a.end == b.start
    assert all(s.num_layers >= 1 for s in p.stages)
    assert len({s.node for s in p.stages}) == len(p.stages)
    last = len(p.stages) - 1
    for i, s in enumerate(p.stages):
        assert s.bytes == stage_bytes(model, s.start, s.end, i == 0, i == last)
        kv = model.kv_bytes(context, s.num_layers)
        assert s.bytes + kv <= cap[s.node]
    assert set(p.left_out) == set(cap) - {s.node for s in p.stages}


# ---------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(models(), clusters(), contexts)
def test_fits_exactly_when_some_partition_exists(model, nodes, context):
    p = plan_layers(model, nodes, context=context)
    exists = next(all_plans(model, nodes, context), None) is not None
    assert p.fits == exists
    assert fits_anywhere(model, nodes, context) == exists
    if p.fits:
        check_valid(model, nodes, context, p)
    else:
        assert p.reason and not p.stages


def excess(plan, shares: dict[str, float]) -> float:
    """Sum over nodes of max(0, |count - share| - 1)^2: how far a plan is from the band."""
    counts = {x: e - s for x, s, e in plan}
    return sum(max(0.0, abs(counts.get(x, 0) - s) - 1) ** 2 for x, s in shares.items())


@settings(max_examples=300, deadline=None)
@given(models(), clusters(), contexts, st.data())
def test_proportional_unless_capacity_forces_otherwise(model, nodes, context, data):
    plans = list(all_plans(model, nodes, context))
    assume(plans)
    shares = eligible_shares(model, nodes, context)
    previous = data.draw(st.sampled_from([[], *plans]))  # moving less never beats proportion
    p = plan_layers(model, nodes, context=context,
                    previous=[Stage(x, s, e, 0) for x, s, e in previous])
    check_valid(model, nodes, context, p)
    if any(in_band(pl, shares) for pl in plans):
        assert in_band(as_plan(p), shares)
    else:  # corrected as little as capacity allows (a one-stage plan has no hop: it goes first)
        if any(len(pl) == 1 for pl in plans):
            plans = [pl for pl in plans if len(pl) == 1]
        assert excess(as_plan(p), shares) <= min(excess(pl, shares) for pl in plans) + 0.01
        assert any("not within one layer of the memory shares" in x for x in p.notes)


def test_capacity_forces_a_correction():
    model = ModelSpec("m", (G,) * 10, embed_bytes=5 * G)
    p = plan_layers(model, [NodeInfo(x, x, memory_usable=8 * G) for x in "ab"])
    assert p.fits and [s.num_layers for s in p.stages] == [3, 7]  # shares are 5 and 5
    assert any("capacity" in x for x in p.notes)
    # 2 + 8 is valid too and would move nothing, but it is further from the shares.
    previous = [Stage("a", 0, 2, 7 * G), Stage("b", 2, 10, 8 * G)]
    nodes = [NodeInfo(x, x, memory_usable=8 * G) for x in "ab"]
    assert plan_layers(model, nodes, previous=previous) == p


@settings(max_examples=25, deadline=None)
@given(st.integers(7, 40), st.integers(20, 300), st.randoms(use_true_random=False))
def test_proportional_on_larger_clusters(n, L, rnd):
    model = ModelSpec("m", (10,) * L, embed_bytes=10, head_bytes=10)
    caps = [rnd.choice([64, 96, 128, 192, 256, 512]) for _ in range(n)]
    need = 10 * L + 20
    scale = 2 * need / sum(caps) + 1  # room to spare: the band is always capacity-safe
    nodes = [NodeInfo(f"n{i}", f"n{i}", memory_usable=int(c * scale)) for i, c in enumerate(caps)]
    p = plan_layers(model, nodes)
    check_valid(model, nodes, 0, p)
    assert in_band(as_plan(p), eligible_shares(model, nodes, 0))


@settings(max_examples=100, deadline=None)
@given(models(max_layers=12), clusters(max_nodes=9), contexts, st.randoms(use_true_random=False),
       st.booleans())
def test_same_plan_whatever_the_input_order(model, nodes, context, rnd, with_previous):
    ids = [n.id for n in nodes]
    links = [LinkInfo(a, b, rnd.choice([FAST, SLOW, 0.0]))
             for a, b in itertools.combinations(ids, 2) if rnd.random() < 0.5]
    previous = None
    if with_previous:
        prev = plan_layers(model, nodes[1:] or nodes, links, context)
        previous = prev.stages if prev.fits else None
    first = plan_layers(model, nodes, links, context, previous)
    for _ in range(3):
        shuffled_nodes, shuffled_links = nodes[:], links[:]
        rnd.shuffle(shuffled_nodes)
        rnd.shuffle(shuffled_links)
        flipped = [LinkInfo(x.b, x.a, x.bytes_per_s) if rnd.random() < 0.5 else x
                   for x in shuffled_links]
        assert plan_layers(model, shuffled_nodes, flipped, context, previous) == first


def best_band_movement(model, nodes, context, previous) -> int | None:
    shares = eligible_shares(model, nodes, context)
    band = [pl for pl in all_plans(model, nodes, context) if in_band(pl, shares)]
    if not band:
        return None
    if any(len(pl) == 1 for pl in band):  # no hop at all beats any hop
        band = [pl for pl in band if len(pl) == 1]
    return min(moved(model, pl, previous) for pl in band)


@settings(max_examples=150, deadline=None)
@given(models(), clusters(max_nodes=4), contexts, st.data())
def test_fewest_bytes_moved_when_a_node_leaves(model, nodes, context, data):
    before = plan_layers(model, nodes, context=context)
    assume(before.fits and len(nodes) > 1)
    gone = data.draw(st.sampled_from([n.id for n in nodes]))
    after_nodes = [n for n in nodes if n.id != gone]
    best = best_band_movement(model, after_nodes, context, as_plan(before))
    assume(best is not None)
    p = plan_layers(model, after_nodes, context=context, previous=before.stages)
    check_valid(model, after_nodes, context, p)
    assert moved(model, as_plan(p), as_plan(before)) == best
    assert sum(bytes_to_load(model, p.stages, before.stages).values()) == best


@settings(max_examples=150, deadline=None)
@given(models(), clusters(max_nodes=4), contexts, st.data())
def test_fewest_bytes_moved_when_a_node_joins(model, nodes, context, data):
    assume(len(nodes) > 1)
    new = data.draw(st.sampled_from([n.id for n in nodes]))
    before = plan_layers(model, [n for n in nodes if n.id != new], context=context)
    assume(before.fits)
    best = best_band_movement(model, nodes, context, as_plan(before))
    assume(best is not None)
    p = plan_layers(model, nodes, context=context, previous=before.stages)
    check_valid(model, nodes, context, p)
    assert moved(model, as_plan(p), as_plan(before)) == best


def test_a_leave_does_not_reshuffle_everyone():
    model = ModelSpec("m", (G,) * 60, embed_bytes=G, head_bytes=G)
    nodes = [NodeInfo(x, x, memory_usable=100 * G) for x in "abcd"]
    before = plan_layers(model, nodes)
    rest = [n for n in nodes if n.id != "b"]
    kept = plan_layers(model, rest, previous=before.stages)
    fresh = plan_layers(model, rest)
    to_load = bytes_to_load(model, kept.stages, before.stages)
    assert sum(to_load.values()) < sum(bytes_to_load(model, fresh.stages, before.stages).values())
    assert sum(to_load.values()) == 19 * G  # b's 15 layers, and d takes 4 of c's to stay in band


@pytest.mark.parametrize("n", [5, 9])  # subset DP, then candidate orders
def test_joins_and_leaves_keep_the_previous_order(n):
    ids = [f"m{i}" for i in range(n)]
    chain = ids[1::2] + ids[::2]  # far from the id order
    links = [LinkInfo(a, b, FAST) for a, b in itertools.pairwise(chain)]
    model = ModelSpec("m", (G,) * 61, embed_bytes=G, head_bytes=G)
    nodes = [NodeInfo(x, x, memory_usable=(40 + 7 * i) * G) for i, x in enumerate(ids)]
    before = plan_layers(model, nodes, links)
    order = [s.node for s in before.stages]
    # A node leaves and the links are not measured yet: keep the order, move little.
    rest = [x for x in nodes if x.id != order[2]]
    after = plan_layers(model, rest, previous=before.stages)
    assert [s.node for s in after.stages] == order[:2] + order[3:]
    fresh = plan_layers(model, rest)
    assert sum(bytes_to_load(model, after.stages, before.stages).values()) < \
        sum(bytes_to_load(model, fresh.stages, before.stages).values())
    # A node joins at the front of the chain: it goes there, the others keep their order.
    more = [*nodes, NodeInfo("new", "new", memory_usable=80 * G)]
    more_links = [*links, LinkInfo("new", order[0], FAST)]
    grown = plan_layers(model, more, more_links, previous=before.stages)
    assert [s.node for s in grown.stages] == ["new", *order]
    fresh = plan_layers(model, more, more_links)
    assert sum(bytes_to_load(model, grown.stages, before.stages).values()) < \
        sum(bytes_to_load(model, fresh.stages, before.stages).values())


def test_feasibility_is_exact_where_greedy_fill_is_not():
    # Only "big, tiny, small" works: the embedding needs the big node first, the head a
    # node that is not the tiny one last.
    model = ModelSpec("m", (1,) * 4, embed_bytes=6, head_bytes=2)
    nodes = [NodeInfo(x, x, memory_usable=c) for x, c in [("a", 3), ("b", 1), ("c", 8)]]
    assert planner.feasible_order(model, nodes) == ("c", "b", "a")
    assert fits_anywhere(model, nodes)
    assert plan_layers(model, nodes).fits


@settings(max_examples=60, deadline=None)
@given(models(), clusters(), contexts)
def test_extra_capacity_is_the_smallest_that_fits(model, nodes, context):
    assume(next(all_plans(model, nodes, context), None) is None)
    x = extra_capacity_needed(model, nodes, context)
    plus = lambda c: [*nodes, NodeInfo("zz", "zz", memory_usable=c)]  # noqa: E731
    assert next(all_plans(model, plus(x), context), None) is not None
    assert next(all_plans(model, plus(x - 1), context), None) is None


# ---------------------------------------------------------------------------- links


def hops_linked(p: Placement, links: list[LinkInfo]) -> bool:
    pairs = {frozenset((x.a, x.b)) for x in links}
    return all(frozenset((a.node, b.node)) in pairs for a, b in itertools.pairwise(p.stages))


@pytest.mark.parametrize("n", [4, 9])  # subset DP, then candidate orders
def test_stages_follow_a_chain_of_cables(n):
    rnd = random.Random(n)
    ids = [f"m{i}" for i in range(n)]
    chain = ids[:]
    rnd.shuffle(chain)
    assert chain != ids and chain != ids[::-1]
    links = [LinkInfo(a, b, FAST) for a, b in itertools.pairwise(chain)]
    rnd.shuffle(links)
    model = ModelSpec("m", (G,) * 61, embed_bytes=G, head_bytes=G)
    nodes = [NodeInfo(x, x, memory_usable=(40 + 10 * i) * G) for i, x in enumerate(ids)]
    p = plan_layers(model, nodes, links)
    assert len(p.stages) == n
    assert hops_linked(p, links)
    assert plan_layers(model, nodes) != p  # without links: id order, not the chain


@pytest.mark.parametrize("n", [4, 9])
def test_a_slow_cable_is_avoided_when_a_fast_path_exists(n):
    ids = [f"m{i}" for i in range(n)]
    ring = [LinkInfo(a, b, FAST) for a, b in zip(ids, ids[1:] + ids[:1])]
    ring[0] = LinkInfo(ids[0], ids[1], SLOW)  # the id order would use it
    model = ModelSpec("m", (G,) * 61)
    nodes = [NodeInfo(x, x, memory_usable=100 * G) for x in ids]
    p = plan_layers(model, nodes, ring)
    assert len(p.stages) == n and hops_linked(p, ring)
    assert {p.stages[0].node, p.stages[-1].node} == {ids[0], ids[1]}  # the slow hop is not used


@pytest.mark.parametrize("n", [4, 9])
def test_measurement_noise_never_reshuffles(n):
    ids = [f"m{i}" for i in range(n)]
    ring = [LinkInfo(a, b, FAST) for a, b in zip(ids, ids[1:] + ids[:1])]
    model = ModelSpec("m", (G,) * 61)
    nodes = [NodeInfo(x, x, memory_usable=100 * G) for x in ids]
    clean = plan_layers(model, nodes, ring)
    rnd = random.Random(n)
    for _ in range(5):  # a few % of noise on every link: every cut of the ring is as good
        noisy = [LinkInfo(x.a, x.b, x.bytes_per_s * rnd.uniform(0.95, 1.05)) for x in ring]
        assert plan_layers(model, nodes, noisy) == clean
        assert plan_layers(model, nodes, noisy, previous=clean.stages) == clean


def test_unmeasured_cable_beats_no_cable():
    ids = ["a", "b", "c"]
    links = [LinkInfo("a", "c", 0.0), LinkInfo("c", "b", 0.0)]  # measured later
    model = ModelSpec("m", (G,) * 30)
    p = plan_layers(model, [NodeInfo(x, x, memory_usable=50 * G) for x in ids], links)
    assert [s.node for s in p.stages] in (["a", "c", "b"], ["b", "c", "a"])


# ---------------------------------------------------------------------------- reasons and notes


def test_reason_when_the_cluster_is_too_small():
    model = ModelSpec("kimi", (10 * G,) * 61, embed_bytes=12 * G // 10, head_bytes=12 * G // 10)
    nodes = [NodeInfo(x, x, memory_usable=160 * G) for x in "abc"]
    p = plan_layers(model, nodes)
    assert not p.fits and not p.stages
    # a holds the embedding and 15 layers, b and c 16 each: 14 layers and the head remain.
    assert p.reason == (
        "needs 612.4 GB; usable 480.0 GB on 3 nodes (a 160.0, b 160.0, c 160.0); "
        "short by 132.4 GB: add a Mac with at least 141.2 GB usable, or use a smaller quantization"
    )
    with_kv = ModelSpec("kimi", model.layer_bytes, kv_bytes_per_token_per_layer=1000)
    assert plan_layers(with_kv, nodes, context=10**6).reason.endswith(", or a shorter context")


def test_reason_when_layers_cannot_be_split():
    model = ModelSpec("m", (10 * G,) * 3)
    nodes = [NodeInfo(x, x, memory_usable=19 * G) for x in "ab"]
    p = plan_layers(model, nodes)
    assert not p.fits
    assert p.reason.startswith("needs 30.0 GB and 38.0 GB is usable in total (a 19.0, b 19.0), "
                               "but layers cannot be split: the largest layer is 10.0 GB")
    assert p.reason.endswith("add a Mac with at least 10.0 GB usable")

    big_embedding = ModelSpec("m", (5 * G, 5 * G), embed_bytes=20 * G)
    p = plan_layers(big_embedding, [NodeInfo(x, x, memory_usable=24 * G) for x in "ab"])
    assert not p.fits
    assert "the first stage needs 25.0 GB (embedding 20.0 GB" in p.reason
    assert p.reason.endswith("add a Mac with at least 25.0 GB usable")


def test_no_nodes_and_no_layers():
    p = plan_layers(ModelSpec("m", (G,) * 4), [])
    assert not p.fits
    assert p.reason == "no nodes: the model needs 4.0 GB; add a Mac with at least 4.0 GB usable"
    with pytest.raises(ValueError):
        plan_layers(ModelSpec("m", ()), [NodeInfo("a", "a", memory_usable=G)])


def test_left_out_nodes_are_explained():
    model = ModelSpec("m", (10 * G,) * 2)
    caps = [("a", 40), ("b", 40), ("c", 40), ("tiny", 5)]
    nodes = [NodeInfo(x, x, memory_usable=c * G) for x, c in caps]
    p = plan_layers(model, nodes)
    assert p.fits and len(p.stages) == 2
    unused = next(x for x in "abc" if x not in {s.node for s in p.stages})
    assert set(p.left_out) == {"tiny", unused}
    notes = " | ".join(p.notes)
    assert "tiny: left out, too small to hold even one layer (5.0 GB usable" in notes
    assert "left out, not needed (its memory share is 0.67 layers" in notes


def test_bytes_to_load_counts_new_layers_and_ends():
    model = ModelSpec("m", (1, 2, 4, 8), embed_bytes=16, head_bytes=32)
    old = [Stage("a", 0, 2, 19), Stage("b", 2, 4, 44)]
    new = [Stage("b", 0, 1, 17), Stage("a", 1, 3, 6), Stage("c", 3, 4, 40)]
    assert bytes_to_load(model, new, old) == {"b": 1 + 16, "a": 4, "c": 8 + 32}
    assert bytes_to_load(model, new, None) == {"b": 17, "a": 6, "c": 40}
    assert math.isclose(sum(bytes_to_load(model, old, old).values()), 0)


# ---------------------------------------------------------------------------- many-node path


def orders_path():
    """Force the per-order search (used beyond 6 nodes) on tiny clusters, to check it exactly."""
    return mock.patch.object(planner, "_EXACT_ORDERS", 0)


@settings(max_examples=150, deadline=None)
@given(models(), clusters(max_nodes=4), contexts, st.randoms(use_true_random=False), st.booleans())
def test_per_order_search_is_exact_for_its_order(model, nodes, context, rnd, leave):
    ids = [n.id for n in nodes]
    links = [LinkInfo(a, b, rnd.choice([FAST, SLOW, 0.0]))
             for a, b in itertools.combinations(ids, 2) if rnd.random() < 0.6]
    with orders_path():
        before = plan_layers(model, nodes[1:] if leave else nodes[:-1] or nodes, links, context)
        previous = before.stages if before.fits else None
        p = plan_layers(model, nodes, links, context, previous)
    exists = next(all_plans(model, nodes, context), None) is not None
    assert p.fits == exists  # the feasibility order is among the candidates
    if not p.fits:
        return
    check_valid(model, nodes, context, p)
    shares = eligible_shares(model, nodes, context)
    if in_band(as_plan(p), shares):  # no in-band plan with the same stages moves fewer bytes
        sequence = [x for x, _, _ in as_plan(p)]
        same = [pl for pl in all_plans(model, nodes, context)
                if [x for x, _, _ in pl] == sequence and in_band(pl, shares)]
        got = moved(model, as_plan(p), as_plan(before) if previous else [])
        assert got == min(moved(model, pl, as_plan(before) if previous else []) for pl in same)


@settings(max_examples=40, deadline=None)
@given(models(max_layers=12), clusters(max_nodes=10, max_cap=40), contexts)
def test_many_nodes_fit_exactly_when_feasible(model, nodes, context):
    assume(len(nodes) > 6)
    p = plan_layers(model, nodes, context=context)
    assert p.fits == fits_anywhere(model, nodes, context)  # exact up to 12 nodes
    if p.fits:
        check_valid(model, nodes, context, p)
