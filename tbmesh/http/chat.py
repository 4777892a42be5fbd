"""Chat, whatever the HTTP API: what the OpenAI, Anthropic and Ollama endpoints share.

Two halves, neither of which knows HTTP:

- `chat_prompt(tokenizer, messages, tools)`: the prompt token ids, through the model's chat
  template. Messages and tools are in the form chat templates read (Hugging Face's, which is
  OpenAI's with the tool-call arguments as objects):

      {"role": "system" | "user" | "assistant" | "tool", "content": "...",
       "reasoning_content": "...",                       # assistant, optional: its think block
       "tool_calls": [{"id": "...", "type": "function",  # assistant, optional
                       "function": {"name": "...", "arguments": {...}}}],
       "tool_call_id": "...", "name": "..."}             # tool, optional
      tools: [{"type": "function", "function": {"name", "description", "parameters"}}]

- `generate(backend, model, prompt, max_tokens, sampling, reader, client_gone)`: runs the backend
  and yields the answer as events: `Text`, `Reasoning` (a thinking model's think block) and
  `ToolCall` (one whole call), and `TokenLogprobs` when sampling.logprobs asks for them. `ChatReader` turns
  tokens into those events as mlx_lm.server does: mlx-lm's streaming detokenizer, its text state
  machine (the tokenizer's think and tool-call markers) and its tool parser
  (`tokenizer.tool_parser`). `reader.finish_reason` and the token counts say how it ended.

An API module does, for one request:

    prompt = chat_prompt(tokenizer, messages, tools)            # TemplateError: a 400
    reader = ChatReader(tokenizer, prompt, stops, tools)        # tools: those offered, or None
    async for event in generate(backend, model, prompt, max_tokens, sampling, reader, client_gone):
        ...                                                     # Text, Reasoning, ToolCall, TokenLogprobs
    reader.finish_reason        # "stop", "length" or "tool_calls"; reader.stop.matched: the stop string met
    reader.prompt_tokens, reader.completion_tokens

`generate` raises ClientGone when `client_gone()` turns true, and the backend's errors
(tbmesh.core.generation.GenerationError) as they are: tbmesh.http.common maps them to statuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from tbmesh.core.generation import Backend, Sampling, TokenLogprobs

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The chat template refused the messages (or the model has none): the client's mistake."""


def chat_prompt(tokenizer: TokenizerWrapper, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None, thinking: bool | None = None) -> list[int]:  # fmt: skip
    """The prompt's token ids: the messages (and the tools offered, if any) through the model's
    chat template, with the generation prompt of the assistant's turn, as mlx_lm.server.
    `thinking`: ask a thinking model's template to think or not (None: the template's default)."""
    if not tokenizer.has_chat_template:
        raise TemplateError("the model has no chat template")
    options = {} if thinking is None else {"enable_thinking": thinking}  # mlx-lm names it as the template does
    try:
        tokens = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, **options)
    except Exception as error:  # jinja's own errors, and the templates' raise_exception()
        raise TemplateError(f"the chat template refused the messages: {error}") from None
    return list(tokens)


def text_size(*values: Any) -> int:
    """The characters of every string in `values` (messages, tools, prompts: JSON values), keys
    included: about what a chat template renders of them, before its own few markers."""
    size, stack = 0, list(values)
    while stack:  # no recursion: a value may nest as deep as the body's limit allows
        value = stack.pop()
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(len(key) for key in value if isinstance(key, str))
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return size


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Reasoning:
    """Text of the think block (between the tokenizer's think_start and think_end)."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One call, parsed by the model's tool parser once its end marker (or the answer's end) came."""

    index: int  # 0 for the answer's first call
    name: str
    arguments: Any  # as the model wrote them: an object, normally


Event = Text | Reasoning | ToolCall | TokenLogprobs


# --- from tokens to events -------------------------------------------------------------------


