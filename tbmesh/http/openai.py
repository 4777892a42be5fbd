"""OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions and /v1/models.

The HTTP layer (request checking, server-sent events, client disconnects) is the same
whatever generates the tokens: a `tbmesh.core.generation.Backend` yields token ids, either the
cluster's serving engine or `tbmesh.runtime.local.LocalBackend`, the whole model in one
process. The chat template, detokenization, stop strings, reasoning and tool calls are
`tbmesh.http.chat`'s, shared with the other APIs. The HTTP modules alone map the backends' errors
to HTTP status codes; the request-reading helpers here (read_request, the field checks,
check_served, client_gone, in_worker) serve the Anthropic and Ollama modules too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import hdrs, web

from tbmesh.core.generation import MAX_TOP_LOGPROBS, Backend, BadRequest, GenerationParams, TokenLogprobs, Unavailable
from tbmesh.http.chat import (
    ChatReader,
    ClientGone,
    Event,
    Reasoning,
    TemplateError,
    Text,
    ToolCall,
    chat_prompt,
    generate,
    text_size,
)
from tbmesh.http.openapi import ApiDescription, Schema, json_body, nullable, obj, ref

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


@dataclass(frozen=True)
class Limits:
    """What a request, and the API's server, may take: the one home of these defaults (the
    README lists them; tbmesh.http.server.Listener applies those of the connections)."""

    max_body_bytes: int = 8 * 2**20
    max_json_depth: int = 64  # nested arrays and objects; a request needs 4, a tool schema a dozen
    max_tokens: int = 32768  # the most a request may ask for
    default_max_tokens: int = 2048  # when the request does not say
    max_stop: int = 16  # stop strings per request (OpenAI allows 4; some clients send more)
    # a prompt of more characters than the context's tokens times this is refused before it is
    # tokenized (a 1M-character prompt takes seconds): a token is about 4 characters of text,
    # hardly ever more than 32
    max_chars_per_token: int = 32
    # seconds from a connection's start (or its last answer) to a request's whole headers; an
    # idle keep-alive connection is closed then too (aiohttp's keepalive_timeout), later than
    # HTTP clients drop theirs (httpx after 5 s, aiohttp after 15 s)
    header_timeout: float = 20.0
    body_timeout: float = 30.0  # seconds to read a whole body: max_body_bytes at 280 kB/s (a 408 after)
    linger: float = 2.0  # seconds a body nobody read is drained before the connection closes (aiohttp's lingering_time)
    # open connections to the API (all its ports); beyond, a new one is closed as it is accepted
    max_connections: int = 256


# --- parsing requests ------------------------------------------------------------------------


ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class CompletionRequest:
    chat: bool  # /v1/chat/completions, else /v1/completions
    model: str
    params: GenerationParams
    stop: list[str]
    stream: bool
    include_usage: bool
    max_tokens_given: bool = True  # else params.max_tokens is the default, cut to the context
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat, as tbmesh.http.chat takes them
    tools: list[dict[str, Any]] | None = None  # chat: the tools offered (tool_choice applied)
    prompt: str | list[int] = ""  # completions: text, or token ids


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# The codes of the 400s that no schema of the request foresees: they depend on the model
# (its vocabulary, its chat template) and on the context. The OpenAPI document names them.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for it
TOKEN_NOT_IN_VOCABULARY = "token_not_in_vocabulary"
EMPTY_PROMPT = "empty_prompt"  # a text that the tokenizer makes no token of
CHAT_TEMPLATE_ERROR = "chat_template_error"  # the model has none, or it refused the messages
MODEL_DEPENDENT_CODES = (CONTEXT_LENGTH_EXCEEDED, TOKEN_NOT_IN_VOCABULARY, EMPTY_PROMPT, CHAT_TEMPLATE_ERROR)
# and those of what JSON Schema cannot say of a request: a string that must hold JSON, fields that
# must agree (tool_choice and tools, top_logprobs and logprobs), the last of the messages
INVALID_TOOL_ARGUMENTS = "invalid_tool_arguments"  # a tool call's arguments: a string that is not JSON
CONFLICTING_FIELDS = "conflicting_fields"
UNSUPPORTED_PREFILL = "unsupported_prefill"  # Anthropic's: a last assistant message to continue
UNDESCRIBABLE_CODES = (INVALID_TOOL_ARGUMENTS, CONFLICTING_FIELDS, UNSUPPORTED_PREFILL)


def _as_integer(value: Any) -> int | None:
    """`value` as an integer, or None if it is none. JSON has one kind of number: 5.0 is the
    integer 5 (as JSON Schema, and so the OpenAPI document, says), though json.loads makes it
    a float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    integer = _as_integer(value)
    if integer is None:
        raise _bad(name, f"'{name}' must be an integer, not {_type_name(value)}")
    if integer < low or (high is not None and integer > high):
        raise _bad(name, f"'{name}' must be {f'{low} to {high}' if high is not None else f'at least {low}'}, not {value}")
    return integer


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"'{name}' must be a number, not {_type_name(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise _bad(name, f"'{name}' must be {low:g} to {high:g}, not {value}")
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a boolean, not {_type_name(value)}")
    return value


