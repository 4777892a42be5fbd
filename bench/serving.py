"""Serving through the OpenAI API: tbmesh daemons against mlx_lm.server, with the openai SDK.

One random llama (bench/inference.py's model: tbmesh.testbed.tiny, float32, 24 layers x 256
hidden by default, made once and cached under /tmp/tbmesh-bench) is served, in the same run,
by three servers, all started by this script and all up at once:

  mlx_lm     mlx_lm.server --model DIR, batching and caching as its defaults or more:
             --decode-concurrency max(32, top level), --prompt-concurrency max(8, top level)
             (every stream of a level is prefilled and decoded in one batch),
             --prompt-cache-size 10 (its default), --log-level WARNING. Its HTTP server is
             Python's ThreadingHTTPServer, whose listen backlog is 5: here 16 streams
             connecting at once have some of their connections reset before it accepts them
             (the client sees a ReadError). So it runs as mlx_lm.server's main() with
             socketserver's backlog raised to `--mlx-backlog` (128, aiohttp's and so tbmesh's;
             0: `python -m mlx_lm server` unchanged)
  tbmesh_1   one `tbmesh daemon` (--interface lo --memory 8GB --no-probe --context C), a
             cluster of its own
  tbmesh_3   three of them in another cluster: a 3-stage pipeline (`--stages` says which)
  mlx_lm_batch  (concurrency only) mlx-lm's BatchGenerator in a worker process with no server, as
             mlx_lm.server drives it: the compute floor of batching with mlx-lm's caches here

Every request is the same streaming chat completion through the official openai SDK
(openai.AsyncOpenAI, one client per server, no retries): `messages`, temperature 0,
max_tokens N, stream_options include_usage; only the model name differs (each server's own).
Times are taken in this process as the SDK yields chunks: a request is sent just before
create() is called, and its tokens arrive in the chunks with non-empty delta.content (a server
sends no chunk for a token that ends inside a UTF-8 character, and mlx_lm.server sends the
last token's text and the detokenizer's flush in one chunk, tbmesh in two).

  one request  alone, a fresh prompt each round: TTFT (sent -> first content chunk) and decode
               tokens/s from the first to the last chunk; the chunks are mapped to token
               indices with mlx-lm's streaming detokenizer fed the answer of mlx-lm's
               generate_step on the same chat-templated prompt (bench/inference.py's baseline
               worker), so a chunk that carries several tokens is counted right
  concurrency  L streams sent at once for each L in --levels, `--tokens` tokens each, distinct
               prompts of similar length, a fresh set for every level and round (so that no
               server answers from its prompt cache): aggregate tokens/s = the streams'
               usage.completion_tokens summed / (first request sent -> last content chunk);
               TTFT p50/p95 over the requests; inter-token latency p50/p95 over all the gaps
               between consecutive content chunks of each stream
  chat         two turns: a ~300-token system prompt new to every server (each round's starts
               with its own "Conversation N.") and a short question; then the same system
               prompt, the question, the server's own turn-1 answer as it returned it and a new
               question; then "again": a new conversation with that system prompt and another
               question. TTFT of the three, turn 2 / turn 1 and again / turn 1. The random
               model's answers are mostly bytes that are not whole UTF-8 characters, which come
               back as U+FFFD: the answer as returned re-tokenizes to other (and more) tokens
               than were generated, so a cache of the turn-1 conversation serves turn 2 only up
               to the end of the turn-1 prompt (the usage's cached_tokens shows it)
  exact chat   (tbmesh only) the same two turns as a real model's answer comes back: turn 2's
               prompt is turn 1's tokens, the answer's own tokens and the template's tokens of
               the next question, sent as token ids to /v1/completions (which mlx_lm.server
               does not take)
  memory       per tbmesh daemon, during its runs at the top level (16 streams): the largest
               runtime.active_memory seen polling GET /status every 0.25 s, and the peak RSS
               (the kernel's VmHWM, reset before each such run), next to what its plan asks
               for: the plan's bytes for its stage + the KV room the planner reserves
               (kv_bytes_per_token_per_layer x context x the stage's layers). mlx_lm.server's
               peak RSS during its top-level runs, for reference
  identity     every answer compared across the servers for the same messages (temperature 0,
               the same float32 model), and the one-request answers also with generate_step's;
               a warning line for each difference (the run does not fail)

Each measurement runs `--rounds` times; in each round the servers go in a rotating order (and
at each concurrency level from a different one), so that the load of this shared machine
drifts over all alike. Figures are medians over the rounds; ratios are medians of the rounds'
ratios (both servers of a ratio measured in the same round). Before measuring, every server
answers one request and one burst of the top level's size (a few tokens; prompts used nowhere
else).

    .venv/bin/python bench/serving.py [--rounds 3] [--tokens 48] [--levels 1,4,8,16] [--stages 1,3]
    .venv/bin/python bench/serving.py --quick     # smoke run: 1 round, levels 1,4, 8 tokens

Writes bench/results/serving.json (or --out): the settings, every run's raw figures, the
medians and the ratios. Every server is stopped at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import (  # bench/inference.py (it puts tests/ on the path)
    ROOT,
    Baseline,
    Cluster,
    StatusPoller,
    decode_rate,
    median,
    model_dir,
    reset_peak_rss,
    rotate,
    vmhwm,
)

SYSTEM_PROMPT = (  # 305 tokens with the default (vocab 512) tokenizer; the run records the count
    "You are Atlas, the assistant of a small cluster of Macs that run large language models together. "
    "You answer questions from the people who own the machines: how to plug the cables, how the "
    "model is split into stages, why a machine left, and how fast the answers come. Keep each "
    "answer short and plain: two or three sentences unless the user asks for more. When a number "
    "matters, give it with its unit. When you are not sure, say so, and say what the user can "
    "check. Never invent a command: the only ones are tbmesh status, tbmesh plan and tbmesh chat. "
    "If a question is about something else, answer it briefly and kindly, then offer to help "
    "with the cluster."
)
FIRST_QUESTIONS = [
    "How do I add a fourth Mac to the cluster?", "Why is the second stage slower than the first?",
    "What happens when I unplug a cable?", "How much memory does one stage need?",
    "Can I run two models at once?", "How do I see which Mac holds which layers?",
    "What does the leader do?", "Why did a machine leave the cluster?",
]
SECOND_QUESTIONS = [
    "And how long does that take?", "Can you say that in one sentence?", "What should I check first?",
    "Does that change the speed?", "Is there a command for it?", "What if it happens again?",
    "How would I know?", "Thanks. Anything else I should know?",
]
TOPICS = [
    "the river", "the cluster", "winter", "the old clock", "a small garden", "the ship", "the teacher",
    "soup", "the railway", "the mill", "the lake", "the bakery", "a heron", "the leader", "the cables",
    "the layers", "good tools", "a test", "the town", "the school", "the window", "bandwidth", "the snow",
    "the harbour",
]
TEMPLATES = [
    "Tell me about {}.", "What do you know about {}?", "Describe {} in a few words.",
    "Write one sentence about {}.", "Why does {} matter?", "What is special about {}?",
    "Give me a fact about {}.", "Explain {} to a child.",
]


class Prompts:
    """Distinct user prompts of similar length, handed out once each (a topic in a template;
    numbered past the 192 pairs)."""

    def __init__(self) -> None:
        self.pairs = list(itertools.product(TEMPLATES, TOPICS))
        random.Random(0).shuffle(self.pairs)
        self.used = 0

    def take(self, n: int) -> list[str]:
        out = []
        for i in range(self.used, self.used + n):
            template, topic = self.pairs[i % len(self.pairs)]
            out.append(template.format(topic) + (f" ({i // len(self.pairs)})" if i >= len(self.pairs) else ""))
        self.used += n
        return out


def questions(r: int) -> tuple[str, str]:
    """Round r's two chat questions."""
    suffix = f" ({r // len(FIRST_QUESTIONS)})" if r >= len(FIRST_QUESTIONS) else ""
    return FIRST_QUESTIONS[r % len(FIRST_QUESTIONS)] + suffix, SECOND_QUESTIONS[r % len(SECOND_QUESTIONS)] + suffix


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- the servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxServer:
    """mlx_lm.server on the whole model, in a process of its own."""

    name = "mlx_lm"

    def __init__(self, path: Path, work: Path, top_level: int, backlog: int) -> None:
        self.port = free_port()
        self.flags = {"--decode-concurrency": max(32, top_level), "--prompt-concurrency": max(8, top_level),
                      "--prompt-cache-size": 10}
        launch = ["-m", "mlx_lm", "server"] if not backlog else [
            "-c", (f"import socketserver; socketserver.TCPServer.request_queue_size = {backlog}; "
                   "from mlx_lm import server; server.main()")]
        self.command = [sys.executable, *launch, "--model", str(path.resolve()),
                        "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING",
                        *(str(x) for kv in self.flags.items() for x in kv)]
        self.model = str(path.resolve())  # the id its /v1/models gives the --model directory
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = work / "mlx_lm.server.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pids = [self.proc.pid]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"mlx_lm.server did not answer /health within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class TbmeshServer:
    """A cluster of tbmesh daemons (bench/inference.py's Cluster), entered at stage 0's node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.name = f"tbmesh_{cluster.size}"
        self.model = cluster.model

    @property
    def url(self) -> str:
        return self.cluster.entry.api_url() + "/v1"

    @property
    def pids(self) -> list[int]:
        return [d.proc.pid for d in self.cluster.daemons]

    def stop(self) -> None:
        self.cluster.stop()


class BatchFloor:
    """mlx-lm's own continuous batching with no server: BatchGenerator in the baseline worker
    process (bench/inference.py), as mlx_lm.server drives it (32 decodes, 16 prompts at
    once). The compute floor of batching with mlx-lm's caches on this machine: what the
    servers' aggregate tokens/s are also measured against. Concurrency only."""

    name = "mlx_lm_batch"

    def __init__(self, baseline: Baseline, tokenizer: Any) -> None:
        self.baseline = baseline
        self.tokenizer = tokenizer
        self.pids = [baseline.proc.pid]

    async def burst(self, prompts: list[str], max_tokens: int) -> list[Answer]:
        ids = [list(self.tokenizer.apply_chat_template(user(p), add_generation_prompt=True)) for p in prompts]
        times = await asyncio.to_thread(self.baseline.call, "batch", prompts=ids, max_tokens=max_tokens)
        return [Answer(sent=0.0, chunks=t, completion_tokens=len(t)) for t in times]

    def stop(self) -> None:
        pass


