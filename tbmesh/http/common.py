"""What every HTTP dialect (OpenAI's, Anthropic's, Ollama's) shares: the request's way in and the
answer's way out. A dialect module is left with its own wire format: how its requests read
(parsing them into a `Generation`) and how its answers and errors look (an `AnswerShape`).

In: `read_request` (the body's type, size, time and depth checked, then decoded and parsed in
the API's worker thread, off the event loop), the field checks every parser uses (`integer`,
`number`, `boolean`, `stop_strings`, `valid_unicode`, ...), `check_served`, `check_prompt_size`
and `fit_context` (max_tokens within the backend's context).

Out: `respond` answers a generation, whole or streamed, the same way in every dialect: a stream
starts with its first write, so that an error before it is still an HTTP error status (in the
dialect's shape), and one after it is an error event; a client that goes away ends the
generation everywhere and is answered 499 (nginx's "client closed request": nobody reads it).

The backends' errors (tbmesh.core.generation) become statuses here alone (`failure`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from aiohttp import hdrs, web

from tbmesh.core.generation import Backend, BadRequest, Sampling, Unavailable
from tbmesh.http.chat import ChatReader, ClientGone, Event, TemplateError, chat_prompt, generate

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    """An error a client is answered, in no dialect's shape yet: each dialect's
    `error_response` writes it in its own (OpenAI's puts `type`, `param` and `code` in its body,
    the others `code` in the X-Tbmesh-Error-Code header)."""

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


def bad_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    """A 400 naming the field at fault (`param`)."""
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What a request, and the API's server, may take: the one home of these defaults (the
    README lists them; tbmesh.http.server.Listener applies those of the connections)."""

    max_body_bytes: int = 8 * 2**20
    max_json_depth: int = 64  # nested arrays and objects; a request needs 4, a tool schema a dozen
    max_tokens: int = 32768  # the most a request may ask for
    # the most an answer takes when its request does not say (OpenAI's max_tokens, Ollama's
    # num_predict -1), cut to what the context leaves: a thinking model's think block alone
    # may take thousands of tokens, and OpenAI's API lets such an answer run to the context's end
    default_max_tokens: int = max_tokens
    max_stop: int = 16  # stop strings per request (OpenAI allows 4; some clients send more)
    # conversations the server keeps for Anthropic's `thread` continuations, by their last answer's
    # id, the least recently used dropped first (a continuation of a dropped one is told so, and
    # the SDK then sends the whole conversation again)
    stored_threads: int = 64
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
UNSUPPORTED_PREFILL = "unsupported_prefill"  # a last assistant message to continue (Anthropic's, Ollama's)
# the Responses API's ids and blobs this server made: one it did not make (or no longer keeps) is refused
PREVIOUS_RESPONSE_NOT_FOUND = "previous_response_not_found"  # OpenAI's code for it
INVALID_ENCRYPTED_CONTENT = "invalid_encrypted_content"  # a reasoning item's blob changed, or not made here
UNDESCRIBABLE_CODES = (INVALID_TOOL_ARGUMENTS, CONFLICTING_FIELDS, UNSUPPORTED_PREFILL, PREVIOUS_RESPONSE_NOT_FOUND,
                       INVALID_ENCRYPTED_CONTENT)  # fmt: skip
# where the dialects whose errors have no field for it (Anthropic's, Ollama's) put that code
CODE_HEADER = "X-Tbmesh-Error-Code"


# --- what a request comes to, whatever its dialect -------------------------------------------


@dataclass(frozen=True)
class Generation:
    """What a dialect's request asks of the backend: its answer's ceiling, how it samples (the
    one type carried from here to the sampler) and the strings that end it."""

    model: str  # the backend's name of the model
    max_tokens: int  # as asked, or limits.default_max_tokens
    sampling: Sampling
    stop: list[str]
    # the client named max_tokens and wants it whole: a prompt and max_tokens that cannot fit the
    # context are refused; else max_tokens is a ceiling, cut to what the context leaves
    max_tokens_strict: bool