def _stop_strings(body: dict[str, Any], limits: Limits) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise _bad("stop", "'stop' must be a string or an array of strings")
    if len(strings) > limits.max_stop:
        raise _bad("stop", f"'stop' may hold at most {limits.max_stop} strings, not {len(strings)}")
    return [s for s in strings if s]  # an empty stop string would end every answer at once


def _unicode(text: str, where: str, param: str) -> str:
    """`text`, if it can be encoded: JSON's \\ud800 escapes decode to lone surrogates, which
    no tokenizer takes (UTF-8 has no encoding for them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _bad(param, f"'{where}' is not valid Unicode: it holds a lone surrogate "
                          f"(U+{ord(text[error.start]):04X}) at character {error.start}") from None
    return text


def _content(message: dict[str, Any], where: str) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    content = message.get("content")
    if isinstance(content, str):
        return _unicode(content, f"{where}.content", "messages")
    if content is None and message.get("role") == "assistant":  # e.g. a tool-calling turn
        return ""
    if not isinstance(content, list):
        raise _bad("messages", f"'{where}.content' must be a string or an array of text parts, not {_type_name(content)}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad("messages", f"'{where}.content[{i}]' is not a text part "
                                   '({"type": "text", "text": "..."}); only text is supported')  # fmt: skip
        texts.append(_unicode(part["text"], f"{where}.content[{i}].text", "messages"))
    return "".join(texts)


def _arguments(call: dict[str, Any], where: str) -> Any:
    """A tool call's arguments as chat templates want them: OpenAI sends a JSON string."""
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError as error:
        raise _bad("messages", f"'{where}.arguments' is not JSON: {error}", INVALID_TOOL_ARGUMENTS) from None


def _tool_calls(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise _bad("messages", f"'{where}.tool_calls' must be an array, not {_type_name(calls)}")
    result = []
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad("messages", f"'{here}' must be an object with a function (with a name)")
        result.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                       "function": {"name": function["name"], "arguments": _arguments(function, f"{here}.function")}})
    return result


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages in the form chat templates read (see tbmesh.http.chat)."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty array of messages")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad("messages", f"'{where}' must be an object, not {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise _bad("messages", f"'{where}.role' must be one of {', '.join(ROLES)}, not {json.dumps(role)}")
        # OpenAI's "developer" is the newer name of "system", which chat templates know
        chat: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(message, where)}
        if role == "assistant":
            if message.get("tool_calls") is not None:
                chat["tool_calls"] = _tool_calls(message, where)
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if isinstance(reasoning, str) and reasoning:
                chat["reasoning_content"] = _unicode(reasoning, f"{where}.reasoning_content", "messages")
        if role == "tool":
            for name in ("tool_call_id", "name"):
                if isinstance(message.get(name), str):
                    chat[name] = message[name]
        result.append(chat)
    return result


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools", f"'tools' must be an array of tools, not {_type_name(tools)}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad("tools", f"'tools[{i}]' must be a function tool: {{\"type\": \"function\", \"function\": {{...}}}}")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _bad("tools", f"'tools[{i}].function' must be an object with a name")
        if not isinstance(function.get("parameters", {}), dict):
            raise _bad("tools", f"'tools[{i}].function.parameters' must be a JSON schema object")
    return tools or None


def _offered_tools(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The tools the chat template offers the model, as tool_choice says. "none": none (the
    model is not told of them); "auto" and "required": all (nothing forces a call: mlx-lm and the
    pipeline have no constrained decoding); a named function: only that one."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required"):
        if choice is not None and tools is None:
            raise _bad("tool_choice", "'tool_choice' is only allowed when 'tools' are given", CONFLICTING_FIELDS)
        return tools
    if choice == "none":
        return None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise _bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                  '{"type": "function", "function": {"name": ...}}')
    named = [tool for tool in tools or [] if tool["function"]["name"] == name]
    if not named:
        raise _bad("tool_choice", f"'tool_choice' names the function {name!r}, which is not in 'tools'",
                   CONFLICTING_FIELDS)
    return named


