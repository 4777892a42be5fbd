"""Constrained decoding with llguidance: structured output where sampling happens.

A request's `Sampling.grammar` is llguidance's grammar text (made here from a JSON schema). At
each step the matcher of the request gives the tokens the grammar allows next; every other
logit becomes -inf before the sampler, and the sampled token advances the matcher. A matcher is
rebuilt from the tokens generated so far (`GrammarMatcher(..., tokens)`), so an attempt resumed
after a failure continues exactly where the last one stopped.

Why llguidance and not xgrammar: bench/grammar.py measures it (about 0.1 ms a token on the
tiny models' tokenizers); xgrammar's wheel imports torch and triton, which this project does
not carry.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from tbmesh.core.generation import BadRequest

# compact JSON: no free whitespace, which a small model could otherwise emit without end
JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}

_tokenizers: dict[int, tuple[Any, llguidance.LLTokenizer]] = {}  # id(TokenizerWrapper) -> (it, llguidance's)


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of a JSON answer matching `schema` (None: any JSON object, as JSON mode).
    Raises BadRequest for a schema llguidance cannot compile (the client's mistake)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as error:
        raise BadRequest(f"the JSON schema is not valid: {error}", param="schema") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise BadRequest(f"the JSON schema is not valid: {error}", param="schema")
    return grammar


# mlx-lm's tool parsers whose calls are a JSON object {"name": ..., "arguments": {...}} between
# the template's markers: the ones whose syntax a grammar here can force
JSON_TOOL_PARSERS = ("mlx_lm.tool_parsers.json_tools",)


def tool_call_grammar(tokenizer: Any, tools: list[dict[str, Any]]) -> str | None:
    """The grammar of one call of one of `tools` (the chat templates' form) in the model's
    tool-call syntax, as mlx-lm's tool parser reads it; None for a syntax not known here."""
    parser = getattr(tokenizer, "tool_parser", None)
    if parser is None or parser.__module__ not in JSON_TOOL_PARSERS or not tools:
        return None
    calls = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "arguments": tool["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]  # fmt: skip
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    start, end = (_marker(tokenizer, m) for m in (tokenizer.tool_call_start, tokenizer.tool_call_end))
    return llguidance.LLMatcher.grammar_from_lark(
        f'start: {start} "\\n"? call "\\n"? {end}\ncall: %json {json.dumps(schema)}\n')


def _marker(tokenizer: Any, text: str) -> str:
    """A marker in Lark: its special token by id when it is one token (a special token has no
    text to match), else its text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)


def ll_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of an mlx-lm TokenizerWrapper (built once per tokenizer: ~1 s)."""
    known = _tokenizers.get(id(tokenizer))
    if known is not None and known[0] is tokenizer:
        return known[1]
    made = llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids))
    _tokenizers[id(tokenizer)] = (tokenizer, made)
    return made


class GrammarMatcher:
    """One request's position in its grammar: the mask of the next token, advanced token by token."""

    def __init__(self, grammar: str, tokenizer: Any, tokens: list[int] = ()) -> None:  # type: ignore[assignment]
        self._tokenizer = ll_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        self._bits = np.zeros((self._tokenizer.vocab_size + 31) // 32, dtype=np.int32)
        for token in tokens:  # a resumed attempt: the answer so far, as the grammar saw it
            self.advance(token)
        if self._matcher.is_error():
            raise BadRequest(f"the grammar cannot be used: {self._matcher.get_error()}", param="response_format")

    def allowed(self, vocab: int) -> np.ndarray:
        """Which of the `vocab` token ids the grammar allows next (bool, shape (vocab,))."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little").astype(bool)
        if allowed.size < vocab:  # the model's embedding may be padded beyond the tokenizer
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.size, dtype=bool)])
        return allowed[:vocab]

    def mask(self, logits: mx.array) -> mx.array:
        """`logits` (…, vocab) with every token the grammar forbids at -inf."""
        allowed = mx.array(self.allowed(logits.shape[-1]))
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def advance(self, token: int) -> None:
        """The grammar takes the sampled `token` (an end token once the grammar is done)."""
        self._matcher.consume_token(token)

    def done(self) -> bool:
        return self._matcher.is_stopped()