# --- one streamed request ----------------------------------------------------------------------


@dataclass
class Answer:
    sent: float  # perf_counter just before create()
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with content
    pieces: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when given

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent if self.chunks else math.nan

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunks)


async def complete_ids(client: Any, model: str, prompt: list[int], max_tokens: int) -> Answer:
    """A streamed completion of a prompt given as token ids."""
    answer = Answer(sent=time.perf_counter())
    stream = await client.completions.create(model=model, prompt=prompt, stream=True, temperature=0,
                                             max_tokens=max_tokens, stream_options={"include_usage": True})
    async with stream:
        async for chunk in stream:
            now = time.perf_counter()
            for choice in chunk.choices:
                if choice.text:
                    answer.chunks.append(now)
                    answer.pieces.append(choice.text)
            if chunk.usage is not None:
                answer.completion_tokens = chunk.usage.completion_tokens
    return answer


async def ask(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> Answer:
    answer = Answer(sent=time.perf_counter())
    stream = await client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0, max_tokens=max_tokens,
        stream_options={"include_usage": True})
    async with stream:
        async for chunk in stream:
            now = time.perf_counter()
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    answer.chunks.append(now)
                    answer.pieces.append(choice.delta.content)
            if chunk.usage is not None:
                answer.completion_tokens = chunk.usage.completion_tokens
                answer.prompt_tokens = chunk.usage.prompt_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                answer.cached_tokens = getattr(details, "cached_tokens", None)
    return answer