# fields OpenAI has and this server does not: refused rather than silently ignored
UNSUPPORTED = {
    "logit_bias": "logit biases are not supported",
    "presence_penalty": "presence penalties are not supported",
    "frequency_penalty": "frequency penalties are not supported",
    "functions": "the old 'functions' are not supported: use 'tools'",
    "function_call": "the old 'function_call' is not supported: use 'tool_choice'",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, 0, {}, []):  # their neutral values are fine
            raise _bad(name, f"'{name}': {why}")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _bad("response_format", "'response_format': only {\"type\": \"text\"} is supported "
                                      "(no JSON mode or schema)")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _bad("modalities", "'modalities': only [\"text\"] is supported")


def _logprobs(body: dict[str, Any]) -> int | None:
    """None, or how many of the likeliest tokens to give with each token's log-probability."""
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true", CONFLICTING_FIELDS)
    return (top or 0) if wanted else None


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "'prompt' is required")
    # OpenAI takes a batch too (an array of strings or of token arrays): one prompt is served
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _bad("prompt", f"only one prompt per request is supported, not {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _unicode(prompt, "prompt", "prompt")
    if isinstance(prompt, list):
        tokens = [_as_integer(t) for t in prompt]
        if None not in tokens:
            return tokens
    raise _bad("prompt", "'prompt' must be a string or an array of token ids")


def parse_request(body: Any, chat: bool, limits: Limits) -> CompletionRequest:
    """Check a request body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {_type_name(body)}")
    model = body.get("model")
    if model is None:
        raise _bad("model", "'model' is required (GET /v1/models lists them)")
    if not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, not {_type_name(model)}")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise _bad("n", f"only n=1 is supported, not {n}")
    # max_completion_tokens is the newer name; it wins when both are given (as in mlx-lm),
    # but both are checked: a wrong value is an error even where the other one wins
    max_completion_tokens = _integer(body, "max_completion_tokens", 1, limits.max_tokens)
    max_tokens = _integer(body, "max_tokens", 1, limits.max_tokens)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stop = _stop_strings(body, limits)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", f"'stream_options' must be an object, not {_type_name(options)}")
    include_usage = _boolean(options or {}, "include_usage")
    temperature = 1.0 if temperature is None else temperature  # OpenAI's defaults
    top_p = 1.0 if top_p is None else top_p
    if top_p == 0:  # only the likeliest token is left: greedy
        temperature, top_p = 0.0, 1.0
    params = GenerationParams(
        max_tokens=limits.default_max_tokens if max_tokens is None else max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=None if seed is None else seed % 2**64,  # OpenAI's are signed, the samplers' keys not
    )
    request = CompletionRequest(chat, model, params, stop, stream, stream and include_usage,
                                max_tokens_given=max_tokens is not None)
    if chat:
        _refuse_unsupported(body)
        request.messages = _messages(body)
        request.tools = _offered_tools(body, _tools(body))
        request.params = replace(params, logprobs=_logprobs(body))
    else:
        if body.get("logprobs") is not None:
            raise _bad("logprobs", "'logprobs' is not supported on /v1/completions: use /v1/chat/completions")
        request.prompt = _prompt(body)
    return request


def prompt_tokens(tokenizer: TokenizerWrapper, request: CompletionRequest, context: int | None = None,
                  limits: Limits = Limits()) -> list[int]:  # fmt: skip
    """The prompt as token ids: chat messages through the model's chat template. A text that
    could not fit `context` tokens is refused before (check_prompt_size). CPU-heavy: in_worker."""
    if request.chat:
        if not tokenizer.has_chat_template:
            raise ApiError(400, f"the model {request.model} has no chat template: use /v1/completions",
                           param="messages", code=CHAT_TEMPLATE_ERROR)
        check_prompt_size(text_size(request.messages, request.tools), context, limits, "messages")
        try:
            return chat_prompt(tokenizer, request.messages, request.tools)
        except TemplateError as error:
            raise ApiError(400, str(error), param="messages", code=CHAT_TEMPLATE_ERROR) from None
    if isinstance(request.prompt, str):
        check_prompt_size(len(request.prompt), context, limits, "prompt")
        tokens = tokenizer.encode(request.prompt)  # with the BOS token where the model wants one, as mlx-lm
        if not tokens:
            raise _bad("prompt", "'prompt' is empty", EMPTY_PROMPT)
        return list(tokens)
    if not request.prompt:
        raise _bad("prompt", "'prompt' is empty")
    vocabulary = len(tokenizer)
    wrong = next((t for t in request.prompt if not 0 <= t < vocabulary), None)
    if wrong is not None:
        raise _bad("prompt", f"token id {wrong} is not in the vocabulary (0 to {vocabulary - 1})",
                   TOKEN_NOT_IN_VOCABULARY)
    return list(request.prompt)


def fit_context(request: CompletionRequest, prompt: int, context: int | None,
                max_tokens_name: str = "max_tokens") -> GenerationParams:  # fmt: skip
    """The parameters with max_tokens within the backend's context (the KV room of a stage):
    a default cut to what is left, a prompt and max_tokens that can never fit a 400 (naming
    max_tokens as the API does)."""
    params = request.params
    if context is None:
        return params
    if prompt >= context:
        raise _bad("messages" if request.chat else "prompt",
                   f"the prompt has {prompt} tokens; the context is {context} tokens (--context)",
                   CONTEXT_LENGTH_EXCEEDED)
    if not request.max_tokens_given:
        return replace(params, max_tokens=min(params.max_tokens, context - prompt))
    if prompt + params.max_tokens > context:
        raise _bad(max_tokens_name, f"the prompt ({prompt} tokens) and {max_tokens_name} ({params.max_tokens}) "
                                    f"need {prompt + params.max_tokens} tokens; the context is {context} tokens "
                                    f"(--context): lower {max_tokens_name} to at most {context - prompt}",
                   CONTEXT_LENGTH_EXCEEDED)
    return params


# --- from tokens to text ---------------------------------------------------------------------


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def usage(reader: ChatReader) -> dict[str, int]:
    return {"prompt_tokens": reader.prompt_tokens, "completion_tokens": reader.completion_tokens,
            "total_tokens": reader.prompt_tokens + reader.completion_tokens}  # fmt: skip


# --- responses -------------------------------------------------------------------------------


def _failure(error: Exception) -> ApiError:
    """An error of the backend as the client sees it."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Unavailable):
        return ApiError(503, str(error), "service_unavailable")
    if isinstance(error, BadRequest):
        return ApiError(400, str(error), param=error.param)
    log.error("generation failed", exc_info=error)
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")


def check_served(backend: Backend, model: str) -> None:
    """Raises ApiError: 404 for a model this node does not serve, 503 for one that cannot serve now."""
    served = backend.models()
    if model not in served:
        raise ApiError(404, f"the model {model!r} does not exist here; this node serves: "
                            f"{', '.join(served) or 'no model'}", param="model", code="model_not_found")  # fmt: skip
    reason = backend.unavailable(model)
    if reason is not None:
        raise _failure(reason)


class Responder:
    """Answers one completion request, streamed or not, in OpenAI's shapes."""

    def __init__(self, request: web.Request, backend: Backend, completion: CompletionRequest) -> None:
        self.request = request
        self.backend = backend
        self.completion = completion
        self.id = f"{'chatcmpl' if completion.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tokenizer: TokenizerWrapper | None = None

    def _object(self, chunk: bool) -> str:
        if not self.completion.chat:
            return "text_completion"  # both streamed and not
        return "chat.completion.chunk" if chunk else "chat.completion"

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self._object(chunk), "created": self.created,
                "model": self.completion.model, "choices": choices}  # fmt: skip

    def _choice(self, content: dict[str, Any], finish_reason: str | None, chunk: bool,
                logprobs: list[TokenLogprobs] | None = None) -> dict[str, Any]:  # fmt: skip
        """`content`: the text (completions), or the message's or delta's fields (chat)."""
        choice: dict[str, Any] = {"index": 0}
        if not self.completion.chat:
            choice["text"] = content.get("content", "")
        elif chunk:
            choice["delta"] = content
        else:
            choice["message"] = {"role": "assistant", **content}
        choice["logprobs"] = self._logprobs(logprobs) if logprobs else None
        choice["finish_reason"] = finish_reason
        return choice

    def _logprobs(self, tokens: list[TokenLogprobs]) -> dict[str, Any]:
        """OpenAI's logprobs object of a chat choice."""
        assert self.tokenizer is not None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, p) for i, p in t.top]}
                            for t in tokens], "refusal": None}  # fmt: skip

    def _tool_call(self, call: ToolCall, chunk: bool) -> dict[str, Any]:
        body = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        return {"index": call.index, **body} if chunk else body

    async def answer(self, tokenizer: TokenizerWrapper, prompt: list[int]) -> web.StreamResponse:
        self.tokenizer = tokenizer
        completion = self.completion
        reader = ChatReader(tokenizer, prompt, completion.stop, completion.tools, split=completion.chat)
        events = generate(self.backend, completion.model, prompt, completion.params, reader,
                          lambda: client_gone(self.request))
        if completion.stream:
            return await self._stream(events, reader)
        text, reasoning, calls, logprobs = [], [], [], []
        try:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, Text):
                        text.append(event.text)
                    elif isinstance(event, Reasoning):
                        reasoning.append(event.text)
                    elif isinstance(event, ToolCall):
                        calls.append(self._tool_call(event, chunk=False))
                    else:
                        logprobs.append(event)
        except ClientGone:
            return web.Response(status=499)  # nobody reads it: nginx's "client closed request"
        except Exception as error:
            return _failure(error).response()
        message: dict[str, Any] = {"content": "".join(text)}
        if calls and not message["content"]:
            message["content"] = None  # as OpenAI: a turn of tool calls has no content
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        choice = self._choice(message, reader.finish_reason, chunk=False, logprobs=logprobs)
        if completion.params.logprobs is not None and not logprobs:
            choice["logprobs"] = {"content": [], "refusal": None}
        body = self._envelope(False, [choice])
        body["usage"] = usage(reader)
        return web.json_response(body)

    def _delta(self, event: Text | Reasoning | ToolCall) -> dict[str, Any]:
        if isinstance(event, Text):
            return {"content": event.text}
        if isinstance(event, Reasoning):
            return {"reasoning_content": event.text}
        return {"tool_calls": [self._tool_call(event, chunk=True)]}

    async def _stream(self, events: AsyncIterator[Event], reader: ChatReader) -> web.StreamResponse:
        """Server-sent events. The response starts with the first event, so that an error
        before any (no plan any more, a failed prefill) is still an HTTP error status."""
        response: web.StreamResponse | None = None
        include_usage: dict[str, Any] = {"usage": None} if self.completion.include_usage else {}
        logprobs: list[TokenLogprobs] = []  # of the tokens since the last chunk

        async def send(event: dict[str, Any] | str) -> None:
            nonlocal response
            try:
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
                    await response.prepare(self.request)
                    if self.completion.chat:  # OpenAI's first chunk gives the role
                        first = self._envelope(True, [self._choice({"role": "assistant", "content": ""}, None, chunk=True)])
                        await response.write(_event({**first, **include_usage}))
                await response.write(_event(event))
            except ConnectionError:  # aiohttp's ClientConnectionResetError: the client went away
                raise ClientGone() from None

        async def chunk(content: dict[str, Any], finish_reason: str | None) -> None:
            choice = self._choice(content, finish_reason, chunk=True, logprobs=logprobs)
            logprobs.clear()
            await send({**self._envelope(True, [choice]), **include_usage})

        try:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, TokenLogprobs):
                        logprobs.append(event)
                    else:
                        await chunk(self._delta(event), None)
            await chunk({}, reader.finish_reason)
            if self.completion.include_usage:
                await send({**self._envelope(True, []), "usage": usage(reader)})
            await send("[DONE]")
        except ClientGone:
            return response or web.Response(status=499)
        except Exception as error:
            failure = _failure(error)
            if response is None:
                return failure.response()
            try:  # the status has gone out already: an error event, then the end
                await send(failure.body())
                await send("[DONE]")
            except ClientGone:
                pass
        return response  # type: ignore[return-value]  # set by send()