class ContextTooLong(ApiError):
    """The 400 of a prompt (with a strict max_tokens) that cannot fit the context, with its
    numbers: each dialect words it as its API does (clients match those words: litellm maps
    OpenAI's to ContextWindowExceededError, Claude Code compacts on Anthropic's). The message
    here is tbmesh's own, for what has no wording of its own."""

    def __init__(self, prompt_param: str, prompt_tokens: int, context: int, max_tokens: int | None = None,
                 max_tokens_param: str = "max_tokens", counted: bool = True) -> None:  # fmt: skip
        param = prompt_param if max_tokens is None else max_tokens_param
        if not counted:
            message = f"the prompt has at least {prompt_tokens} tokens; the context is {context} tokens (--context)"
        elif max_tokens is None:
            message = f"the prompt has {prompt_tokens} tokens; the context is {context} tokens (--context)"
        else:
            message = (f"the prompt ({prompt_tokens} tokens) and {param} ({max_tokens}) need "
                       f"{prompt_tokens + max_tokens} tokens; the context is {context} tokens (--context): "
                       f"lower {param} to at most {context - prompt_tokens}")  # fmt: skip
        super().__init__(400, message, param=param, code=CONTEXT_LENGTH_EXCEEDED)
        self.prompt_param = prompt_param  # what the dialect calls the prompt: messages, prompt
        self.prompt_tokens = prompt_tokens  # a lower bound when not counted (told from the characters)
        self.context = context
        self.max_tokens = max_tokens  # the strict max_tokens that does not fit, or None: the prompt alone
        self.counted = counted


def fit_context(generation: Generation, prompt: int, context: int | None, prompt_param: str,
                max_tokens_param: str = "max_tokens") -> Generation:  # fmt: skip
    """`generation` with max_tokens within the backend's context (the KV room of a stage): a
    ceiling cut to what is left, a strict max_tokens that can never fit a 400 (naming the fields
    as the dialect does)."""
    if context is None:
        return generation
    if prompt >= context:
        raise ContextTooLong(prompt_param, prompt, context)
    if not generation.max_tokens_strict:
        return replace(generation, max_tokens=min(generation.max_tokens, context - prompt))
    if prompt + generation.max_tokens > context:
        raise ContextTooLong(prompt_param, prompt, context, generation.max_tokens, max_tokens_param)
    return generation


def request_sampling(temperature: float, top_p: float, seed: int | None = None, logprobs: int | None = None,
                     grammar: str | None = None) -> Sampling:  # fmt: skip
    """The Sampling of checked request fields. A top_p of 0 leaves only the likeliest token:
    greedy. Seeds come signed (OpenAI's, Ollama's); the samplers' keys are not."""
    if top_p == 0:
        temperature, top_p = 0.0, 1.0
    return Sampling(temperature, top_p, None if seed is None else seed % 2**64, logprobs, grammar)


# --- the checks of request fields ------------------------------------------------------------


def type_name(value: Any) -> str:
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