# --- figures -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def paired(runs: dict[str, list[float]], a: str, b: str) -> float:
    """Median of the rounds' ratios a/b."""
    return round(median([x / y for x, y in zip(runs[a], runs[b]) if y]), 3)


class Identity:
    """Whether the servers' answers to the same messages were the same."""

    def __init__(self) -> None:
        self.compared = 0
        self.differing: list[dict[str, Any]] = []

    def check(self, where: str, answers: dict[str, str]) -> None:
        self.compared += 1
        if len(set(answers.values())) > 1:
            self.differing.append({"where": where, "answers": answers})
            names = list(answers)
            odd = [n for n in names[1:] if answers[n] != answers[names[0]]]
            print(f"  WARNING: answers differ at temperature 0 ({where}): {names[0]} vs {', '.join(odd)}", flush=True)

    def result(self) -> dict[str, Any]:
        return {"compared": self.compared, "all_identical": not self.differing, "differing": len(self.differing),
                "examples": self.differing[:5]}


# --- the measurements --------------------------------------------------------------------------


class Bench:
    def __init__(self, servers: list[Any], tokens: int, rounds: int, levels: list[int],
                 floor: BatchFloor | None = None) -> None:
        self.servers = servers
        self.floor = floor  # measured with the servers in the concurrency runs
        self.tokens = tokens
        self.rounds = rounds
        self.levels = levels
        self.prompts = Prompts()
        self.identity = Identity()
        self.clients: dict[str, Any] = {}

    async def __aenter__(self) -> Bench:
        import openai

        self.clients = {s.name: openai.AsyncOpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=600)
                        for s in self.servers}
        self.raw = {s.name: s for s in self.servers}
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients.values():
            await client.close()

    async def ask(self, server: Any, messages: list[dict[str, str]], max_tokens: int) -> Answer:
        return await ask(self.clients[server.name], server.model, messages, max_tokens)

    async def burst(self, server: Any, prompts: list[str], max_tokens: int) -> list[Answer]:
        if isinstance(server, BatchFloor):
            return await server.burst(prompts, max_tokens)
        return list(await asyncio.gather(*(self.ask(server, user(p), max_tokens) for p in prompts)))

    async def warm_up(self) -> None:
        warm = self.prompts.take(1 + max(self.levels))
        for server in self.servers:
            await self.ask(server, user(warm[0]), self.tokens)
            await self.burst(server, warm[1:], 4)

    async def one_request(self, expected: list[dict[str, Any]], prompts: list[str]) -> dict[str, Any]:
        """`expected[r]`: generate_step's answer to prompts[r] (text, emitted chunk indices)."""
        runs: dict[str, dict[str, list[float]]] = {s.name: {"ttft": [], "decode": []} for s in self.servers}
        exact: dict[str, list[bool]] = {s.name: [] for s in self.servers}
        for r in range(self.rounds):
            texts = {}
            for server in rotate(self.servers, r):
                a = await self.ask(server, user(prompts[r]), self.tokens)
                texts[server.name] = a.text
                match = a.text == expected[r]["text"] and len(a.chunks) >= 2
                # mapped: the first and last chunks come at tokens emitted[0] and emitted[-1]
                rate = decode_rate(expected[r]["emitted"], a.chunks) if match else \
                    (a.tokens - 1) / (a.chunks[-1] - a.chunks[0]) if len(a.chunks) >= 2 else math.nan
                runs[server.name]["ttft"].append(a.ttft)
                runs[server.name]["decode"].append(rate)
                exact[server.name].append(match)
            self.identity.check(f"one request, round {r + 1}", {"generate_step": expected[r]["text"], **texts})
            print(f"  round {r + 1}/{self.rounds}: " + "  ".join(
                f"{s.name} {runs[s.name]['decode'][-1]:.1f} tok/s, TTFT {runs[s.name]['ttft'][-1] * 1e3:.0f} ms"
                for s in self.servers), flush=True)
        out: dict[str, Any] = {"tokens": self.tokens, "rounds": self.rounds, "prompts": prompts, "servers": {}}
        for name, v in runs.items():
            out["servers"][name] = {
                "ttft_ms": ms(median(v["ttft"])), "decode_tokens_per_s": round(median(v["decode"]), 2),
                "runs_ttft_ms": [ms(x) for x in v["ttft"]], "runs_decode_tokens_per_s": [round(x, 2) for x in v["decode"]],
                # False: the answer was not generate_step's, so its chunks were not mapped to tokens
                # and decode is (completion tokens - 1) / (first -> last chunk)
                "decode_mapped_to_tokens": exact[name]}
        ttft = {n: v["ttft"] for n, v in runs.items()}
        decode = {n: v["decode"] for n, v in runs.items()}
        out["ratios"] = {f"{n}/mlx_lm": {"decode_tokens_per_s": paired(decode, n, "mlx_lm"), "ttft": paired(ttft, n, "mlx_lm")}
                         for n in runs if n != "mlx_lm"}
        return out

    async def concurrency(self, memory: Memory) -> dict[str, Any]:
        top = max(self.levels)
        contenders = self.servers + ([self.floor] if self.floor else [])
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {n: [] for n in self.levels} for s in contenders}
        for r in range(self.rounds):
            line = []
            for i, level in enumerate(self.levels):
                prompts = self.prompts.take(level)
                texts: dict[str, list[str]] = {}
                for server in rotate(contenders, r + i):
                    with memory.watch(server) if level == top else contextlib.nullcontext():
                        answers = await self.burst(server, prompts, self.tokens)
                    runs[server.name][level].append(figures(answers))
                    if server is not self.floor:
                        texts[server.name] = [a.text for a in answers]
                    line.append(f"{server.name} x{level} {runs[server.name][level][-1]['tokens_per_s']:.1f}")
                for k in range(level):
                    self.identity.check(f"concurrency {level}, round {r + 1}, stream {k}",
                                        {name: t[k] for name, t in texts.items()})
            print(f"  round {r + 1}/{self.rounds} (tokens/s): " + "  ".join(line), flush=True)
        keys = ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95")
        out: dict[str, Any] = {"tokens_per_request": self.tokens, "rounds": self.rounds, "levels": self.levels,
                               "servers": {}, "ratios": {}}
        for name, by_level in runs.items():
            out["servers"][name] = {str(n): {**{k: round(median([run[k] for run in v]), 2) for k in keys}, "runs": v}
                                    for n, v in by_level.items()}
        rates = {name: {n: [run["tokens_per_s"] for run in v] for n, v in by_level.items()} for name, by_level in runs.items()}
        names = [s.name for s in self.servers]
        pairs = [(n, "mlx_lm") for n in names if n != "mlx_lm"]
        pairs += [(n, self.floor.name) for n in names] if self.floor else []
        tb = sorted((n for n in names if n.startswith("tbmesh_")), key=lambda n: int(n.split("_")[1]))
        pairs += [(tb[-1], tb[0])] if len(tb) > 1 else []
        for a, b in pairs:
            out["ratios"][f"{a}/{b}"] = {str(n): paired({a: rates[a][n], b: rates[b][n]}, a, b) for n in self.levels}
        return out

    async def chat(self) -> dict[str, Any]:
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.servers}
        for r in range(self.rounds):
            first, second = questions(r)
            third = questions(r + self.rounds)[0]
            system = {"role": "system", "content": f"Conversation {r + 1}. {SYSTEM_PROMPT}"}  # new to every server
            turn1 = [system, {"role": "user", "content": first}]
            texts1, texts2 = {}, {}
            for server in rotate(self.servers, r):
                a1 = await self.ask(server, turn1, self.tokens)
                turn2 = [*turn1, {"role": "assistant", "content": a1.text}, {"role": "user", "content": second}]
                a2 = await self.ask(server, turn2, self.tokens)
                a3 = await self.ask(server, [system, {"role": "user", "content": third}], self.tokens)
                runs[server.name].append({
                    "turn1_ttft_ms": ms(a1.ttft), "turn2_ttft_ms": ms(a2.ttft), "turn2/turn1": round(a2.ttft / a1.ttft, 3),
                    "again_ttft_ms": ms(a3.ttft), "again/turn1": round(a3.ttft / a1.ttft, 3),
                    "turn1_prompt_tokens": a1.prompt_tokens, "turn2_prompt_tokens": a2.prompt_tokens,
                    "turn1_cached_tokens": a1.cached_tokens, "turn2_cached_tokens": a2.cached_tokens,
                    "questions": [first, second, third]})
                texts1[server.name], texts2[server.name] = a1.text, a2.text
            self.identity.check(f"chat turn 1, round {r + 1}", texts1)
            self.identity.check(f"chat turn 2, round {r + 1}", texts2)
            print(f"  round {r + 1}/{self.rounds} (TTFT ms, turn 1 -> turn 2, the system prompt again): " + "  ".join(
                f"{n} {v[-1]['turn1_ttft_ms']:.0f} -> {v[-1]['turn2_ttft_ms']:.0f}, {v[-1]['again_ttft_ms']:.0f}"
                for n, v in runs.items()), flush=True)
        return {"tokens": self.tokens, "rounds": self.rounds, **chat_summary(runs)}

    async def exact_chat(self, baseline: Baseline, tokenizer: Any) -> dict[str, Any]:
        """Two turns as a real model's answer comes back: turn 2's prompt is turn 1's prompt,
        the answer's own tokens (generate_step's, which the servers give at temperature 0) and
        the template's tokens of the next question. /v1/completions with token ids, so tbmesh
        only (mlx_lm.server takes text prompts)."""
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.servers if isinstance(s, TbmeshServer)}
        for r in range(self.rounds):
            first, second = questions(r + 2 * self.rounds)
            system = {"role": "system", "content": f"Exact conversation {r + 1}. {SYSTEM_PROMPT}"}
            ids1 = list(tokenizer.apply_chat_template([system, user(first)[0]], add_generation_prompt=True))
            answer, _ = await asyncio.to_thread(baseline.generate, ids1, self.tokens)
            marked = tokenizer.apply_chat_template([system, user(first)[0], {"role": "assistant", "content": "\x00"},
                                                    user(second)[0]], add_generation_prompt=True, tokenize=False)
            ids2 = ids1 + answer + tokenizer.encode(marked.split("\x00", 1)[1], add_special_tokens=False)
            for server in (s for s in rotate(self.servers, r) if s.name in runs):
                a1 = await complete_ids(self.clients[server.name], server.model, ids1, self.tokens)
                a2 = await complete_ids(self.clients[server.name], server.model, ids2, self.tokens)
                runs[server.name].append({"turn1_ttft_ms": ms(a1.ttft), "turn2_ttft_ms": ms(a2.ttft),
                                          "turn2/turn1": round(a2.ttft / a1.ttft, 3),
                                          "prompt_tokens": [len(ids1), len(ids2)], "answer_tokens": len(answer)})
            print(f"  round {r + 1}/{self.rounds} (TTFT ms, turn 1 -> turn 2): " + "  ".join(
                f"{n} {v[-1]['turn1_ttft_ms']:.0f} -> {v[-1]['turn2_ttft_ms']:.0f}" for n, v in runs.items()), flush=True)
        return {"tokens": self.tokens, "rounds": self.rounds, "servers": {
            name: {"turn1_ttft_ms": round(median([x["turn1_ttft_ms"] for x in v]), 2),
                   "turn2_ttft_ms": round(median([x["turn2_ttft_ms"] for x in v]), 2),
                   "turn2/turn1": round(median([x["turn2/turn1"] for x in v]), 3), "runs": v}
            for name, v in runs.items()}}