def _event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` in `text` (brackets in strings do not
    count). Without recursion: json.loads recurses per level and a body of 100 000 brackets
    raises RecursionError. An invalid body may be misjudged; json.loads refuses it anyway."""
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += _NESTING[bracket]
        if depth > limit:
            return True
    return False


# The API's worker: the CPU-heavy steps of a request (decoding and checking its JSON, the chat
# template, tokenizing) run there, off the event loop, whose heartbeats and GET /health must not
# wait for them. One thread: two tokenizer calls never overlap (a Hugging Face fast tokenizer
# refuses a second while one runs: "Already borrowed"), and the loop keeps the other core.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tbmesh-api")


async def in_worker(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)`, run in the API's worker thread."""
    return await asyncio.get_running_loop().run_in_executor(_WORKER, partial(function, *args))


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def check_json_type(request: web.Request) -> None:
    """Raises ApiError(415) unless the body is said to be JSON (application/json or
    application/*+json, with any parameters). A web page may POST text/plain, a form, or bytes
    with no type at all (a Blob, an ArrayBuffer) to any address without asking first; a JSON
    type needs a CORS preflight, which this server never grants. The openai, anthropic and
    ollama clients all send application/json."""
    if hdrs.CONTENT_TYPE not in request.headers:
        raise ApiError(415, "the request body must be JSON sent with Content-Type: application/json; "
                            "the request has no Content-Type")
    if not _is_json(request.content_type):
        raise ApiError(415, f"the request body must be JSON sent with Content-Type: application/json, "
                            f"not {request.content_type}")


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The request's JSON body as bytes: its type checked (415), read up to its size limit (413
    beyond) within limits.body_timeout (408 after; aiohttp closes the connection then)."""
    check_json_type(request)
    limit = limits.max_body_bytes
    too_big = ApiError(413, f"the request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    data = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in request.content.iter_any():
                data += chunk
                if len(data) > limit:
                    raise too_big
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout:g} s") from None
    except (ConnectionError, web.RequestPayloadError) as error:  # the client went, or broke the chunked encoding
        raise ApiError(400, f"the request body broke off: {error}") from None
    return bytes(data)


def parse_json(data: bytes, limits: Limits) -> Any:
    """A body's JSON, its depth limit checked before it is decoded (400 beyond)."""
    try:
        # as json.loads decodes bytes: UTF-8 (BOM or not), UTF-16 or UTF-32
        text = data.decode(json.detect_encoding(data), "surrogatepass")
        if json_depth_exceeds(text, limits.max_json_depth):
            raise ApiError(400, f"the request body nests arrays and objects deeper than "
                                f"{limits.max_json_depth} levels")
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


