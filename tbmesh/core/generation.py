"""What every surface and the data plane share about generating text, and nothing of HTTP.

A `Backend` turns prompt token ids into generated token ids: the cluster's serving engine
(tbmesh.serving.engine) or `LocalBackend`, the whole model in one process
(tbmesh.runtime.local). Its errors say what went wrong in words; only the HTTP layer
(tbmesh.http.common) turns them into status codes.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

MAX_TOP_LOGPROBS = 20  # the likeliest tokens a request may ask for with each token (as OpenAI)


@dataclass(frozen=True)
class Sampling:
    """How a request samples: temperature 0 is greedy (argmax). `logprobs`: None, or how many
    of the likeliest tokens the last stage reports with each token's log-probability. The one
    type of it from the HTTP APIs, which check what clients send before they make one, through
    the backends and the wire (tbmesh.serving.messages) to the sampler (tbmesh.runtime.sampling).
    `grammar`: None, or the constraint of structured output (JSON mode, a schema, a forced tool call)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    # None, or the grammar every answer must match: a grammar engine's text (llguidance's, made
    # by tbmesh.runtime.grammar from a JSON schema); the last stage masks the logits with it
    grammar: str | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), not {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {self.logprobs}")

    def seeded(self) -> Sampling:
        """This sampling with a random seed if it has none: fix it once per request so that
        a replay (after a re-assignment) draws the same tokens."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token with its log-probability and the `top` likeliest tokens of its step
    (token id, log-probability), likeliest first: what a backend yields, instead of the bare
    token id, for a request whose sampling.logprobs is set."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class GenerationError(Exception):
    """A generation that cannot start or go on, with the reason a user should read."""


class Unavailable(GenerationError):
    """The model cannot serve now (no plan yet, it does not fit, a stage went away, the node
    is stopping); the same request may work later."""


class BadRequest(GenerationError):
    """The request itself is wrong (a prompt longer than the context, ...); `param` names the
    field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Backend(Protocol):
    model_dir: Path | None  # the model's directory (config.json, weights): what APIs tell of the model

    def models(self) -> list[str]:
        """The model ids served (the model directory's name)."""

    def unavailable(self, model: str) -> Unavailable | None:
        """Why `model` cannot serve requests now, or None when it can."""

    def context(self, model: str) -> int | None:
        """The most tokens (prompt and answer) one request may hold, or None for no limit."""

    def tokenizer(self, model: str) -> Any:  # an mlx_lm TokenizerWrapper (the core names no MLX type)
        """mlx-lm's tokenizer wrapper of `model` (chat template, eos ids, streaming detokenizer)."""

    def generate(self, model: str, prompt: list[int], max_tokens: int,
                 sampling: Sampling) -> AsyncIterator[int | TokenLogprobs]:  # fmt: skip
        """Yield the generated token ids (TokenLogprobs when sampling.logprobs is set). Ends after
        max_tokens, or at an end token, which is not yielded. Closing the iterator early (aclose) cancels the generation everywhere and
        frees its caches. Raises GenerationError for an error the client should see as such."""