def chat_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of the chat rounds: turn 1 (a system prompt new to the server), turn 2 (the
    conversation again with one more question) and again (the system prompt again, with
    another question), and their ratios."""
    keys = ("turn1_ttft_ms", "turn2_ttft_ms", "again_ttft_ms", "turn2/turn1", "again/turn1")
    out: dict[str, Any] = {"servers": {name: {**{k: round(median([x[k] for x in v]), 3) for k in keys}, "runs": v}
                                       for name, v in runs.items()}, "ratios": {}}
    for name in runs:
        if name != "mlx_lm":
            out["ratios"][f"{name}/mlx_lm"] = {
                k.replace("_ms", ""): paired({n: [x[k] for x in v] for n, v in runs.items()}, name, "mlx_lm")
                for k in ("turn1_ttft_ms", "turn2_ttft_ms", "again_ttft_ms")}
    return out


def figures(answers: list[Answer]) -> dict[str, Any]:
    """One burst: aggregate tokens/s, TTFT and inter-token latency percentiles, and the raw data."""
    start = min(a.sent for a in answers)
    end = max(a.chunks[-1] for a in answers if a.chunks)
    ttfts = [a.ttft for a in answers]
    gaps = [g for a in answers for g in a.gaps]
    return {
        "tokens_per_s": round(sum(a.tokens for a in answers) / (end - start), 2),
        "ttft_ms_p50": ms(percentile(ttfts, 50)), "ttft_ms_p95": ms(percentile(ttfts, 95)),
        "itl_ms_p50": ms(percentile(gaps, 50)), "itl_ms_p95": ms(percentile(gaps, 95)),
        "seconds": round(end - start, 3), "completion_tokens": [a.completion_tokens for a in answers],
        "ttft_ms": [ms(t) for t in ttfts], "chunks": [len(a.chunks) for a in answers],
    }


class Memory:
    """Peaks of each server's processes during the runs it is watched in (the top level)."""

    def __init__(self, servers: list[Any]) -> None:
        self.pollers = {s.name: StatusPoller(s.cluster.daemons) for s in servers if isinstance(s, TbmeshServer)}
        self.rss_peak: dict[int, int] = {}

    @contextlib.contextmanager
    def watch(self, server: Any) -> Any:
        for pid in server.pids:
            reset_peak_rss(pid)
        poller = self.pollers.get(server.name)
        with poller if poller is not None else contextlib.nullcontext():
            yield
        for pid in server.pids:
            self.rss_peak[pid] = max(self.rss_peak.get(pid, 0), vmhwm(pid) or 0)

    def result(self, servers: list[Any], path: Path, context: int, level: int) -> dict[str, Any]:
        from tbmesh.weights.modeldir import describe_model_dir

        spec = describe_model_dir(path)
        nodes = []
        for server in servers:
            if not isinstance(server, TbmeshServer):
                continue
            for daemon, stage in server.cluster.stages():
                layers = stage["end"] - stage["start"]
                kv = spec.kv_bytes_per_token_per_layer * context * layers
                peak_active = self.pollers[server.name].peak.get(daemon.name)
                peak_rss = self.rss_peak.get(daemon.proc.pid)
                runtime = (daemon.status().get("runtime") or {})
                nodes.append({
                    "server": server.name, "node": daemon.name, "layers": f"{stage['start']}-{stage['end'] - 1}",
                    "plan_bytes": stage["bytes"], "kv_room_bytes": kv, "planned_bytes": stage["bytes"] + kv,
                    "weight_bytes": runtime.get("weight_bytes"), "active_memory_peak": peak_active,
                    "rss_peak": peak_rss,
                    "active_peak/planned": round(peak_active / (stage["bytes"] + kv), 3) if peak_active else None,
                    "rss_peak/planned": round(peak_rss / (stage["bytes"] + kv), 3) if peak_rss else None})
        mlx = next((s for s in servers if isinstance(s, MlxServer)), None)
        return {"streams": level, "context": context, "kv_bytes_per_token_per_layer": spec.kv_bytes_per_token_per_layer,
                "nodes": nodes, "mlx_lm": {"rss_peak": self.rss_peak.get(mlx.proc.pid) if mlx else None}}


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per answer (48; --quick: 8)")
    parser.add_argument("--levels", default=None, help="concurrent streams (1,4,8,16; --quick: 1,4)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every measurement (3; --quick: 1)")
    parser.add_argument("--stages", default="1,3", help="the tbmesh clusters, by their number of stages")
    parser.add_argument("--context", type=int, default=4096, help="the daemons' --context (KV room planned)")
    parser.add_argument("--mlx-backlog", type=int, default=128,
                        help="mlx_lm.server's listen backlog (0: its own, 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, levels 1,4, 8 tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tokens = args.tokens or (8 if args.quick else 48)
    rounds = args.rounds or (1 if args.quick else 3)
    levels = [int(n) for n in (args.levels or ("1,4" if args.quick else "1,4,8,16")).split(",")]
    sizes = [int(n) for n in args.stages.split(",")]
    out = Path(args.out or ROOT / "bench/results/serving.json")

    began = time.perf_counter()
    path = model_dir(args.layers, args.hidden, args.vocab)
    work = Path(tempfile.mkdtemp(prefix="tbmesh-bench-serving-"))
    import openai
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(path)
    system_tokens = len(tokenizer.encode(SYSTEM_PROMPT, add_special_tokens=False))
    results: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                 check=False, capture_output=True, text=True).stdout.strip(),
        "command": " ".join([".venv/bin/python", "bench/serving.py", *sys.argv[1:]]),
        "settings": {"tokens": tokens, "rounds": rounds, "levels": levels, "stages": sizes, "context": args.context,
                     "quick": args.quick, "client": f"openai {openai.__version__} AsyncOpenAI, streaming chat completions",
                     "system_prompt_tokens": system_tokens},
        "complete": False,
    }
    baseline = Baseline(path)
    mlx = MlxServer(path, work, max(levels), args.mlx_backlog)
    clusters = [Cluster(n, path, work, ["--context", str(args.context)]) for n in sizes]
    servers: list[Any] = [mlx, *(TbmeshServer(c) for c in clusters)]

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        for daemon in (d for c in clusters for d in c.daemons):  # their start-up overlaps the baseline's work
            daemon.launch()
        results["model"] = {"dir": path.name, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                            "dtype": "float32", "weight_bytes": baseline.call("memory")["weight_bytes"]}
        results["settings"]["mlx_lm_server"] = {"command": " ".join(mlx.command[1:]), "flags": mlx.flags,
                                                "listen_backlog": args.mlx_backlog or 5}
        one_prompts = questions_for_one(rounds)
        expected = []
        for prompt in one_prompts:  # generate_step's answers, to map the one-request chunks to tokens
            ids = tokenizer.apply_chat_template(user(prompt), add_generation_prompt=True)
            answer, _ = baseline.generate(ids, tokens)
            expected.append(baseline.call("events", tokens=answer))
        for daemon in (d for c in clusters for d in c.daemons):
            daemon.wait_started()
        for cluster in clusters:
            cluster.serving()
        mlx.wait_ready()
        print(f"model {path.name}: {results['model']['weight_bytes'] / 1e6:.1f} MB of weights; system prompt "
              f"{system_tokens} tokens; servers up after {time.perf_counter() - began:.0f} s: mlx_lm.server "
              f"({' '.join(f'{k} {v}' for k, v in mlx.flags.items())}, listen backlog {args.mlx_backlog or 5}); " + "; ".join(
                  f"tbmesh {c.size} stage(s): " + ", ".join(f"{d.name} layers {s['start']}-{s['end'] - 1}"
                                                            for d, s in c.stages()) for c in clusters), flush=True)
        memory = Memory(servers)

        async def measure() -> None:
            async with Bench(servers, tokens, rounds, levels, BatchFloor(baseline, tokenizer)) as bench:
                await bench.warm_up()
                print(f"one request: {tokens} tokens, {rounds} round(s)", flush=True)
                results["one_request"] = await bench.one_request(expected, one_prompts)
                print(f"concurrency: {levels} streams of {tokens} tokens, {rounds} round(s)", flush=True)
                results["concurrency"] = await bench.concurrency(memory)
                print(f"chat: {system_tokens}-token system prompt, 2 turns of {tokens} tokens, {rounds} round(s)",
                      flush=True)
                results["chat"] = await bench.chat()
                print(f"exact chat: the answers' own tokens sent back, {rounds} round(s)", flush=True)
                results["exact_chat"] = await bench.exact_chat(baseline, tokenizer)
                results["identity"] = bench.identity.result()

        asyncio.run(measure())
        results["memory"] = memory.result(servers, path, args.context, max(levels))
        results["complete"] = True
        report(results)
    except BaseException:
        print(f"logs of the servers in {work}", file=sys.stderr)
        raise
    finally:
        for server in servers:
            server.stop()
        baseline.close()
        results["seconds"] = round(time.perf_counter() - began, 1)
        if any(k in results for k in ("one_request", "concurrency", "chat")):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {out} ({results['seconds']:.0f} s in all); logs in {work}")


