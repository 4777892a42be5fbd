"""Token sampling with a per-request, per-step random key.

Several requests run interleaved in one process, so no draw may touch MLX's global random
state: the key of a draw is derived from (seed, step) alone. With a seed, the same logits at
the same step give the same token wherever and whenever they are sampled, so a generation
re-run after a stage is lost (re-prefilled on a new plan) produces the same text.

The arithmetic is mlx-lm's: logits are turned into log-probabilities as generate_step does,
top-p is mlx-lm's apply_top_p, and the draw is its categorical sampling with an explicit key.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from tbmesh.core.generation import Sampling, TokenLogprobs

__all__ = ["Sampling", "TokenLogprobs", "draw", "logprobs_of", "make_sampler", "sample", "step_key", "token_logprobs"]


def step_key(seed: int, step: int) -> mx.array:
    """The random key of draw `step` of a request seeded `seed` (independent of all others)."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return mx.random.key(int.from_bytes(digest, "little"))


def logprobs_of(logits: mx.array) -> mx.array:
    # exactly generate_step's expression, so that the draws match mlx-lm's bit for bit
    return logits - mx.logsumexp(logits, keepdims=True)


def draw(logprobs: mx.array, sampling: Sampling, step: int) -> mx.array:
    """The token (shape (1,)) drawn from log-probabilities (1, vocab)."""
    if sampling.temperature == 0:
        return mx.argmax(logprobs, axis=-1)
    if sampling.top_p < 1:
        logprobs = apply_top_p(logprobs, sampling.top_p)
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    return mx.random.categorical(logprobs * (1.0 / sampling.temperature), key=step_key(seed, step))


def sample(logits: mx.array, sampling: Sampling, step: int) -> int:
    """The token to emit at `step` (0 for the first generated token) from logits (1, vocab)."""
    return draw(logprobs_of(logits), sampling, step).item()


def token_logprobs(logprobs: mx.array, token: int, top: int) -> TokenLogprobs:
    """`token` with its log-probability and the `top` likeliest tokens, from one row (vocab,) of
    log-probabilities (those of the model, before temperature and top-p: as mlx-lm reports them)."""
    if top <= 0:
        return TokenLogprobs(token, logprobs[token].item())
    ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
    values = logprobs[ids]
    likeliest = sorted(zip(ids.tolist(), values.tolist()), key=lambda pair: -pair[1])
    return TokenLogprobs(token, logprobs[token].item(), tuple(likeliest))


def make_sampler(sampling: Sampling) -> Callable[[mx.array], mx.array]:
    """An mlx-lm sampler (for generate_step) drawing as `sample` does; its n-th call is step n.

    One per request: the step count lives in the returned function.
    """
    step = 0

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal step
        token = draw(logprobs, sampling, step)
        step += 1
        return token

    return sampler
