"""What a grammar costs per token: compile a JSON schema, then time the per-token mask.

Usage: python bench/grammar.py MODEL_DIR [--out bench/results/grammar.json]

Usage adds the grammar's share of decode time at --streams concurrent streams (LocalBackend).

Drives llguidance's matcher along a valid answer of the schema (the tokens of a JSON document
that matches it), timing at each token the mask computation and its application to a logits
row, and the token's advance. xgrammar, the other engine on PyPI, is reported only as whether
it imports here (its wheel requires torch and triton, which this project does not carry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import load

from tbmesh.core.generation import Sampling
from tbmesh.runtime.grammar import GrammarMatcher, json_grammar
from tbmesh.runtime.local import LocalBackend

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"],
          "address": {"city": "London", "zip": "W1"}}


def xgrammar_status() -> str:
    try:
        import xgrammar  # noqa: F401
    except Exception as error:  # its import pulls torch: any failure says it does not run here
        return f"not importable: {type(error).__name__}: {error}"
    return "importable"


async def _streams(backend: LocalBackend, prompt: list[int], streams: int, max_tokens: int,
                   grammar: str | None) -> tuple[float, int]:
    """Wall seconds and tokens of `streams` concurrent requests (greedy, constrained or not)."""
    async def one() -> int:
        return len([t async for t in backend.generate(backend.name, prompt, max_tokens, Sampling(grammar=grammar))])

    started = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    return time.perf_counter() - started, sum(counts)


def grammar_share(model_dir: str, streams: int, rounds: int) -> dict[str, float]:
    """The grammar's share of decode time at `streams` concurrent streams on LocalBackend: the
    matchers' own time (mask and advance, timed inside) over the constrained run's wall time;
    unconstrained runs interleaved with the constrained ones, for the difference in wall time."""
    spent = [0.0]
    allowed, advance = GrammarMatcher.allowed, GrammarMatcher.advance

    def timed(method):  # count the engine's own time: the per-token mask and advance
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    GrammarMatcher.allowed, GrammarMatcher.advance = timed(allowed), timed(advance)
    grammar = json_grammar(SCHEMA)
    with LocalBackend(model_dir) as backend:
        tokenizer = backend.tokenizer(backend.name)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who was Ada Lovelace?"}],
                                               add_generation_prompt=True)
        plain = constrained = 0.0
        tokens_plain = tokens_constrained = 0
        for _ in range(rounds):
            seconds, count = asyncio.run(_streams(backend, prompt, streams, 64, None))
            plain, tokens_plain = plain + seconds, tokens_plain + count
            seconds, count = asyncio.run(_streams(backend, prompt, streams, 64, grammar))
            constrained, tokens_constrained = constrained + seconds, tokens_constrained + count
    GrammarMatcher.allowed, GrammarMatcher.advance = allowed, advance
    return {"streams": streams, "rounds": rounds,
            "plain_ms_per_token": round(plain / tokens_plain * 1000, 3),
            "constrained_ms_per_token": round(constrained / tokens_constrained * 1000, 3),
            "grammar_ms_per_token": round(spent[0] / tokens_constrained * 1000, 3),
            "grammar_share_of_decode": round(spent[0] / constrained, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--out", default="bench/results/grammar.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    vocab = model.args.vocab_size
    started = time.perf_counter()
    grammar = json_grammar(SCHEMA)
    GrammarMatcher(grammar, tokenizer)
    compile_ms = (time.perf_counter() - started) * 1000  # tokenizer conversion once, then the schema
    tokens = tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    logits = mx.zeros((1, vocab))
    mask_us, advance_us = [], []
    for _ in range(args.repeats):
        matcher = GrammarMatcher(grammar, tokenizer)
        for token in tokens:
            t0 = time.perf_counter()
            mx.eval(matcher.mask(logits))
            t1 = time.perf_counter()
            matcher.advance(token)
            advance_us.append((time.perf_counter() - t1) * 1e6)
            mask_us.append((t1 - t0) * 1e6)
    result = {
        "engine": "llguidance",
        "model": Path(args.model).name,
        "vocab": vocab,
        "answer_tokens": len(tokens),
        "compile_ms_first": round(compile_ms, 2),
        "mask_us_median": round(statistics.median(mask_us), 1),
        "mask_us_p90": round(statistics.quantiles(mask_us, n=10)[-1], 1),
        "advance_us_median": round(statistics.median(advance_us), 1),
        "per_token_us_median": round(statistics.median(m + a for m, a in zip(mask_us, advance_us)), 1),
        "xgrammar": xgrammar_status(),
        "decode": grammar_share(args.model, args.streams, args.rounds),
        "load_average": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