class StopText:
    """Cuts streamed text at the first stop string, holding back any text that might be the
    start of one, so that no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.matched: str | None = None  # the stop string met

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop string was met."""
        if not self.stops:
            return text, False
        text = self.pending + text
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            self.pending = ""
            at, self.matched = min(found)
            return text[:at], True
        held = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self.pending = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class ChatReader:
    """Tokens in, events out, for one answer.

    `split`: tell reasoning and tool calls from text (chat); else everything is Text (a plain
    completion). Tool calls are parsed only when `tools` were offered: without them the model's
    tool-call text stays text, as does a call the tool parser cannot read.
    """

    def __init__(self, tokenizer: TokenizerWrapper, prompt: list[int], stops: Sequence[str] = (),
                 tools: list[dict[str, Any]] | None = None, split: bool = True) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.tools = tools or None
        self.detokenizer = tokenizer.detokenizer  # mlx-lm's streaming one: whole characters only
        self.detokenizer.reset()
        self.stop = StopText(list(stops))
        self.machine = make_text_state_machine(tokenizer) if split else TextStateMachine()
        self.state = self.machine.make_state(_initial_state(tokenizer, prompt) if split else "normal")
        self.previous = self.state[0]
        self.tool_text = ""
        self.tool_calls = 0
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason = "stop"  # "length" at max_tokens, "tool_calls" when the answer called tools
        self.stopped = False  # a stop string ended the answer (self.stop.matched)

    def feed(self, token: int) -> list[Event]:
        """The events of one more generated token (not an end token). Check `stopped` after."""
        self.completion_tokens += 1
        self.detokenizer.add_token(token)
        text, self.stopped = self.stop.feed(self.detokenizer.last_segment)
        self.state, segments = TextStateMachine.split(self.state, text)
        return self._events(segments)

    def finish(self, length: bool) -> list[Event]:
        """The last events: `length` when max_tokens ended the answer (else an end token or a
        stop string did). As mlx_lm.server: held text is sent at max_tokens, dropped at the end
        (a partial marker); an unfinished tool call is still parsed."""
        events: list[Event] = []
        if not self.stopped:
            self.detokenizer.finalize()
            text, self.stopped = self.stop.feed(self.detokenizer.last_segment)
            if not self.stopped:
                text += self.stop.flush()
            self.state, segments = TextStateMachine.split(self.state, text)
            events += self._events(segments)
        if length and not self.stopped:
            self.finish_reason = "length"
            self.state, held, current = TextStateMachine.flush(self.state)
            events += self._events([(current, held)])
        else:
            self.state, _ = TextStateMachine.discard(self.state)
        if self.previous == "tool" and self.tool_text:
            events += self._tool_call()
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return events

    def _events(self, segments: list[tuple[str | None, str]]) -> list[Event]:
        events: list[Event] = []
        for state, text in segments:
            if state == "tool":
                self.tool_text += text
            else:
                if self.previous == "tool":
                    events += self._tool_call()
                if text:
                    events.append(Reasoning(text) if state == "reasoning" else Text(text))
            self.previous = state
        return events

    def _tool_call(self) -> list[Event]:
        text, self.tool_text = self.tool_text, ""
        calls = None
        if self.tools is not None and self.tokenizer.tool_parser is not None:
            try:
                calls = self.tokenizer.tool_parser(text, self.tools)
            except Exception as error:  # the parsers raise what their parsing raises
                log.info("the tool call is no call (%s: %s): answered as text", type(error).__name__, error)
        if calls is None:
            return [Text(f"{self.tokenizer.tool_call_start}{text}{self.tokenizer.tool_call_end or ''}")]
        events: list[Event] = []
        for call in calls if isinstance(calls, list) else [calls]:
            events.append(ToolCall(self.tool_calls, str(call.get("name")), call.get("arguments", {})))
            self.tool_calls += 1
        return events


def _initial_state(tokenizer: TokenizerWrapper, prompt: list[int]) -> str:
    """Where the answer starts, as mlx_lm.server: in the think block when the prompt opened one
    (a template that writes <think> after the generation prompt)."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        state = "reasoning"
    return tokenizer.response_initial_state or state


# --- driving the backend ---------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed its connection: stop generating for it."""


DISCONNECT_POLL = 0.1  # s: how often a wait for the next token checks that the client is still there


async def next_token(tokens: AsyncIterator[Any], client_gone: Callable[[], bool]) -> Any:
    """The backend's next item (None at the end); raises ClientGone when the client leaves.

    aiohttp does not cancel a handler when its client disconnects (unless the server was made
    with handler_cancellation), so a long wait watches the connection itself.
    """

    async def step() -> Any:
        try:
            return await anext(tokens)
        except StopAsyncIteration:
            return None

    task = asyncio.ensure_future(step())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done or client_gone():
                break
        if client_gone():
            raise ClientGone()
    except BaseException:
        if not task.done():
            task.cancel()  # cancels the backend's generation where it waits
            await asyncio.wait({task})  # the iterator must stop running before it can be closed
        raise
    return task.result()


async def generate(backend: Backend, model: str, prompt: list[int], max_tokens: int, sampling: Sampling,
                   reader: ChatReader, client_gone: Callable[[], bool]) -> AsyncIterator[Event]:  # fmt: skip
    """The answer's events as the tokens come. The backend's iterator is closed whatever ends
    this: the end of the answer, a stop string, an error, the client leaving (ClientGone), or
    the caller closing this generator (which frees the request's caches on every stage)."""
    ends = reader.tokenizer.eos_token_ids
    tokens = backend.generate(model, prompt, max_tokens, sampling)
    try:
        while reader.completion_tokens < max_tokens:
            item = await next_token(tokens, client_gone)
            token = item.token if isinstance(item, TokenLogprobs) else item
            if token is None or token in ends:  # an end token (the backend should not yield it, but may)
                break
            if isinstance(item, TokenLogprobs):
                yield item
            for event in reader.feed(token):
                yield event
            if reader.stopped:
                break
        for event in reader.finish(length=reader.completion_tokens >= max_tokens):
            yield event
    finally:
        await tokens.aclose()