async def read_request(request: web.Request, limits: Limits, parse: Callable[[Any], T]) -> T:
    """The request's body read (read_body), then decoded and checked by `parse` in the worker."""
    data = await read_body(request, limits)
    return await in_worker(lambda: parse(parse_json(data, limits)))


async def read_json(request: web.Request, limits: Limits) -> Any:
    """The request's JSON body (read_body, then parse_json in the worker)."""
    return await read_request(request, limits, lambda body: body)


def check_prompt_size(chars: int, context: int | None, limits: Limits, param: str) -> None:
    """Raises the too-long 400 for a prompt of more characters than `context` tokens could
    hold (limits.max_chars_per_token each), before it is tokenized."""
    if context is not None and chars > context * limits.max_chars_per_token:
        raise _bad(param, f"the prompt has {chars} characters, more than {context} tokens hold; the context is "
                          f"{context} tokens (--context)", CONTEXT_LENGTH_EXCEEDED)


def add_openai_routes(app: web.Application, backend: Backend, limits: Limits = Limits()) -> None:
    """Add the OpenAI endpoints. Call it before adding any catch-all route: aiohttp matches
    routes in the order they were added."""
    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tbmesh"}

    def check_model(model: str) -> None:
        check_served(backend, model)

    def tokenize(completion: CompletionRequest, context: int | None) -> tuple[TokenizerWrapper, list[int]]:
        tokenizer = backend.tokenizer(completion.model)  # the first call loads it
        return tokenizer, prompt_tokens(tokenizer, completion, context, limits)

    async def complete(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            completion = await read_request(request, limits, lambda body: parse_request(body, chat, limits))
            check_model(completion.model)
            context = backend.context(completion.model)
            tokenizer, prompt = await in_worker(tokenize, completion, context)
            completion.params = fit_context(completion, len(prompt), context)
        except ApiError as error:
            return error.response()
        except Exception as error:  # a backend that fails to say what it serves or to tokenize
            return _failure(error).response()
        return await Responder(request, backend, completion).answer(tokenizer, prompt)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, chat=False)

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_card(m) for m in backend.models()]})

    async def get_model(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in backend.models():
            return ApiError(404, f"the model {name!r} does not exist here", param="model",
                            code="model_not_found").response()  # fmt: skip
        return web.json_response(model_card(name))

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)