def as_integer(value: Any) -> int | None:
    """`value` as an integer, or None if it is none. JSON has one kind of number: 5.0 is the
    integer 5 (as JSON Schema, and so the OpenAPI document, says), though json.loads makes it
    a float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    whole = as_integer(value)
    if whole is None:
        raise bad_request(name, f"'{name}' must be an integer, not {type_name(value)}")
    if whole < low or (high is not None and whole > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise bad_request(name, f"'{name}' must be {bounds}, not {value}")
    return whole


def number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(name, f"'{name}' must be a number, not {type_name(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise bad_request(name, f"'{name}' must be {low:g} to {high:g}, not {value}")
    return float(value)


def boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(name, f"'{name}' must be a boolean, not {type_name(value)}")
    return value


def stop_strings(body: dict[str, Any], limits: Limits, name: str = "stop", one: bool = True) -> list[str]:
    """The stop strings of field `name`: an array of strings, or (`one`) a string alone."""
    value = body.get(name)
    if value is None:
        return []
    strings = [value] if one and isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise bad_request(name, f"'{name}' must be {'a string or ' if one else ''}an array of strings")
    if len(strings) > limits.max_stop:
        raise bad_request(name, f"'{name}' may hold at most {limits.max_stop} strings, not {len(strings)}")
    return [s for s in strings if s]  # an empty stop string would end every answer at once


def valid_unicode(text: str, where: str, param: str | None) -> str:
    """`text`, if it can be encoded: JSON's \\ud800 escapes decode to lone surrogates, which
    no tokenizer takes (UTF-8 has no encoding for them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise bad_request(param, f"'{where}' is not valid Unicode: it holds a lone surrogate "
                                 f"(U+{ord(text[error.start]):04X}) at character {error.start}") from None  # fmt: skip
    return text


def function_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tools of a request in OpenAI's shape, which Ollama's API shares (and chat templates
    read): {"type": "function", "function": {"name", "description", "parameters"}}."""
    offered = body.get("tools")
    if offered is None:
        return None
    if not isinstance(offered, list):
        raise bad_request("tools", f"'tools' must be an array of tools, not {type_name(offered)}")
    for i, tool in enumerate(offered):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request("tools", f"'tools[{i}]' must be a function tool: "
                                       '{"type": "function", "function": {...}}')  # fmt: skip
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request("tools", f"'tools[{i}].function' must be an object with a name")
        if not isinstance(function.get("parameters", {}), dict):
            raise bad_request("tools", f"'tools[{i}].function.parameters' must be a JSON schema object")
    return offered or None


def check_prompt_size(chars: int, context: int | None, limits: Limits, param: str) -> None:
    """Raises the too-long 400 for a prompt of more characters than `context` tokens could
    hold (limits.max_chars_per_token each), before it is tokenized: it has at least
    chars / max_chars_per_token tokens."""
    if context is not None and chars > context * limits.max_chars_per_token:
        raise ContextTooLong(param, -(-chars // limits.max_chars_per_token), context, counted=False)


# --- the backend's errors --------------------------------------------------------------------


def failure(error: Exception) -> ApiError:
    """An error of the backend (or of the request's checks) as the client sees it."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Unavailable):
        return ApiError(503, str(error), "service_unavailable")
    if isinstance(error, BadRequest):
        return ApiError(400, str(error), param=error.param)
    log.error("generation failed", exc_info=error)
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")


LATEST = ":latest"  # the tag Ollama gives a model named without one


def tagged(name: str) -> str:
    """The model's name as Ollama lists it: name:tag, the tag "latest" when it has none."""
    return name if ":" in name else name + LATEST


@dataclass(frozen=True)
class ModelNames:
    """Which served model a request's name means: the model's own name, the name with Ollama's
    ":latest" tag (real Ollama takes both), or else the first alias whose pattern (fnmatch's, as
    `tbmesh daemon --model-alias PATTERN=NAME` gives them) the name matches, so that clients
    that send their own model names (Claude Code's claude-*) reach a served one."""

    aliases: tuple[tuple[str, str], ...] = ()  # (pattern, name), in the order given

    @classmethod
    def parse(cls, specs: Iterable[str]) -> ModelNames:
        """From "PATTERN=NAME" strings; raises ValueError naming a bad one."""
        aliases = []
        for spec in specs:
            pattern, equals, name = spec.partition("=")
            if not equals or not pattern.strip() or not name.strip():
                raise ValueError(f"bad model alias {spec!r}: give PATTERN=NAME, e.g. 'claude-*=my-model'")
            aliases.append((pattern.strip(), name.strip()))
        return cls(tuple(aliases))

    def resolve(self, name: str, served: Sequence[str]) -> str | None:
        """The served model `name` means, or None."""
        for model in served:
            if name in (model, tagged(model)):
                return model
        for pattern, alias in self.aliases:
            if fnmatch.fnmatchcase(name, pattern):
                return next((model for model in served if alias in (model, tagged(model))), None)
        return None

    def accepted(self, served: Sequence[str]) -> list[str] | None:
        """The names a request may give (for an OpenAPI enum), None when aliases take patterns."""
        if self.aliases:
            return None
        return list(dict.fromkeys(name for model in served for name in (model, tagged(model))))


def model_schema(served: Sequence[str], names: ModelNames, listed_by: str = "GET /v1/models") -> dict[str, Any]:
    """The JSON schema of a request's `model` (for the OpenAPI document): the names it may take."""
    schema: dict[str, Any] = {"type": "string", "description": f"a model of {listed_by}, or it with the tag "
                                                              f"{LATEST}; another is a 404"}  # fmt: skip
    accepted = names.accepted(served)
    if accepted is None:
        schema["description"] += " unless an alias (--model-alias) maps it to one"
    elif accepted:
        schema["enum"] = accepted
    return schema


def check_served(backend: Backend, model: str, names: ModelNames = ModelNames()) -> str:
    """The backend's name of the model a request names (ModelNames). Raises ApiError: 404 for a
    model this node does not serve, 503 for one that cannot serve now."""
    served = backend.models()
    found = names.resolve(model, served)
    if found is None:
        raise ApiError(404, f"the model {model!r} does not exist here; this node serves: "
                            f"{', '.join(served) or 'no model'}", param="model", code="model_not_found")  # fmt: skip
    reason = backend.unavailable(found)
    if reason is not None:
        raise failure(reason)
    return found


# --- reading requests ------------------------------------------------------------------------


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


# --- answering -------------------------------------------------------------------------------


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def chat_tokens(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, param: str,
                thinking: bool | None = None) -> list[int]:  # fmt: skip
    """The messages (and tools) through the model's chat template (tbmesh.http.chat.chat_prompt);
    a template that refuses them is a 400 naming `param`. CPU-heavy: in_worker."""
    try:
        return chat_prompt(tokenizer, messages, tools, thinking)
    except TemplateError as error:
        raise bad_request(param, str(error), CHAT_TEMPLATE_ERROR) from None


def answer_events(request: web.Request, backend: Backend, generation: Generation, prompt: list[int],
                  reader: ChatReader) -> AsyncIterator[Event]:  # fmt: skip
    """The answer's events (tbmesh.http.chat.generate), ended when the client of `request` goes away."""
    return generate(backend, generation.model, prompt, generation.max_tokens, generation.sampling, reader,
                    lambda: client_gone(request))  # fmt: skip


class AnswerShape(Protocol):
    """How one dialect writes one answer; `respond` does the HTTP. An object per request: it
    may keep what it has written (the open content block, the log-probabilities not sent yet)."""

    media_type: str  # of a streamed answer

    def whole(self, events: list[Event]) -> dict[str, Any]:
        """The JSON body of the answer not streamed, from all its events."""

    def opening(self) -> bytes:
        """What a stream starts with, before its first event's bytes (b"" for nothing)."""

    def event(self, event: Event) -> bytes:
        """The bytes of one event of a stream (b"" for nothing yet: no stream starts with it)."""

    def closing(self) -> bytes:
        """The end of a stream, after its last event."""

    def error_event(self, error: ApiError) -> bytes:
        """An error after the status went out: what ends the stream."""

    def error_response(self, error: ApiError) -> web.Response:
        """An error before the status went out."""


async def respond(request: web.Request, events: AsyncIterator[Event], shape: AnswerShape,
                  stream: bool) -> web.StreamResponse:  # fmt: skip
    """Answer `request` with the generation's `events` in `shape`, streamed or whole. The events'
    generator is closed whatever ends it (the answer's end, an error, the client leaving)."""
    if stream:
        return await _stream(request, events, shape)
    collected = []
    try:
        async with aclosing(events):
            async for event in events:
                collected.append(event)
    except ClientGone:
        return web.Response(status=499)  # nobody reads it: nginx's "client closed request"
    except Exception as error:
        return shape.error_response(failure(error))
    return web.json_response(shape.whole(collected))


async def _stream(request: web.Request, events: AsyncIterator[Event], shape: AnswerShape) -> web.StreamResponse:
    """The response starts with the first bytes to send, so that an error before any (no plan
    any more, a failed prefill) is still an HTTP error status."""
    response: web.StreamResponse | None = None

    async def send(data: bytes) -> None:
        nonlocal response
        if not data:
            return
        try:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": shape.media_type, "Cache-Control": "no-cache",
                                                       "X-Accel-Buffering": "no"})  # fmt: skip
                await response.prepare(request)
                data = shape.opening() + data
            await response.write(data)
        except ConnectionError:  # aiohttp's ClientConnectionResetError: the client went away
            raise ClientGone() from None

    try:
        async with aclosing(events):
            async for event in events:
                await send(shape.event(event))
        await send(shape.closing())
    except ClientGone:
        return response or web.Response(status=499)
    except Exception as error:
        failed = failure(error)
        if response is None:
            return shape.error_response(failed)
        try:  # the status has gone out already: an error event ends the stream
            await send(shape.error_event(failed))
        except ClientGone:
            pass
    return response  # type: ignore[return-value]  # set by send()
