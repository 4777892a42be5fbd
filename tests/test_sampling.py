"""Sampling: greedy, top-p, and draws keyed by (seed, step) that never touch MLX's global RNG."""

from __future__ import annotations

import mlx.core as mx
import pytest

from tbmesh.runtime.sampling import Sampling, make_sampler, sample

VOCAB = 64


def logits(seed: int = 0) -> mx.array:
    return mx.random.normal((1, VOCAB), key=mx.random.key(seed))


def test_temperature_zero_is_argmax():
    x = logits()
    assert sample(x, Sampling(), step=3) == mx.argmax(x, axis=-1).item()
    assert sample(x, Sampling(top_p=0.5, seed=1), step=9) == mx.argmax(x, axis=-1).item()


def test_same_seed_and_step_same_token_and_steps_differ():
    x = logits()
    s = Sampling(temperature=1.0, seed=7)
    tokens = [sample(x, s, step) for step in range(40)]
    assert tokens == [sample(x, s, step) for step in range(40)]
    assert len(set(tokens)) > 10  # each step has its own key
    assert tokens != [sample(x, Sampling(1.0, seed=8), step) for step in range(40)]


def test_global_rng_is_never_used():
    x = logits()
    mx.random.seed(123)
    before = mx.random.state[0]
    for step in range(5):
        sample(x, Sampling(0.8, 0.9, seed=7), step)
        sample(x, Sampling(0.8, 0.9), step)  # unseeded: fresh entropy, still not the global key
    assert mx.array_equal(mx.random.state[0], before).item()


def test_interleaved_requests_draw_as_if_alone():
    x, y = logits(1), logits(2)
    a, b = Sampling(0.8, seed=1), Sampling(0.8, seed=2)
    alone = [sample(x, a, step) for step in range(20)]
    interleaved = []
    for step in range(20):
        sample(y, b, step)
        interleaved.append(sample(x, a, step))
        sample(y, b, step + 100)
    assert interleaved == alone


def test_top_p_keeps_the_nucleus():
    x = mx.full((1, VOCAB), -10.0).at[0, 5].add(14.0)  # token 5 has about 99% of the mass
    assert {sample(x, Sampling(1.0, top_p=0.9, seed=3), step) for step in range(50)} == {5}
    assert len({sample(x, Sampling(50.0, top_p=1.0, seed=3), step) for step in range(50)}) > 1


def test_mlx_lm_sampler_adapter_counts_steps():
    x = logits()
    s = Sampling(0.8, 0.9, seed=7)
    sampler = make_sampler(s)
    logprobs = x - mx.logsumexp(x, keepdims=True)
    assert [sampler(logprobs).item() for _ in range(10)] == [sample(x, s, step) for step in range(10)]


def test_seeded_fixes_a_seed_once():
    s = Sampling(0.7).seeded()
    assert s.seed is not None and s.seeded() == s
    assert Sampling(0.7, seed=4).seeded().seed == 4


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"seed": -1},
                                    {"temperature": float("nan")}])
def test_invalid_sampling(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)