# --- the OpenAPI description -----------------------------------------------------------------

ERROR = "Error"


def error_responses(statuses: dict[int, str]) -> dict[str, Any]:
    """OpenAPI responses in the error format, by status code: what each status means here."""
    return {str(status): json_body(ref(ERROR), why) for status, why in statuses.items()}


def _event_stream(chunk: str) -> dict[str, Any]:
    """Server-sent events, each described on its own (as OpenAPI 3.2's itemSchema, which is
    `schema` for an event stream before 3.2): its data is a chunk, an error, or the end."""
    data = {"anyOf": [
        {"const": "[DONE]", "description": "the last event"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [ref(chunk), ref(ERROR)]}},
    ]}  # fmt: skip
    event = obj({"data": data}, required=["data"], description=(
        f"One event: `data: <{chunk}>` for each piece of the answer; `data: <{ERROR}>` when "
        "generation fails after the first event; `data: [DONE]` at the end."))  # fmt: skip
    return {"text/event-stream": {"schema": event}}


def _request_schemas(limits: Limits, model: Schema) -> dict[str, Schema]:
    """The request bodies as parse_request checks them (what it ignores is allowed)."""
    token_count = nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens,
                            "description": "with the prompt, at most the context (--context)"})
    common: dict[str, Schema] = {
        "model": model,
        "max_tokens": token_count,
        "max_completion_tokens": {**token_count, "description": "the newer name of max_tokens; wins over it"},
        "n": nullable({"type": "integer", "minimum": 1, "maximum": 1, "description": "only 1 is supported"}),
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "seed": nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "stop": nullable({"anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": limits.max_stop},
        ]}),  # fmt: skip
        "stream": nullable({"type": "boolean"}),
        "stream_options": nullable(obj({"include_usage": nullable({"type": "boolean"})})),
    }
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": ref("TextPart")}]}
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    one = {"minItems": 1, "maxItems": 1, "description": "a batch of one prompt"}
    ignored = "read if a string, else ignored"
    tool_call = obj({"id": {"description": "any; one is made if it is missing"},
                     "function": obj({"name": {"type": "string"}, "arguments": {
                         "description": "a string of JSON (code invalid_tool_arguments if it is not), or the "
                                        "arguments themselves"}}, required=["name"])},
                    required=["function"])  # fmt: skip
    unsupported = {name: {"enum": [None, 0, False, {}, []], "description": f"{why}: only a neutral value"}
                   for name, why in UNSUPPORTED.items()}  # fmt: skip
    chat = {
        **common,
        "messages": {"type": "array", "minItems": 1, "items": {"anyOf": [
            obj({"role": {"enum": [r for r in ROLES if r not in ("assistant", "tool")]}, "content": content},
                required=["role", "content"]),
            obj({"role": {"const": "assistant"}, "content": nullable(content),
                 "tool_calls": nullable({"type": "array", "items": tool_call}),
                 "reasoning_content": {"description": f"its think block: {ignored}"},
                 "reasoning": {"description": f"reasoning_content's other name: {ignored}"}},
                required=["role"]),
            obj({"role": {"const": "tool"}, "content": content,
                 "tool_call_id": {"description": f"the call it answers: {ignored}"},
                 "name": {"description": f"the function: {ignored}"}},
                required=["role", "content"]),
        ]}},
        "tools": nullable({"type": "array", "items": ref("Tool")}),
        "tool_choice": nullable({"anyOf": [
            {"enum": ["none", "auto", "required"], "description": "auto and required need tools (code "
                                                                   f"{CONFLICTING_FIELDS}); none forces no call"},
            obj({"type": {"const": "function"}, "function": obj({"name": {"type": "string"}}, required=["name"])},
                required=["type", "function"], description=f"a function of tools (code {CONFLICTING_FIELDS} if not)"),
        ]}),
        "logprobs": nullable({"type": "boolean"}),
        "top_logprobs": nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                                  "description": f"needs logprobs: true (code {CONFLICTING_FIELDS} if not)"}),
        **unsupported,
        "response_format": nullable(obj({"type": {"const": "text"}}, required=["type"], additionalProperties=False,
                                        description="only text (no JSON mode or schema)")),
        "modalities": nullable({"const": ["text"]}),
    }  # fmt: skip
    return {
        "ChatCompletionRequest": obj(chat, required=["model", "messages"]),
        "TextPart": obj({"type": {"const": "text"}, "text": {"type": "string"}}, required=["type", "text"]),
        "Tool": obj({"type": {"const": "function"}, "function": obj({
            "name": {"type": "string", "minLength": 1},
            "description": {"description": "for the chat template"},
            "parameters": {"type": "object", "description": "a JSON schema of the arguments"},
        }, required=["name"])}, required=["type", "function"]),  # fmt: skip
        "CompletionRequest": obj({**common, "prompt": {"anyOf": [
            {"type": "string"},
            {**token_ids, "description": "token ids"},
            {"type": "array", "items": {"type": "string"}, **one},
            {"type": "array", "items": token_ids, **one},
        ]}, "logprobs": {"type": "null", "description": "not supported here: use /v1/chat/completions"}},
            required=["model", "prompt"]),  # fmt: skip
    }


