"""The whole model in one process: what a single Mac runs, and a baseline for the cluster.

`LocalBackend` is a `tbmesh.core.generation.Backend` over `mlx_lm.load`: requests interleave token
by token in one MLX worker thread, each with its own KV cache.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

from tbmesh.core.generation import BadRequest, TokenLogprobs, Unavailable
from tbmesh.runtime.grammar import GrammarMatcher
from tbmesh.runtime.sampling import Sampling, draw, logprobs_of, token_logprobs

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

PREFILL_STEP = 2048  # as mlx-lm's generate_step, so that results match it exactly


@dataclass
class _LocalRequest:
    sampling: Sampling  # with a seed: its own random keys
    cache: list[Any] | None = None  # mlx-lm's KV cache of this request alone
    matcher: GrammarMatcher | None = None  # where the answer stands in sampling.grammar, if any


class LocalBackend:
    """The whole model in this process (mlx_lm.load). All MLX work runs in one worker thread,
    never on the event loop; requests interleave there token by token, each with its own cache."""

    def __init__(self, model_dir: str | Path, name: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tbmesh-mlx")
        self._closed = False
        # loaded in the worker thread too, as the arrays belong to the thread that uses them
        self._model, self._tokenizer = self._executor.submit(load, str(self.model_dir)).result()
        self.requests: dict[str, _LocalRequest] = {}  # in flight, with their caches
        self.cancelled: list[str] = []  # requests closed before their end

    def close(self) -> None:
        """Stop the worker thread. Call it before the process exits: MLX (0.32) now and then
        aborts the exit ("terminate called without an active exception") when a thread that
        used it still has its streams; clearing them in that thread first makes the exit clean."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(mx.clear_streams).result()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def models(self) -> list[str]:
        return [self.name]

    def context(self, model: str) -> int | None:
        return None  # as mlx_lm.server: the cache grows as the answer does

    def unavailable(self, model: str) -> Unavailable | None:
        return None

    def tokenizer(self, model: str) -> TokenizerWrapper:
        return self._tokenizer

    async def generate(self, model: str, prompt: list[int], max_tokens: int,
                       sampling: Sampling) -> AsyncIterator[int | TokenLogprobs]:  # fmt: skip
        if model != self.name:
            raise BadRequest(f"the model {model!r} does not exist here", param="model")
        if not prompt:
            raise BadRequest("the prompt is empty", param="prompt")
        loop = asyncio.get_running_loop()
        # no seed: a random one of this request's own, never the global RNG shared by all
        state = _LocalRequest(sampling.seeded())
        name = uuid.uuid4().hex
        self.requests[name] = state
        eos = self._tokenizer.eos_token_ids
        try:
            token, logprobs = await loop.run_in_executor(self._executor, self._prefill, state, prompt)
            for step in range(max_tokens):
                if token in eos:
                    return
                yield token if logprobs is None else logprobs
                if step + 1 == max_tokens:
                    return
                token, logprobs = await loop.run_in_executor(self._executor, self._decode, state, token, step + 1)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.append(name)
            raise
        finally:
            del self.requests[name]
            state.cache = None  # the KV cache goes with the request (once a running step ends)

    # in the worker thread

    def _prefill(self, state: _LocalRequest, prompt: list[int]) -> tuple[int, TokenLogprobs | None]:
        state.cache = make_prompt_cache(self._model)
        if state.sampling.grammar is not None:
            state.matcher = GrammarMatcher(state.sampling.grammar, self._tokenizer)
        tokens = mx.array(prompt)
        while tokens.size > 1:  # all but the last token, in mlx-lm's chunks
            n = min(PREFILL_STEP, tokens.size - 1)
            self._model(tokens[:n][None], cache=state.cache)
            mx.eval([c.state for c in state.cache])
            tokens = tokens[n:]
        return self._next(state, tokens, 0)

    def _decode(self, state: _LocalRequest, token: int, step: int) -> tuple[int, TokenLogprobs | None]:
        return self._next(state, mx.array([token]), step)

    def _next(self, state: _LocalRequest, tokens: mx.array, step: int) -> tuple[int, TokenLogprobs | None]:
        """The token of `step`, with its log-probabilities when the request asked for them."""
        if state.cache is None:
            raise RuntimeError("the request was cancelled")
        logits = self._model(tokens[None], cache=state.cache)[:, -1, :]
        if state.matcher is not None:  # as an mlx-lm logits processor: before the log-softmax
            logits = state.matcher.mask(logits)
        logprobs = logprobs_of(logits)
        token = draw(logprobs, state.sampling, step).item()
        if state.matcher is not None:
            state.matcher.advance(token)
        top = state.sampling.logprobs
        return token, None if top is None else token_logprobs(logprobs[0], token, top)
