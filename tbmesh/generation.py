"""What every surface and the data plane share about generating text, and nothing of HTTP.

A `Backend` turns prompt token ids into generated token ids: the cluster's serving engine
(tbmesh.serving.engine) or `LocalBackend`, the whole model in one process
(tbmesh.runtime.local). Its errors say what went wrong in words; only the HTTP layer
(tbmesh.openai_api) turns them into status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


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
    def models(self) -> list[str]:
        """The model ids served (the model directory's name)."""

    def unavailable(self, model: str) -> Unavailable | None:
        """Why `model` cannot serve requests now, or None when it can."""

    def tokenizer(self, model: str) -> TokenizerWrapper:
        """mlx-lm's tokenizer wrapper of `model` (chat template, eos ids, streaming detokenizer)."""

    def generate(self, model: str, prompt: list[int], params: GenerationParams) -> AsyncIterator[int]:
        """Yield the generated token ids. Ends after max_tokens, or at an end token, which is
        not yielded. Closing the iterator early (aclose) cancels the generation everywhere and
        frees its caches. Raises GenerationError for an error the client should see as such."""
