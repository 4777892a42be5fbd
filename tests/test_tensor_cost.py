"""The tensor-parallel cost model: its calibration reproduces the published figures, and its
projections move the right way with the link."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbmesh.core.tensor_cost import (
    EXO_SPEEDUP,
    GB,
    KIMI_4_STUDIOS_TOKENS_PER_S,
    TB4_TCP,
    TB5_RDMA,
    Calibration,
    Link,
    Work,
    calibration,
    decode_work,
    pipeline_s,
    projection,
    speedup,
    tensor_s,
)

KIMI = "kimi-k2-thinking"


def test_calibration_reproduces_exos_speedups_within_5_percent():
    work = decode_work(KIMI, split_all=True)
    for n, published in EXO_SPEEDUP.items():
        assert speedup(work, n, TB5_RDMA) == pytest.approx(published, rel=0.05)
    assert speedup(work, 2, TB5_RDMA) == pytest.approx(1.8, rel=1e-9)  # solved on it exactly


def test_calibration_reproduces_the_4_studio_decode_rate():
    work = decode_work(KIMI, split_all=True)
    assert 1 / tensor_s(work, 4, TB5_RDMA, calibration()) == pytest.approx(KIMI_4_STUDIOS_TOKENS_PER_S, rel=1e-9)


def test_calibrated_constants_are_physical():
    cal = calibration()
    assert 0.2 < cal.efficiency <= 1.0
    assert 0 < cal.sync_s < 200e-6


def test_kimi_reads_its_active_experts_only():
    work = decode_work(KIMI)
    # 61 layers of ~10.9 GB hold 658 GB; a token reads attention, the shared expert and 8 of
    # 384 routed experts (27.5 MB each at int4 group 32) a layer, plus the 2.35 GB head
    assert 33 * GB < work.weight_bytes < 36 * GB
    # whole: the head, the router and MLA's down-projections, and the norms (61 layers of 32 KB)
    # and the routers' score bias (60 x 384 float32), as describe_model sums mlx-lm's tensors
    norms = 61 * 2 * (2 * 7168 + 1536 + 512) + 60 * 384 * 4
    assert work.whole_bytes == pytest.approx(2_348_824_576 + 60 * 35_782_656 + 30_277_632 + norms, rel=1e-6)
    assert decode_work(KIMI, split_all=True).weight_bytes == pytest.approx(work.weight_bytes)
    assert decode_work(KIMI, split_all=True).whole_bytes == 0


def test_a_dense_model_leaves_only_its_head_whole():
    work = decode_work("llama-3.1-70b")
    # the head and the layers' two norms; no router, no MLA
    assert work.whole_bytes == pytest.approx(591_020_032 + 80 * 2 * 8192 * 2)
    assert work.layers == 80 and work.hidden_bytes == 8192 * 2


def test_what_mlx_lm_leaves_whole_costs_kimi_speed():
    work, ideal = decode_work(KIMI), decode_work(KIMI, split_all=True)
    for n in (2, 4):
        assert 1.0 < speedup(work, n, TB5_RDMA) < speedup(ideal, n, TB5_RDMA)


def test_rdma_beats_tcp_and_tcp_gains_little_from_more_macs():
    work = decode_work(KIMI)
    assert speedup(work, 4, TB5_RDMA) > speedup(work, 4, TB4_TCP)
    assert speedup(work, 4, TB4_TCP) < 1.05 * speedup(work, 2, TB4_TCP)  # 2(N-1) rounds eat the gain


def test_one_mac_is_no_speedup():
    work = decode_work(KIMI)
    assert speedup(work, 1, TB5_RDMA) == pytest.approx(1.0)


def test_the_projection_is_labelled_and_names_every_case():
    lines = projection()
    assert lines[0].startswith("PROJECTION")
    assert len(lines) == 1 + 2 * 2 * 2
    assert all("x the pipeline" in line for line in lines[1:])


works = st.builds(Work, layers=st.integers(4, 200), hidden_bytes=st.integers(512, 65536),
                  split_bytes=st.floats(1e8, 1e12), whole_bytes=st.floats(0, 1e11))
latencies = st.floats(0, 1e-3)


@settings(max_examples=300, deadline=None)
@given(works, st.integers(2, 8), latencies, latencies, st.booleans(), st.floats(0, 1e-3))
def test_more_latency_never_makes_tensor_parallel_look_better(work, n, a, b, mesh, sync):
    # Latency slows the pipeline's hops too: a group already slower than the pipeline by far
    # may lose less than the pipeline does, but it never climbs back over 1 (see the module).
    low, high = sorted((a, b))
    cal = Calibration(0.5, sync)
    fast = Link("fast", low, 5 * GB, mesh)
    slow = dataclasses.replace(fast, latency_s=high)
    before = speedup(work, n, fast, cal)
    assert speedup(work, n, slow, cal) <= max(before, 1.0) * (1 + 1e-12)
    assert speedup(work, n, fast, Calibration(0.5, sync + high)) <= max(before, 1.0) * (1 + 1e-12)
    if before > 1:
        assert speedup(work, n, slow, cal) <= before * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(works, st.integers(2, 8))
def test_times_are_positive_and_a_group_never_beats_perfect_scaling(work, n):
    cal = calibration()
    assert pipeline_s(work, n, TB5_RDMA, cal) > 0 < tensor_s(work, n, TB5_RDMA, cal)
    assert speedup(work, n, TB5_RDMA, cal) < n
