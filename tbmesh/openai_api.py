"""OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions and /v1/models.

The HTTP layer (request checking, chat templates, streaming detokenization, stop strings,
server-sent events, client disconnects) is the same whatever generates the tokens: a
`tbmesh.generation.Backend` yields token ids, either the cluster's serving engine or
`tbmesh.runtime.local.LocalBackend`, the whole model in one process. This module alone maps
the backends' errors to HTTP status codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tbmesh.generation import Backend, BadRequest, GenerationParams, Unavailable
from tbmesh.openapi import ApiDescription, Schema, json_body, nullable, obj, ref

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


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
    max_body_bytes: int = 8 * 2**20
    max_json_depth: int = 64  # nested arrays and objects; a request needs 4, a tool schema a dozen
    max_tokens: int = 32768  # the most a request may ask for
    default_max_tokens: int = 2048  # when the request does not say
    max_stop: int = 16  # stop strings per request (OpenAI allows 4; some clients send more)


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
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
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


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
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
        result.append({"role": "system" if role == "developer" else role, "content": _content(message, where)})
    return result


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
        request.messages = _messages(body)
    else:
        request.prompt = _prompt(body)
    return request


def prompt_tokens(tokenizer: TokenizerWrapper, request: CompletionRequest) -> list[int]:
    """The prompt as token ids: chat messages through the model's chat template."""
    if request.chat:
        if not tokenizer.has_chat_template:
            raise ApiError(400, f"the model {request.model} has no chat template: use /v1/completions",
                           param="messages", code=CHAT_TEMPLATE_ERROR)
        try:
            tokens = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
        except Exception as error:  # jinja's own errors, and the templates' raise_exception()
            raise ApiError(400, f"the chat template refused the messages: {error}", param="messages",
                           code=CHAT_TEMPLATE_ERROR) from None
        return list(tokens)
    if isinstance(request.prompt, str):
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


def fit_context(request: CompletionRequest, prompt: int, context: int | None) -> GenerationParams:
    """The parameters with max_tokens within the backend's context (the KV room of a stage):
    a default cut to what is left, a prompt and max_tokens that can never fit a 400."""
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
        raise _bad("max_tokens", f"the prompt ({prompt} tokens) and max_tokens ({params.max_tokens}) need "
                                 f"{prompt + params.max_tokens} tokens; the context is {context} tokens "
                                 f"(--context): lower max_tokens to at most {context - prompt}",
                   CONTEXT_LENGTH_EXCEEDED)
    return params


# --- from tokens to text ---------------------------------------------------------------------


class StopText:
    """Cuts streamed text at the first stop string, holding back any text that might be the
    start of one, so that no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop string was met."""
        if not self.stops:
            return text, False
        text = self.pending + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.pending = ""
            return text[: min(found)], True
        held = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self.pending = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class ClientGone(Exception):
    """The client closed its connection: stop generating for it."""


DISCONNECT_POLL = 0.1  # s: how often a wait for the next token checks that the client is still there


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _next_token(request: web.Request, tokens: AsyncIterator[int]) -> int | None:
    """The backend's next token (None at the end); raises ClientGone when the client leaves.

    aiohttp does not cancel a handler when its client disconnects (unless the server was made
    with handler_cancellation), so a long wait watches the connection itself.
    """

    async def step() -> int | None:
        try:
            return await anext(tokens)
        except StopAsyncIteration:
            return None

    task = asyncio.ensure_future(step())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done or _client_gone(request):
                break
        if _client_gone(request):
            raise ClientGone()
    except BaseException:
        if not task.done():
            task.cancel()  # cancels the backend's generation where it waits
            await asyncio.wait({task})  # the iterator must stop running before it can be closed
        raise
    return task.result()


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # or "length" when max_tokens ended the answer

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip


async def generate_text(request: web.Request, backend: Backend, tokenizer: TokenizerWrapper,
                        completion: CompletionRequest, prompt: list[int], outcome: Outcome) -> AsyncIterator[str]:  # fmt: skip
    """The answer's text, piece by piece as it is decoded; fills in `outcome`.

    The backend's iterator is closed whatever ends this: the end of the answer, a stop string,
    an error, the client leaving, or the caller closing this generator.
    """
    params = completion.params
    detokenizer = tokenizer.detokenizer  # mlx-lm's streaming detokenizer: whole characters only
    stop = StopText(completion.stop)
    eos = tokenizer.eos_token_ids
    tokens = backend.generate(completion.model, prompt, params)
    try:
        while outcome.completion_tokens < params.max_tokens:
            token = await _next_token(request, tokens)
            if token is None or token in eos:  # EOS (the backend should not yield it, but may)
                break
            outcome.completion_tokens += 1
            detokenizer.add_token(token)
            text, stopped = stop.feed(detokenizer.last_segment)
            if text:
                yield text
            if stopped:
                return
        else:
            outcome.finish_reason = "length"
        detokenizer.finalize()
        text, stopped = stop.feed(detokenizer.last_segment)
        if stopped:
            outcome.finish_reason = "stop"
        else:
            text += stop.flush()
        if text:
            yield text
    finally:
        await tokens.aclose()


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