def questions_for_one(rounds: int) -> list[str]:
    """The one-request prompts: used by no other measurement (and not by the warm-up)."""
    return [f"Question {r + 1}: what is the best way to learn about {TOPICS[(5 * r) % len(TOPICS)]}?"
            for r in range(rounds)]


def report(r: dict[str, Any]) -> None:
    m, st = r["model"], r["settings"]
    print(f"\nmodel: llama, {m['layers']} layers x {m['hidden']} hidden, vocab {m['vocab']}, float32, "
          f"{m['weight_bytes'] / 1e6:.1f} MB; client: {st['client']}; medians of {st['rounds']} round(s); "
          "ratios: medians of the rounds' ratios")
    o = r["one_request"]
    print(f"\none request alone, {o['tokens']} tokens")
    print(f"| {'server':<9} | {'TTFT ms':>8} | {'decode tok/s':>12} | {'TTFT vs mlx_lm':>14} | {'decode vs mlx_lm':>16} |")
    for name, v in o["servers"].items():
        ratio = o["ratios"].get(f"{name}/mlx_lm", {})
        print(f"| {name:<9} | {v['ttft_ms']:8.1f} | {v['decode_tokens_per_s']:12.1f} | "
              f"{fmt(ratio.get('ttft')):>14} | {fmt(ratio.get('decode_tokens_per_s')):>16} |")
    c = r["concurrency"]
    print(f"\nconcurrent streams, {c['tokens_per_request']} tokens each (aggregate tokens/s; TTFT over requests, "
          "inter-token latency over all chunk gaps)")
    print(f"| {'server':<12} | {'streams':>7} | {'tok/s':>7} | {'TTFT p50':>8} | {'TTFT p95':>8} | {'ITL p50':>7} | "
          f"{'ITL p95':>7} | {'vs mlx_lm':>9} | {'vs batch':>8} | {'vs 1 stage':>10} |")
    for name, by_level in c["servers"].items():
        for n, v in by_level.items():
            vs_mlx = c["ratios"].get(f"{name}/mlx_lm", {}).get(n)
            vs_floor = c["ratios"].get(f"{name}/mlx_lm_batch", {}).get(n)
            vs_one = next((x.get(n) for k, x in c["ratios"].items() if k.startswith(f"{name}/tbmesh_")), None)
            print(f"| {name:<12} | {n:>7} | {v['tokens_per_s']:7.1f} | {v['ttft_ms_p50']:8.0f} | {v['ttft_ms_p95']:8.0f} | "
                  f"{v['itl_ms_p50']:7.1f} | {v['itl_ms_p95']:7.1f} | {fmt(vs_mlx):>9} | {fmt(vs_floor):>8} | "
                  f"{fmt(vs_one):>10} |")
    ch = r["chat"]
    print(f"\nmulti-turn chat, {st['system_prompt_tokens']}-token system prompt new to the servers each round, "
          f"{ch['tokens']}-token answers (TTFT ms: turn 1; turn 2 = the conversation and one more question; again "
          "= a new conversation with the same system prompt; prompt tokens and the tokens the server says it "
          "reused from its cache, turn 1 / turn 2, last round)")
    print(f"| {'server':<9} | {'turn 1':>7} | {'turn 2':>7} | {'again':>7} | {'turn2/turn1':>11} | {'again/turn1':>11} | "
          f"{'turn 2 vs mlx_lm':>16} | {'prompt tokens':>13} | {'cached':>9} |")
    for name, v in ch["servers"].items():
        last = v["runs"][-1]
        cached = "" if last["turn1_cached_tokens"] is None else f"{last['turn1_cached_tokens']}/{last['turn2_cached_tokens']}"
        print(f"| {name:<9} | {v['turn1_ttft_ms']:7.0f} | {v['turn2_ttft_ms']:7.0f} | {v['again_ttft_ms']:7.0f} | "
              f"{v['turn2/turn1']:11.3f} | {v['again/turn1']:11.3f} | "
              f"{fmt(ch['ratios'].get(f'{name}/mlx_lm', {}).get('turn2_ttft')):>16} | "
              f"{str(last['turn1_prompt_tokens']) + '/' + str(last['turn2_prompt_tokens']):>13} | {cached:>9} |")
    if r.get("exact_chat"):
        ex = r["exact_chat"]
        print("\nthe same as a real model's answer comes back (turn 2 = turn 1's tokens, the answer's own tokens, "
              "the next question; /v1/completions with token ids, tbmesh only; TTFT ms)")
        print(f"| {'server':<9} | {'turn 1':>7} | {'turn 2':>7} | {'turn2/turn1':>11} | {'prompt tokens':>13} |")
        for name, v in ex["servers"].items():
            tokens = v["runs"][-1]["prompt_tokens"]
            print(f"| {name:<9} | {v['turn1_ttft_ms']:7.0f} | {v['turn2_ttft_ms']:7.0f} | {v['turn2/turn1']:11.3f} | "
                  f"{str(tokens[0]) + '/' + str(tokens[1]):>13} |")
    mem = r["memory"]
    print(f"\nmemory per node under {mem['streams']} concurrent streams, MB (planned: the plan's bytes + KV room of "
          f"{mem['context']} tokens; MLX active: largest seen polling /status; peak RSS: the kernel's VmHWM)")
    print(f"| {'server':<9} | {'node':<5} | {'layers':<6} | {'plan':>6} | {'KV room':>7} | {'planned':>7} | "
          f"{'MLX active':>10} | {'peak RSS':>8} |")
    for n in mem["nodes"]:
        print(f"| {n['server']:<9} | {n['node']:<5} | {n['layers']:<6} | {n['plan_bytes'] / 1e6:6.1f} | "
              f"{n['kv_room_bytes'] / 1e6:7.1f} | {n['planned_bytes'] / 1e6:7.1f} | "
              f"{mb(n['active_memory_peak']):>10} | {mb(n['rss_peak']):>8} |")
    print(f"mlx_lm.server (whole model, one process): peak RSS {mb(mem['mlx_lm']['rss_peak'])} MB")
    ident = r["identity"]
    if ident["all_identical"]:
        print(f"\nanswers: all {ident['compared']} comparisons identical across the servers at temperature 0")
    else:
        print(f"\nWARNING: {ident['differing']} of {ident['compared']} comparisons of answers differ across the "
              "servers at temperature 0 (examples in the JSON)")


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def mb(x: int | None) -> str:
    return "" if not x else f"{x / 1e6:.1f}"


if __name__ == "__main__":
    main()