def _response_schemas() -> dict[str, Schema]:
    """The answers as Responder writes them."""
    count = {"type": "integer", "minimum": 0}
    usage = obj({"prompt_tokens": count, "completion_tokens": count, "total_tokens": count},
                required=["prompt_tokens", "completion_tokens", "total_tokens"])
    finish_reason = {"enum": ["stop", "length", "tool_calls"],
                     "description": "an end token or a stop string; max_tokens; the model called tools"}

    def envelope(kind: str, choice: Schema, chunk: bool) -> Schema:
        properties = {"id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
                      "model": {"type": "string"},
                      "choices": {"type": "array", "items": choice, "minItems": 0 if chunk else 1, "maxItems": 1},
                      "usage": nullable(ref("Usage")) if chunk else ref("Usage")}  # fmt: skip
        required = ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"])
        return obj(properties, required=required)

    def choice(content: dict[str, Schema], chunk: bool, logprobs: Schema) -> Schema:
        return obj({"index": {"const": 0}, **content, "logprobs": logprobs,
                    "finish_reason": nullable(finish_reason) if chunk else finish_reason},
                   required=["index", *content, "logprobs", "finish_reason"])  # fmt: skip

    text = {"type": "string"}
    token = {"token": text, "logprob": {"type": "number"}, "bytes": {"type": "array", "items": count}}
    logprobs = obj({"content": {"type": "array", "items": obj(
        {**token, "top_logprobs": {"type": "array", "items": obj(token, required=list(token))}},
        required=[*token, "top_logprobs"])}, "refusal": {"type": "null"}}, required=["content", "refusal"])
    function = obj({"name": text, "arguments": {**text, "description": "JSON"}}, required=["name", "arguments"])
    call = {"id": text, "type": {"const": "function"}, "function": function}
    message = obj({"role": {"const": "assistant"}, "content": nullable(text), "reasoning_content": text,
                   "tool_calls": {"type": "array", "items": obj(call, required=list(call)), "minItems": 1}},
                  required=["role", "content"])  # fmt: skip
    delta = obj({"role": {"const": "assistant"}, "content": text, "reasoning_content": text,
                 "tool_calls": {"type": "array", "minItems": 1, "maxItems": 1, "items": obj(
                     {"index": count, **call}, required=["index", *call])}})  # fmt: skip
    return {
        "Usage": usage,
        "Logprobs": logprobs,
        "ChatCompletion": envelope("chat.completion", choice({"message": message}, False, nullable(ref("Logprobs"))),
                                   False),
        "ChatCompletionChunk": envelope("chat.completion.chunk",
                                        choice({"delta": delta}, True, nullable(ref("Logprobs"))), True),
        "Completion": envelope("text_completion", choice({"text": text}, False, {"type": "null"}), False),
        "CompletionChunk": envelope("text_completion", choice({"text": text}, True, {"type": "null"}), True),
        "Model": obj({"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                      "owned_by": {"type": "string"}}, required=["id", "object", "created", "owned_by"]),  # fmt: skip
        "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
                         required=["object", "data"]),
        ERROR: obj({"error": obj({
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": nullable({"type": "string"}), "code": nullable({"type": "string"}),
        }, required=["message", "type", "param", "code"], additionalProperties=False)},
            required=["error"], additionalProperties=False),  # fmt: skip
    }


def openapi_description(backend: Backend, limits: Limits = Limits()) -> ApiDescription:
    """What add_openai_routes serves, for the OpenAPI document of this node (which names the
    models it serves)."""
    served = backend.models()
    model: Schema = {"type": "string", "description": "a model of GET /v1/models; another is a 404"}
    if served:
        model["enum"] = served

    def completion(summary: str, request: str, answer: str, chunk: str) -> dict[str, Any]:
        ok = {"description": "the answer; server-sent events with stream: true",
              "content": {"application/json": {"schema": ref(answer)}, **_event_stream(chunk)}}  # fmt: skip
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, **json_body(ref(request), "the request (unknown fields are ignored)")},
            "responses": {"200": ok, **error_responses({
                400: "a field is wrong (`param` names it) or the body is not JSON; or what depends on "
                     f"the model: code {CONTEXT_LENGTH_EXCEEDED} (the prompt and max_tokens do not fit "
                     f"the context), {TOKEN_NOT_IN_VOCABULARY}, {EMPTY_PROMPT} (a text of no token), "
                     f"{CHAT_TEMPLATE_ERROR} (the model has no chat template, or it refused the messages); "
                     f"or what the schema cannot say: code {INVALID_TOOL_ARGUMENTS} (arguments that are a "
                     f"string but not JSON), {CONFLICTING_FIELDS} (tool_choice without its tools, "
                     "top_logprobs without logprobs)",
                404: "no such model here (code model_not_found)",
                413: f"the body is larger than {limits.max_body_bytes} bytes",
                500: "generation failed (type server_error)",
                503: "the model cannot serve now: no plan yet, it does not fit, a node went away "
                     "(type service_unavailable)",
            })},
        }}  # fmt: skip

    paths = {
        "/v1/chat/completions": completion("A chat completion", "ChatCompletionRequest", "ChatCompletion",
                                           "ChatCompletionChunk"),
        "/v1/completions": completion("A text completion", "CompletionRequest", "Completion", "CompletionChunk"),
        "/v1/models": {"get": {"summary": "The models served",
                               "responses": {"200": json_body(ref("ModelList"), "the models")}}},
        "/v1/models/{model}": {"get": {
            "summary": "One model",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": model}],
            "responses": {"200": json_body(ref("Model"), "the model"),
                          **error_responses({404: "no such model here (code model_not_found)"})},
        }},
    }  # fmt: skip
    return ApiDescription(paths, {**_request_schemas(limits, model), **_response_schemas()})