class Responder:
    """Answers one completion request, streamed or not, in OpenAI's shapes."""

    def __init__(self, request: web.Request, backend: Backend, completion: CompletionRequest) -> None:
        self.request = request
        self.backend = backend
        self.completion = completion
        self.id = f"{'chatcmpl' if completion.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, chunk: bool) -> str:
        if not self.completion.chat:
            return "text_completion"  # both streamed and not
        return "chat.completion.chunk" if chunk else "chat.completion"

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self._object(chunk), "created": self.created,
                "model": self.completion.model, "choices": choices}  # fmt: skip

    def _choice(self, text: str, finish_reason: str | None, chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.completion.chat:
            choice["text"] = text
        elif chunk:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        return choice

    async def answer(self, tokenizer: TokenizerWrapper, prompt: list[int]) -> web.StreamResponse:
        outcome = Outcome(prompt_tokens=len(prompt))
        pieces = generate_text(self.request, self.backend, tokenizer, self.completion, prompt, outcome)
        if self.completion.stream:
            return await self._stream(pieces, outcome)
        try:
            async with aclosing(pieces):
                text = "".join([piece async for piece in pieces])
        except ClientGone:
            return web.Response(status=499)  # nobody reads it: nginx's "client closed request"
        except Exception as error:
            return _failure(error).response()
        body = self._envelope(False, [self._choice(text, outcome.finish_reason, chunk=False)])
        body["usage"] = outcome.usage()
        return web.json_response(body)

    async def _stream(self, pieces: AsyncIterator[str], outcome: Outcome) -> web.StreamResponse:
        """Server-sent events. The response starts with the first piece of text, so that an error
        before any (no plan any more, a failed prefill) is still an HTTP error status."""
        response: web.StreamResponse | None = None
        usage: dict[str, Any] = {"usage": None} if self.completion.include_usage else {}

        async def send(event: dict[str, Any] | str) -> None:
            nonlocal response
            try:
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
                    await response.prepare(self.request)
                    if self.completion.chat:  # OpenAI's first chunk gives the role
                        first = self._envelope(True, [self._choice("", None, chunk=True)])
                        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                        await response.write(_event({**first, **usage}))
                await response.write(_event(event))
            except ConnectionError:  # aiohttp's ClientConnectionResetError: the client went away
                raise ClientGone() from None

        try:
            async with aclosing(pieces):
                async for text in pieces:
                    await send({**self._envelope(True, [self._choice(text, None, chunk=True)]), **usage})
            await send({**self._envelope(True, [self._choice("", outcome.finish_reason, chunk=True)]), **usage})
            if self.completion.include_usage:
                await send({**self._envelope(True, []), "usage": outcome.usage()})
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


async def read_json(request: web.Request, limits: Limits) -> Any:
    """The request's JSON body, read up to its size limit (413 beyond) and its depth limit
    checked before it is decoded (400 beyond)."""
    limit = limits.max_body_bytes
    too_big = ApiError(413, f"the request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise too_big
    try:
        # as json.loads decodes bytes: UTF-8 (BOM or not), UTF-16 or UTF-32
        text = data.decode(json.detect_encoding(data), "surrogatepass")
        if json_depth_exceeds(text, limits.max_json_depth):
            raise ApiError(400, f"the request body nests arrays and objects deeper than "
                                f"{limits.max_json_depth} levels")
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


def add_openai_routes(app: web.Application, backend: Backend, limits: Limits = Limits()) -> None:
    """Add the OpenAI endpoints. Call it before adding any catch-all route: aiohttp matches
    routes in the order they were added."""
    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tbmesh"}

    def check_model(model: str) -> None:
        served = backend.models()
        if model not in served:
            raise ApiError(404, f"the model {model!r} does not exist here; this node serves: "
                                f"{', '.join(served) or 'no model'}", param="model", code="model_not_found")  # fmt: skip
        reason = backend.unavailable(model)
        if reason is not None:
            raise _failure(reason)

    async def complete(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            completion = parse_request(await read_json(request, limits), chat, limits)
            check_model(completion.model)
            tokenizer = backend.tokenizer(completion.model)
            prompt = prompt_tokens(tokenizer, completion)
            completion.params = fit_context(completion, len(prompt), backend.context(completion.model))
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
    return {
        "ChatCompletionRequest": obj({**common, "messages": {
            "type": "array", "minItems": 1, "items": {"anyOf": [
                obj({"role": {"enum": [r for r in ROLES if r != "assistant"]}, "content": content},
                    required=["role", "content"]),
                obj({"role": {"const": "assistant"}, "content": nullable(content)}, required=["role"]),
            ]}}}, required=["model", "messages"]),  # fmt: skip
        "TextPart": obj({"type": {"const": "text"}, "text": {"type": "string"}}, required=["type", "text"]),
        "CompletionRequest": obj({**common, "prompt": {"anyOf": [
            {"type": "string"},
            {**token_ids, "description": "token ids"},
            {"type": "array", "items": {"type": "string"}, **one},
            {"type": "array", "items": token_ids, **one},
        ]}}, required=["model", "prompt"]),  # fmt: skip
    }


def _response_schemas() -> dict[str, Schema]:
    """The answers as Responder writes them."""
    count = {"type": "integer", "minimum": 0}
    usage = obj({"prompt_tokens": count, "completion_tokens": count, "total_tokens": count},
                required=["prompt_tokens", "completion_tokens", "total_tokens"])
    finish_reason = {"enum": ["stop", "length"], "description": "an end token or a stop string; max_tokens"}

    def envelope(kind: str, choice: Schema, chunk: bool) -> Schema:
        properties = {"id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
                      "model": {"type": "string"},
                      "choices": {"type": "array", "items": choice, "minItems": 0 if chunk else 1, "maxItems": 1},
                      "usage": nullable(ref("Usage")) if chunk else ref("Usage")}  # fmt: skip
        required = ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"])
        return obj(properties, required=required)

    def choice(content: dict[str, Schema], chunk: bool) -> Schema:
        return obj({"index": {"const": 0}, **content, "logprobs": {"type": "null"},
                    "finish_reason": nullable(finish_reason) if chunk else finish_reason},
                   required=["index", *content, "logprobs", "finish_reason"])  # fmt: skip

    text = {"type": "string"}
    message = obj({"role": {"const": "assistant"}, "content": text}, required=["role", "content"])
    delta = obj({"role": {"const": "assistant"}, "content": text})
    return {
        "Usage": usage,
        "ChatCompletion": envelope("chat.completion", choice({"message": message}, False), False),
        "ChatCompletionChunk": envelope("chat.completion.chunk", choice({"delta": delta}, True), True),
        "Completion": envelope("text_completion", choice({"text": text}, False), False),
        "CompletionChunk": envelope("text_completion", choice({"text": text}, True), True),
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
                     f"{CHAT_TEMPLATE_ERROR} (the model has no chat template, or it refused the messages)",
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
