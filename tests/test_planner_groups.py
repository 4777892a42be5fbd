"""Tensor-parallel groups in the plan (tbmesh.core.groups, plan_layers(parallel=...)): the
planner's choices on recorded topologies, with its reasons, and properties of every plan.

The Macs are the facts in /work/shared/reference/macos/: an M3 Ultra Mac Studio of 512 GB
(sysctl-n-hw.memsize.2.txt, 549755813888 bytes; 75% usable as `tbmesh plan`'s example,
819 GB/s, Apple's specification) and a MacBook Pro M5 Max of 128 GB
(mlx-metal-device_info.3.txt: max_recommended_working_set_size 115448725504; 614 GB/s, Apple's
March 2026 specification). The speeds are tbmesh.core.tensor_cost's calibrated projection.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from tbmesh.core.groups import MIN_SPEEDUP, cliques, decode_s, member_bytes
from tbmesh.core.jsonform import from_json, to_json
from tbmesh.core.planner import plan_layers
from tbmesh.core.presets import preset_spec
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Plan, Stage

STUDIO_RAM = 549755813888
STUDIO_USABLE = int(STUDIO_RAM * 0.75)
MBP_RAM, MBP_USABLE = 137438953472, 115448725504
TB5, TB4 = 80e9 / 8 * 0.9, 40e9 / 8 * 0.9  # bytes/s a probe might measure
TB_RTT = 100e-6  # a measured round trip over IP on Thunderbolt (one way 50 us: tensor_cost.TB4_TCP)
CONTEXT = 32768


def studio(name: str) -> NodeInfo:
    return NodeInfo(name, name, "M3 Ultra", STUDIO_RAM, STUDIO_USABLE, memory_bandwidth=819e9)


def macbook(name: str) -> NodeInfo:
    return NodeInfo(name, name, "M5 Max", MBP_RAM, MBP_USABLE, memory_bandwidth=614e9)


def all_to_all(nodes: list[NodeInfo], speed: float, rdma: bool) -> list[LinkInfo]:
    return [LinkInfo(a.id, b.id, speed, TB_RTT, rdma=rdma) for a, b in itertools.combinations(nodes, 2)]


def members_fit(model: ModelSpec, stages: tuple[Stage, ...], nodes: list[NodeInfo], context: int) -> bool:
    usable = {n.id: n.memory_usable for n in nodes}
    last = len(stages) - 1
    return all(
        member_bytes(model, s.start, s.end, len(s.members), i == 0, i == last, context) <= usable[m]
        for i, s in enumerate(stages) for m in s.members
    )


# ---------------------------------------------------------------------------- recorded topologies


def test_four_studios_all_to_all_with_rdma_make_one_group_of_four():
    kimi = preset_spec("kimi-k2-thinking")
    nodes = [studio(f"studio{i}") for i in range(1, 5)]
    links = all_to_all(nodes, TB5, rdma=True)
    placement = plan_layers(kimi, nodes, links, context=CONTEXT, parallel="auto")
    assert placement.fits
    assert [(s.start, s.end, s.group) for s in placement.stages] == [
        (0, 61, ("studio1", "studio2", "studio3", "studio4"))]
    assert placement.why.startswith("tensor group of 4 (RDMA, 53 µs all-reduce): 2.48x the pipeline's "
                                    "expected decode (21.4 vs 8.6 tok/s)"), placement.why
    assert members_fit(kimi, placement.stages, nodes, CONTEXT)
    # each Studio holds a quarter of the layers, the whole parts and both ends
    share = member_bytes(kimi, 0, 61, 4, True, True, CONTEXT)
    assert sum(kimi.layer_bytes) / 4 < share < STUDIO_USABLE
    assert plan_layers(kimi, nodes, links, context=CONTEXT, parallel="tensor").stages == placement.stages


def test_two_studios_and_a_macbook_over_tb4_without_rdma():
    nodes = [studio("studio1"), studio("studio2"), macbook("mbp")]
    links = all_to_all(nodes, TB4, rdma=False)
    # auto makes groups over RDMA only: here, the pipeline, saying why
    qwen = preset_spec("qwen3-235b-a22b")
    placement = plan_layers(qwen, nodes, links, context=CONTEXT, parallel="auto")
    assert placement == replace(plan_layers(qwen, nodes, links, context=CONTEXT), why=placement.why)
    assert all(not s.group for s in placement.stages)
    assert placement.why == ("pipeline (23.3 tok/s expected): no tensor group possible: no Macs cabled all to all "
                             "have RDMA between them (auto makes groups over RDMA only; --parallel tensor makes "
                             "them over TCP too)")
    # forced over TCP: Qwen3-235B reads 11.8 GB a token over 94 layers, and 188 all-reduces
    # over TCP cost more than the halved reads save
    forced = plan_layers(qwen, nodes, links, context=CONTEXT, parallel="tensor")
    assert forced.fits and any(s.group for s in forced.stages)
    assert "(forced: parallel tensor): 0.92x the pipeline's expected decode (21.5 vs 23.3 tok/s)" in forced.why
    # Kimi reads 32 GB a token over 61 layers: even the TCP ring is projected to pay for the
    # two Studios (tensor_cost's TB4 figures), and the MacBook (slower memory, one more hop)
    # is left out: the two Studios hold it all. Only when forced: auto keeps the pipeline.
    kimi = preset_spec("kimi-k2-thinking")
    assert all(not s.group for s in plan_layers(kimi, nodes, links, context=CONTEXT, parallel="auto").stages)
    placement = plan_layers(kimi, nodes, links, context=CONTEXT, parallel="tensor")
    assert [(s.node, s.group) for s in placement.stages] == [("studio1", ("studio1", "studio2"))]
    assert placement.left_out == ("mbp",)
    assert "mbp: left out, the plan decodes faster without it" in placement.notes
    assert placement.why == ("tensor group of 2 studio1+studio2 (no RDMA: TCP ring, 50 µs a message, 151 µs "
                             "all-reduce) (forced: parallel tensor): 1.43x the pipeline's expected decode "
                             "(11.9 vs 8.3 tok/s)")
    assert members_fit(kimi, placement.stages, nodes, CONTEXT)


def test_a_chain_of_three_makes_no_group_of_three():
    kimi = preset_spec("kimi-k2-thinking")
    nodes = [studio("s1"), studio("s2"), studio("s3")]
    links = [LinkInfo("s1", "s2", TB5, TB_RTT, rdma=True), LinkInfo("s2", "s3", TB5, TB_RTT, rdma=True)]
    assert cliques([n.id for n in nodes], links, (2, 3)) == [("s1", "s2"), ("s2", "s3")]
    for parallel in ("auto", "tensor"):
        placement = plan_layers(kimi, nodes, links, context=CONTEXT, parallel=parallel)
        assert all(len(s.members) <= 2 for s in placement.stages)
        for s in placement.stages:
            if s.group:
                assert s.group in {("s2", "s1"), ("s2", "s3")}  # s2 heads: it is cabled to the third
    auto = plan_layers(kimi, nodes, links, context=CONTEXT, parallel="auto")
    assert [s.group for s in auto.stages] == [("s2", "s1")] and auto.left_out == ("s3",)
    assert auto.why == "tensor group of 2 s2+s1 (RDMA, 53 µs all-reduce): 1.61x the pipeline's expected decode " \
                       "(13.9 vs 8.6 tok/s)"


def test_forcing_tensor_where_impossible_falls_back_to_layers_and_says_why():
    kimi = preset_spec("kimi-k2-thinking")
    nodes = [studio("s1"), studio("s2"), studio("s3")]
    forced = plan_layers(kimi, nodes, [], context=CONTEXT, parallel="tensor")
    assert forced.fits and not any(s.group for s in forced.stages)  # a lone Mac, or no cables, still serves
    assert forced.why.startswith("pipeline (") and forced.why.endswith(
        "no tensor group possible: no two Macs are cabled directly (a group needs a cable between every two members)")
    # three Macs all to all, but Kimi's 64 heads split 2, 4 or 8 ways: a pair is the only group
    links = all_to_all(nodes, TB5, rdma=True)
    assert kimi.tensor_ways == (2, 4, 8)
    assert all(len(s.members) != 3 for s in plan_layers(kimi, nodes, links, context=CONTEXT,
                                                         parallel="tensor").stages)
    layered = ModelSpec("made-up", (10**9,) * 8)  # no family: cannot be split at all
    forced = plan_layers(layered, nodes, links, parallel="tensor")
    assert forced.fits and forced.why.endswith("no tensor group possible: made-up cannot be split across Macs "
                                               "(its family or head counts do not allow it)")
    auto = plan_layers(layered, nodes, links, parallel="auto")
    assert auto.fits and auto.why.startswith("pipeline (") and "cannot be split across Macs" in auto.why


def test_memory_per_member_follows_the_split():
    kimi = preset_spec("kimi-k2-thinking")
    layers = sum(kimi.layer_bytes[10:20])
    whole = -(-kimi.whole_bytes * 10 // kimi.num_layers)
    kv = kimi.kv_bytes(CONTEXT, 10)
    assert member_bytes(kimi, 10, 20, 4, False, False, CONTEXT) == -(-(layers - whole) // 4) + whole + -(-kv // 4)
    assert member_bytes(kimi, 0, 20, 2, True, False, 0) - member_bytes(kimi, 1, 20, 2, False, False, 0) \
        > kimi.embed_bytes  # the embedding is whole on every member of the first stage
    assert member_bytes(kimi, 10, 20, 1, False, False, CONTEXT) == layers + kv  # one Mac: the planner's cost


def test_four_studios_too_small_for_a_group_fall_back_to_the_pipeline():
    kimi = preset_spec("kimi-k2-thinking")
    # 200 GB each: a pipeline of 4 fits (800 GB), a group's members each need a quarter plus the whole parts
    nodes = [NodeInfo(f"s{i}", f"s{i}", "M3 Ultra", 256 * 2**30, 190 * 10**9, memory_bandwidth=819e9)
             for i in range(4)]
    links = all_to_all(nodes, TB5, rdma=True)
    placement = plan_layers(kimi, nodes, links, context=0, parallel="auto")
    assert placement.fits and members_fit(kimi, placement.stages, nodes, 0)


# ---------------------------------------------------------------------------- properties

SMALL = ModelSpec("small", (3 * 10**9,) * 12, embed_bytes=10**9, head_bytes=10**9,
                  kv_bytes_per_token_per_layer=4096, tensor_ways=(2, 4), hidden_size=4096,
                  whole_bytes=12 * 10**7)


@st.composite
def clusters(draw):
    n = draw(st.integers(1, 5))
    nodes = [NodeInfo(f"n{i}", f"n{i}", "", 0, draw(st.integers(1, 30)) * 10**9,
                      memory_bandwidth=draw(st.sampled_from([0.0, 400e9, 819e9]))) for i in range(n)]
    links = [LinkInfo(a.id, b.id, draw(st.sampled_from([0.0, TB4, TB5])),
                      draw(st.sampled_from([0.0, 5e-5, 5e-4])), rdma=draw(st.booleans()))
             for a, b in itertools.combinations(nodes, 2) if draw(st.booleans())]
    return nodes, links


@settings(max_examples=60, deadline=None)
@given(clusters(), st.sampled_from(["auto", "tensor"]), st.sampled_from([0, 4096]))
def test_groups_are_cliques_and_memory_is_never_exceeded(cluster, parallel, context):
    nodes, links = cluster
    placement = plan_layers(SMALL, nodes, links, context=context, parallel=parallel)
    if not placement.fits:
        assert parallel == "tensor" or not plan_layers(SMALL, nodes, links, context=context, parallel="pipeline").fits
        return
    assert placement.why
    linked = {frozenset((x.a, x.b)) for x in links}
    for s in placement.stages:
        if s.group:
            assert s.group[0] == s.node and len(s.group) in SMALL.tensor_ways
            assert all(frozenset(p) in linked for p in itertools.combinations(s.group, 2))
    assert members_fit(SMALL, placement.stages, nodes, context)
    assert [s.start for s in placement.stages] == [0] + [s.end for s in placement.stages[:-1]]
    assert placement.stages[-1].end == SMALL.num_layers
    everyone = [m for s in placement.stages for m in s.members] + list(placement.left_out)
    assert sorted(everyone) == sorted(n.id for n in nodes)
    if parallel == "auto" and any(s.group for s in placement.stages):  # chosen only when it pays
        pipe = plan_layers(SMALL, nodes, links, context=context, parallel="pipeline")
        assert decode_s(SMALL, pipe.stages, nodes, links) >= MIN_SPEEDUP * decode_s(SMALL, placement.stages,
                                                                                     nodes, links)


@settings(max_examples=40, deadline=None)
@given(clusters(), st.sampled_from([0, 4096]))
def test_pipeline_is_todays_plan(cluster, context):
    nodes, links = cluster
    today = plan_layers(SMALL, nodes, links, context=context, parallel="pipeline")
    if not any(x.rdma for x in links):  # the default, auto, groups only over RDMA cables
        assert plan_layers(SMALL, nodes, links, context=context).stages == today.stages
    assert today.why == "" and all(s.group == () for s in today.stages)
    if today.fits:  # one-Mac stages serialize exactly as before groups
        plan = today.stamp(1, 1, "small")
        assert all(set(s) == {"node", "start", "end", "bytes"} for s in to_json(plan)["stages"])
        assert from_json(Plan, to_json(plan)) == plan


def test_a_group_goes_over_the_wire():
    from tbmesh.core.messages import LinkState, LinkStates
    from tbmesh.net import wire

    plan = Plan(1, 2, "m", (Stage("a", 0, 4, 10, ("a", "b")), Stage("c", 4, 8, 10)))
    assert from_json(Plan, to_json(plan)) == plan
    assert plan.considered == {"a", "b", "c"} and plan.members == ("a", "b", "c")
    info = NodeInfo("a", "a")
    def frame(p: Plan) -> bytes:
        return b"".join(bytes(x) for x in wire.encode(LinkStates("a", (LinkState("a", 1, 1, info, plan=p),))))

    assert wire.decode(frame(plan)).states[0].plan == plan
    assert b"group" not in frame(Plan(1, 2, "m", (Stage("c", 4, 8, 10),)))  # as before groups
    try:
        wire.decode(frame(Plan(1, 2, "m", (Stage("a", 0, 4, 10, ("b", "a")),))))
    except wire.ProtocolError as error:
        assert "the stage's node first" in str(error)
    else:
        raise AssertionError("a group not led by its stage's node was accepted")


def test_describe_model_gives_what_a_group_needs():
    from tbmesh.core.modelspec import describe_model

    config = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 2, "moe_intermediate_size": 4, "intermediate_size": 16,
              "num_experts": 4, "num_experts_per_tok": 1}
    tensors = {"model.embed_tokens.weight": ("BF16", [10, 8]), "lm_head.weight": ("BF16", [10, 8]),
               "model.norm.weight": ("BF16", [8])}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": ("BF16", [8]),  # whole on every member
                    p + "self_attn.q_proj.weight": ("BF16", [8, 8]),
                    p + "mlp.gate.weight": ("BF16", [4, 8]),  # the router: whole
                    p + "mlp.switch_mlp.up_proj.weight": ("BF16", [4, 4, 8])}  # 1 of 4 experts read
    spec = describe_model("m", config, tensors)
    assert spec.tensor_ways == (2,)  # 2 key-value heads: 2 ways only
    assert spec.hidden_size == 8
    assert spec.whole_bytes == 2 * (8 + 32) * 2
    assert spec.read_bytes == sum(spec.layer_bytes) - 2 * (3 * 4 * 4 * 8 * 2 // 4)
