"""Ollama-compatible HTTP API: /api/chat, /api/generate, /api/tags, /api/show, /api/ps,
/api/version and `GET /` (Ollama's "is it running").

What Ollama clients (the `ollama` libraries, Open WebUI, editors' plugins) call to list the
cluster's model and chat with it, tools and thinking included. The work is tbmesh.http.chat's
(messages and tools through the chat template; tokens to text, thinking and tool calls) and
tbmesh.http.common's (request bodies read with their limits, the field checks, the answer
whole or streamed, disconnects). Only the shapes are Ollama's (`OllamaAnswer`): options by
Ollama's names, answers streamed as NDJSON by default, tool-call arguments as objects,
durations in nanoseconds, errors as {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tbmesh.core.generation import Backend, BadRequest
from tbmesh.http.chat import (
    ChatReader,
    Event,
    Reasoning,
    Text,
    ToolCall,
    text_size,
)
from tbmesh.http.common import (
    CHAT_TEMPLATE_ERROR,
    CODE_HEADER,
    CONTEXT_LENGTH_EXCEEDED,
    EMPTY_PROMPT,
    UNSUPPORTED_PREFILL,
    ApiError,
    ContextTooLong,
    Generation,
    Limits,
    ModelNames,
    answer_events,
    bad_request,
    boolean,
    chat_tokens,
    check_prompt_size,
    failure,
    fit_context,
    function_tools,
    in_worker,
    integer,
    model_schema,
    number,
    read_json,
    read_request,
    request_sampling,
    respond,
    stop_strings,
    tagged,
    type_name,
    valid_unicode,
)
from tbmesh.http.openapi import ApiDescription, Schema, json_body, nullable, obj, ref
from tbmesh.runtime.grammar import json_grammar

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

# the Ollama release whose API this follows (clients check it for features): 0.13.4 serves OpenAI's
# Responses API (/v1/responses, also on the Ollama port here), which Codex's --oss mode needs
OLLAMA_VERSION = "0.13.4"
DEFAULT_TEMPERATURE = 0.8  # Ollama's defaults, when a request's options do not say
DEFAULT_TOP_P = 0.9
NDJSON = "application/x-ndjson"
ROLES = ("system", "user", "assistant", "tool")
NEVER = "9999-12-31T23:59:59Z"  # /api/ps's expires_at: the cluster keeps its model loaded


def owns(path: str) -> bool:
    """Whether a path is this API's (its errors then in Ollama's shape), routed or not."""
    return path == "/api" or path.startswith("/api/")


def error_response(error: ApiError) -> web.Response:
    """An error in Ollama's shape: {"error": "..."}; OpenAI's `code` in the header CODE_HEADER."""
    headers = dict(error.headers or {})
    if error.code is not None:
        headers[CODE_HEADER] = error.code
    return web.json_response({"error": _message(error)}, status=error.status, headers=headers)


def _message(error: ApiError) -> str:
    """The error's message; the too-long one in Ollama's words (as it refuses an input longer
    than the context with truncate false), its numbers after them."""
    if not isinstance(error, ContextTooLong):
        return error.message
    if error.max_tokens is None:
        tokens = f"{error.prompt_tokens}" if error.counted else f"at least {error.prompt_tokens}"
        return f"the input length exceeds the context length ({tokens} tokens; the context is {error.context})"
    return (f"the input length and num_predict exceed the context length ({error.prompt_tokens} + "
            f"{error.max_tokens} tokens; the context is {error.context}): lower num_predict to at most "
            f"{error.context - error.prompt_tokens}")  # fmt: skip


def _timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama's created_at and modified_at."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


# --- what the model is --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def model_facts(model_dir: Path | None) -> dict[str, Any]:
    """What /api/tags, /api/show and /api/ps say about a model directory, read once (config.json
    and the safetensors headers: a few kilobytes per file). Empty when it cannot be read: the
    listing is informational, and the errors are the serving's to report."""
    from tbmesh.core.modelspec import ModelFormatError
    from tbmesh.weights.modeldir import read_config, read_header, weight_files

    if model_dir is None:
        return {}
    try:
        config = read_config(model_dir)
        files = weight_files(model_dir)
        tensors = {name: entry for file in files for name, entry in read_header(file).items()}
        sizes = {file.name: file.stat().st_size for file in files}
        modified = max([(model_dir / "config.json").stat().st_mtime] + [f.stat().st_mtime for f in files])
    except (ModelFormatError, OSError):
        return {}
    text = {**config, **config.get("text_config", {})}  # multimodal configs nest the language model's
    quantization = config.get("quantization") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    parameters = 0
    for name, (dtype, shape) in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue  # a quantized matrix's scales and biases are not parameters
        count = 1
        for size in shape:
            count *= size
        parameters += count * 32 // bits if bits and dtype == "U32" else count  # packed 32 / bits per word
    dtypes = [dtype for dtype, _ in tensors.values()]
    family = str(text.get("model_type", "unknown"))
    digest = hashlib.sha256(json.dumps([config, sorted(sizes.items())], sort_keys=True).encode()).hexdigest()
    info: dict[str, Any] = {"general.architecture": family, "general.parameter_count": parameters}
    for key, ours in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                      ("block_count", "num_hidden_layers"), ("attention.head_count", "num_attention_heads"),
                      ("attention.head_count_kv", "num_key_value_heads"), ("vocab_size", "vocab_size")):  # fmt: skip
        if ours in text:
            info[f"{family}.{key}"] = text[ours]
    return {
        "size": sum(sizes.values()),
        "digest": digest,
        "modified_at": _timestamp(modified),
        "context_length": text.get("max_position_embeddings"),
        "model_info": info,
        "details": {
            "parent_model": "",
            "format": "safetensors",
            "family": family,
            "families": [family],
            "parameter_size": _human_count(parameters),
            "quantization_level": f"Q{bits}" if bits else (max(set(dtypes), key=dtypes.count) if dtypes else ""),
        },
    }


def _human_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# --- parsing requests ---------------------------------------------------------------------------


@dataclass
class OllamaRequest:
    chat: bool  # /api/chat, else /api/generate
    model: str  # as the client named it: answers echo it
    generation: Generation  # its model: the backend's name of that model
    stream: bool
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat, as tbmesh.http.chat takes them; empty: only load
    tools: list[dict[str, Any]] | None = None  # chat: the tools offered
    prompt: str = ""  # generate; empty: only load the model
    system: str | None = None  # generate
    raw: bool = False  # generate: the prompt as it is, without the chat template
    think: bool | None = None  # ask the template to think, or not; None: the template's default

    @property
    def loads_only(self) -> bool:
        """Ollama's way to load a model: a request with no messages (or no prompt)."""
        return not (self.messages if self.chat else self.prompt)


def _unsupported(body: dict[str, Any], name: str, what: str) -> None:
    """Refuse a field that would change the answer in a way this server cannot honour (an empty
    value is no request for it: clients send them)."""
    if body.get(name) not in (None, "", [], {}, False):
        raise bad_request(name, f"'{name}' is not supported: {what}")


def _generation(body: dict[str, Any], served: str, limits: Limits) -> Generation:
    """The sampling options, their defaults Ollama's; other options (top_k, num_ctx,
    repeat_penalty, ...) are ignored, as Ollama ignores those a runner does not know."""
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad_request("options", f"'options' must be an object, not {type_name(options)}")
    temperature = number(options, "temperature", 0.0, 2.0)
    top_p = number(options, "top_p", 0.0, 1.0)
    seed = integer(options, "seed", -(2**63), 2**63 - 1)
    # -1 (Ollama's default) and -2: as long as the context allows
    num_predict = integer(options, "num_predict", -2, limits.max_tokens)
    if num_predict == 0:
        raise bad_request("num_predict", f"'num_predict' must be 1 to {limits.max_tokens}, or -1 for no limit, not 0")
    stop = stop_strings(options, limits)
    asked = num_predict if num_predict is not None and num_predict > 0 else None
    sampling = request_sampling(DEFAULT_TEMPERATURE if temperature is None else temperature,
                                DEFAULT_TOP_P if top_p is None else top_p, seed)  # fmt: skip
    return Generation(served, asked or limits.default_max_tokens, sampling, stop, max_tokens_strict=asked is not None)


def _tool_calls(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates read them (Ollama's arguments are
    objects already)."""
    calls = message["tool_calls"]
    if not isinstance(calls, list):
        raise bad_request("messages", f"'{where}.tool_calls' must be an array, not {type_name(calls)}")
    result = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request("messages", f"'{where}.tool_calls[{j}]' must be an object with a function (with a name)")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, dict):
            raise bad_request("messages", f"'{where}.tool_calls[{j}].function.arguments' must be an object, "
                                   f"not {type_name(arguments)}")  # fmt: skip
        result.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})  # fmt: skip
    return result


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise bad_request("messages", f"'messages' must be an array of messages, not {type_name(messages)}")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request("messages", f"'{where}' must be an object, not {type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request("messages", f"'{where}.role' must be one of {', '.join(ROLES)}, not {json.dumps(role)}")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request("messages", f"'{where}.content' must be a string, not {type_name(content)}")
        if message.get("images"):
            raise bad_request("messages", f"'{where}.images' is not supported: the model reads text only")
        chat: dict[str, Any] = {"role": role, "content": valid_unicode(content, f"{where}.content", "messages")}
        if role == "assistant" and message.get("tool_calls"):
            chat["tool_calls"] = _tool_calls(message, where)
        thinking = message.get("thinking")
        if role == "assistant" and isinstance(thinking, str) and thinking:  # the turn's think block
            chat["reasoning_content"] = valid_unicode(thinking, f"{where}.thinking", "messages")
        if role == "tool" and isinstance(message.get("tool_name"), str):
            chat["name"] = message["tool_name"]  # the function whose result this is
        result.append(chat)
    if result and result[-1]["role"] == "assistant":  # the chat template starts a new turn after it
        raise bad_request("messages", f"'messages[{len(result) - 1}]': a last assistant message (which Ollama "
                                      "continues) is not supported: end with a user or tool message",
                          UNSUPPORTED_PREFILL)  # fmt: skip
    return result


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(name, f"'{name}' must be a string, not {type_name(value)}")
    return None if value is None else valid_unicode(value, name, name)


def _format_grammar(body: dict[str, Any]) -> str | None:
    """The grammar of `format`: "json" (any JSON object) or a JSON schema; none if absent or ""."""
    form = body.get("format")
    if form is None or form == "":
        return None
    if form != "json" and not isinstance(form, dict):
        raise bad_request("format", f"'format' must be \"json\" or a JSON schema, not {json.dumps(form)}")
    try:
        return json_grammar(None if form == "json" else form)
    except BadRequest as error:  # the client's schema: a 400 naming the field
        raise bad_request("format", str(error)) from None


def parse_request(body: Any, chat: bool, backend: Backend, limits: Limits,
                  names: ModelNames = ModelNames()) -> OllamaRequest:  # fmt: skip
    """Check a /api/chat or /api/generate body; raises ApiError naming the first bad field (400),
    or the model this node does not serve (404)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type_name(body)}")
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("model", "'model' is required (GET /api/tags lists them)")
    if not isinstance(model, str):
        raise bad_request("model", f"'model' must be a string, not {type_name(model)}")
    served = resolve_model(backend, model, names)
    stream = True if body.get("stream") is None else boolean(body, "stream")  # Ollama streams by default
    generation = _generation(body, served, limits)
    grammar = _format_grammar(body)
    if grammar is not None:
        generation = replace(generation, sampling=replace(generation.sampling, grammar=grammar))
    _unsupported(body, "logprobs", "not yet on the Ollama API (the OpenAI one has them)")
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in ("high", "medium", "low"):
        raise bad_request("think", f"'think' must be a boolean (or \"high\", \"medium\", \"low\"), not {json.dumps(think)}")
    request = OllamaRequest(chat, model, generation, stream, think=None if think is None else think is not False)
    if chat:
        request.messages = _messages(body)
        request.tools = function_tools(body)
    else:
        _unsupported(body, "tools", "tools are for /api/chat")
        request.prompt = _string(body, "prompt") or ""
        request.system = _string(body, "system")
        request.raw = boolean(body, "raw")
        _unsupported(body, "images", "the model reads text only")
        _unsupported(body, "suffix", "this server does not fill in the middle")
        _unsupported(body, "template", "the model's own chat template is used")
        _unsupported(body, "context", "send the conversation to /api/chat instead")
    return request


def resolve_model(backend: Backend, name: str, names: ModelNames = ModelNames()) -> str:
    """The backend's name of the model a client names (ModelNames: with or without its ":latest"
    tag, or an alias); raises ApiError(404) saying what this node serves."""
    served = backend.models()
    model = names.resolve(name, served)
    if model is not None:
        return model
    raise ApiError(404, f"model {name!r} not found; this node serves "
                        f"{', '.join(tagged(m) for m in served) or 'no model'}")  # fmt: skip


def prompt_tokens(tokenizer: TokenizerWrapper, request: OllamaRequest, context: int | None = None,
                  limits: Limits = Limits()) -> list[int]:  # fmt: skip
    """The prompt as token ids: the messages (or the system prompt and the prompt of
    /api/generate) through the model's chat template, unless raw or the model has none (the
    prompt as it is then, without the system prompt, as Ollama does). A text that could not
    fit `context` tokens is refused before (check_prompt_size). CPU-heavy: in_worker."""
    check_prompt_size(text_size(request.messages, request.tools, request.prompt, request.system), context, limits,
                      "messages" if request.chat else "prompt")  # fmt: skip
    if not request.chat and (request.raw or not tokenizer.has_chat_template):
        tokens = list(tokenizer.encode(request.prompt))  # with the BOS token where the model wants one
        if not tokens:
            raise bad_request("prompt", "the prompt makes no token", EMPTY_PROMPT)
        return tokens
    if request.think and not tokenizer.has_thinking:
        raise bad_request("think", f"the model {request.model} does not think (its chat template has no think "
                                   "block)", CHAT_TEMPLATE_ERROR)
    messages = request.messages
    if not request.chat:
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + \
            [{"role": "user", "content": request.prompt}]  # fmt: skip
    if not tokenizer.has_chat_template:
        raise bad_request("messages", f"the model {request.model} has no chat template: use /api/generate with "
                                      "a prompt", CHAT_TEMPLATE_ERROR)
    return chat_tokens(tokenizer, messages, request.tools, "messages" if request.chat else "prompt", request.think)


# --- responses ----------------------------------------------------------------------------------


def _line(part: dict[str, Any]) -> bytes:
    return json.dumps(part, ensure_ascii=False).encode() + b"\n"


class OllamaAnswer:
    """One /api/chat or /api/generate answer in Ollama's shapes (a tbmesh.http.common.AnswerShape):
    one JSON object, or NDJSON (one object a line, the last with done: true and the counts)."""

    media_type = NDJSON

    def __init__(self, ask: OllamaRequest, reader: ChatReader, started: int) -> None:
        self.ask = ask
        self.reader = reader
        self.started = started  # time.monotonic_ns() when the request arrived
        self.first_event: int | None = None  # ... when the answer's first piece was ready: the prompt's end

    async def stamped(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """`events`, the time of the first piece of the answer noted (Ollama's prompt_eval_duration)."""
        async with aclosing(events):
            async for event in events:
                if self.first_event is None and isinstance(event, (Text, Reasoning, ToolCall)):
                    self.first_event = time.monotonic_ns()
                yield event

    def _part(self, text: str, thinking: str, calls: list[ToolCall], done: bool) -> dict[str, Any]:
        part: dict[str, Any] = {"model": self.ask.model, "created_at": _timestamp()}
        if self.ask.chat:
            part["message"] = {"role": "assistant", "content": text}
            if thinking:
                part["message"]["thinking"] = thinking
            if calls:
                part["message"]["tool_calls"] = [{"function": {"index": call.index, "name": call.name,
                                                               "arguments": call.arguments}} for call in calls]  # fmt: skip
        else:
            part["response"] = text
            if thinking:
                part["thinking"] = thinking
        part["done"] = done
        return part

    def _last(self, text: str, thinking: str, calls: list[ToolCall]) -> dict[str, Any]:
        """The last part: the rest of the answer, why it ended, and the counts and durations (ns)."""
        now = time.monotonic_ns()
        first = self.first_event or now
        reader = self.reader
        return {**self._part(text, thinking, calls, True),
                "done_reason": "length" if reader.finish_reason == "length" else "stop",  # Ollama's for tool calls too
                "total_duration": now - self.started,
                "load_duration": 0,  # the model is loaded before requests are served
                "prompt_eval_count": reader.prompt_tokens, "prompt_eval_duration": first - self.started,
                "eval_count": reader.completion_tokens, "eval_duration": now - first}  # fmt: skip

    def whole(self, events: list[Event]) -> dict[str, Any]:
        return self._last("".join(e.text for e in events if isinstance(e, Text)),
                          "".join(e.text for e in events if isinstance(e, Reasoning)),
                          [e for e in events if isinstance(e, ToolCall)])  # fmt: skip

    def opening(self) -> bytes:
        return b""

    def event(self, event: Event) -> bytes:
        if isinstance(event, ToolCall):
            return _line(self._part("", "", [event], False))
        if isinstance(event, Text):
            return _line(self._part(event.text, "", [], False))
        if isinstance(event, Reasoning):
            return _line(self._part("", event.text, [], False))
        return b""

    def closing(self) -> bytes:
        return _line(self._last("", "", []))

    def error_event(self, error: ApiError) -> bytes:
        return _line({"error": _message(error)})

    def error_response(self, error: ApiError) -> web.Response:
        return error_response(error)


# --- routes -------------------------------------------------------------------------------------


def add_ollama_routes(app: web.Application, backend: Backend, limits: Limits = Limits(),
                      names: ModelNames = ModelNames()) -> None:  # fmt: skip
    """Add the Ollama endpoints (and `GET /`). Call it before adding any catch-all route."""

    async def facts(model: str) -> dict[str, Any]:
        return await asyncio.to_thread(model_facts, backend.model_dir)  # one model a backend

    async def listing(model: str) -> dict[str, Any]:
        about = await facts(model)
        return {"name": tagged(model), "model": tagged(model), "modified_at": about.get("modified_at", _timestamp(0)),
                "size": about.get("size", 0), "digest": about.get("digest", ""), "details": about.get("details", {})}  # fmt: skip

    def tokenize(ask: OllamaRequest, context: int | None) -> tuple[TokenizerWrapper, list[int]]:
        tokenizer = backend.tokenizer(ask.generation.model)  # the first call loads it
        return tokenizer, prompt_tokens(tokenizer, ask, context, limits)

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        started = time.monotonic_ns()
        try:
            ask = await read_request(request, limits, lambda body: parse_request(body, chat, backend, limits, names))
            served = ask.generation.model
            reason = backend.unavailable(served)
            if reason is not None:
                raise failure(reason)
            if ask.loads_only:  # the model is loaded while the cluster serves it
                loaded = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
                return web.json_response({"model": ask.model, "created_at": _timestamp(), **loaded, "done": True,
                                          "done_reason": "load"})  # fmt: skip
            context = backend.context(served)
            tokenizer, prompt = await in_worker(tokenize, ask, context)
            ask.generation = fit_context(ask.generation, len(prompt), context, "messages" if chat else "prompt",
                                         "num_predict")  # fmt: skip
        except Exception as error:  # ApiError, and a backend that fails to say what it serves or to tokenize
            return error_response(failure(error))
        # a raw prompt is not the chat template's: no think block or tool call to split from the text
        reader = ChatReader(tokenizer, prompt, ask.generation.stop, ask.tools, split=chat or not ask.raw)
        answer = OllamaAnswer(ask, reader, started)
        events = answer.stamped(answer_events(request, backend, ask.generation, prompt, reader))
        return await respond(request, events, answer, ask.stream)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    async def complete(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [await listing(m) for m in backend.models()]})

    async def running(request: web.Request) -> web.Response:
        models = []
        for model in backend.models():
            if backend.unavailable(model) is None:
                about = await facts(model)
                entry = await listing(model)
                models.append({**entry, "expires_at": NEVER, "size_vram": entry["size"],
                               "context_length": backend.context(model) or about.get("context_length")})  # fmt: skip
        return web.json_response({"models": models})

    async def show(request: web.Request) -> web.Response:
        try:
            body = await read_json(request, limits)
            if not isinstance(body, dict):
                raise ApiError(400, f"the request body must be a JSON object, not {type_name(body)}")
            name = body.get("model", body.get("name"))  # "name" is the older field
            if not isinstance(name, str) or not name:
                raise bad_request("model", "'model' is required: a string (GET /api/tags lists them)")
            model = resolve_model(backend, name, names)
            tokenizer = await in_worker(backend.tokenizer, model)  # the first call loads it
        except Exception as error:  # ApiError, and a backend whose tokenizer fails
            return error_response(failure(error))
        about = await facts(model)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""  # or None, or a dict
        return web.json_response({
            "modelfile": f"# served by tbmesh from {backend.model_dir}\nFROM {model}\n",
            "parameters": f"temperature {DEFAULT_TEMPERATURE}\ntop_p {DEFAULT_TOP_P}",
            "template": template,
            "details": about.get("details", {}),
            "model_info": about.get("model_info", {}),
            "capabilities": ["completion"] + (["tools"] if tokenizer.has_tool_calling else []) +
                            (["thinking"] if tokenizer.has_thinking else []),
            "modified_at": about.get("modified_at", _timestamp(0)),
        })  # fmt: skip

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION})

    async def root(request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")  # what Ollama answers; clients look for a 200

    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", complete)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", running)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/version", version)
    app.router.add_get("/", root)


# --- the OpenAPI description --------------------------------------------------------------------

ERROR = "OllamaError"
NEUTRAL = [None, "", 0, False, {}, []]  # what _unsupported and an empty images take for "not asked"


def _errors(statuses: dict[int, str]) -> dict[str, Any]:
    """OpenAPI responses in Ollama's error shape, by status code."""
    code = {CODE_HEADER: {"description": "what OpenAI's error would say in its `code`, where it says one",
                          "schema": {"type": "string"}}}  # fmt: skip
    return {str(status): {**json_body(ref(ERROR), why), "headers": code} for status, why in statuses.items()}


def _request_schemas(limits: Limits, model: Schema) -> dict[str, Schema]:
    """The request bodies as parse_request checks them (what it ignores is allowed)."""
    string = {"type": "string"}
    ignored = "read if a string, else ignored"

    def unsupported(why: str) -> Schema:
        return {"enum": NEUTRAL, "description": f"not supported ({why}): only an empty value"}

    options = obj({
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2,
                                 "description": f"{DEFAULT_TEMPERATURE} if not given"}),
        "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1, "description": f"{DEFAULT_TOP_P} if not given"}),
        "seed": nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "num_predict": nullable({"type": "integer", "minimum": -2, "maximum": limits.max_tokens, "not": {"const": 0},
                                 "description": "the most tokens to answer; -1 and -2: as many as the context allows"}),
        "stop": nullable({"anyOf": [string, {"type": "array", "items": string, "maxItems": limits.max_stop}]}),
    }, description="sampling options; the others (top_k, num_ctx, repeat_penalty, ...) are ignored")  # fmt: skip
    common: dict[str, Schema] = {
        "model": model,
        "stream": nullable({"type": "boolean", "description": "true if not given: NDJSON"}),
        "options": nullable(ref("OllamaOptions")),
        "format": nullable({"anyOf": [{"enum": ["", "json"]}, {"type": "object"}],
                            "description": "json: any JSON object; an object: the JSON schema the answer matches"}),
        "logprobs": unsupported("not on the Ollama API yet"),
        "think": nullable({"anyOf": [{"type": "boolean"}, {"enum": ["high", "medium", "low"]}],
                           "description": f"think (any level) or not; code {CHAT_TEMPLATE_ERROR} if the model "
                                          "does not think"}),  # fmt: skip
        "keep_alive": {"description": "ignored: the cluster keeps its model loaded"},
    }
    images = unsupported("the model reads text only")
    content = nullable(string)
    call = obj({"id": {"description": "any; one is made if it is missing"},
                "function": obj({"name": string, "arguments": {"type": "object"}}, required=["name"])},
               required=["function"])  # fmt: skip
    message = {"anyOf": [
        obj({"role": {"enum": ["system", "user"]}, "content": content, "images": images}, required=["role"]),
        obj({"role": {"const": "assistant"}, "content": content, "images": images,
             "tool_calls": {"anyOf": [{"enum": [None, "", 0, False, {}]}, {"type": "array", "items": call}]},
             "thinking": {"description": f"its think block: {ignored}"}}, required=["role"]),
        obj({"role": {"const": "tool"}, "content": content, "images": images,
             "tool_name": {"description": f"the function whose result this is: {ignored}"}}, required=["role"]),
    ]}  # fmt: skip
    chat = {**common,
            "messages": nullable({"type": "array", "items": message,
                                  "description": "none (or empty): only load the model; the last not the "
                                                 f"assistant's (code {UNSUPPORTED_PREFILL}: no prefill)"}),
            "tools": nullable({"type": "array", "items": ref("Tool")})}  # fmt: skip
    generate = {**common,
                "prompt": nullable({**string, "description": "none (or empty): only load the model"}),
                "system": nullable(string),
                "raw": nullable({"type": "boolean", "description": "the prompt as it is, without the chat template"}),
                "tools": unsupported("tools are for /api/chat"), "images": images,
                "suffix": unsupported("no filling in the middle"),
                "template": unsupported("the model's own chat template is used"),
                "context": unsupported("send the conversation to /api/chat")}  # fmt: skip
    return {
        "OllamaOptions": options,
        "OllamaChatRequest": obj(chat, required=["model"]),
        "OllamaGenerateRequest": obj(generate, required=["model"]),
        "Tool": obj({"type": {"const": "function"}, "function": obj({
            "name": {"type": "string", "minLength": 1},
            "description": {"description": "for the chat template"},
            "parameters": {"type": "object", "description": "a JSON schema of the arguments"},
        }, required=["name"])}, required=["type", "function"]),  # fmt: skip  # the same as the OpenAI API's
        "OllamaShowRequest": {"type": "object", "anyOf": [
            obj({"model": model}, required=["model"]),
            obj({"name": {**model, "description": "the older name of model, read when there is no model"}},
                required=["name"], **{"not": {"required": ["model"]}}),
        ]},  # fmt: skip
    }


def _response_schemas() -> dict[str, Schema]:
    """The answers as add_ollama_routes and Responder write them."""
    string, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    call = obj({"function": obj({"index": count, "name": string, "arguments": {"type": "object"}},
                                required=["index", "name", "arguments"])}, required=["function"])  # fmt: skip
    message = obj({"role": {"const": "assistant"}, "content": string, "thinking": string,
                   "tool_calls": {"type": "array", "items": call, "minItems": 1}}, required=["role", "content"])
    last = {"done_reason": {"enum": ["stop", "length", "load"],
                            "description": "an end token, a stop string or a tool call; num_predict; a request "
                                           "that only loads the model"},
            "total_duration": {**count, "description": "nanoseconds"}, "load_duration": count,
            "prompt_eval_count": count, "prompt_eval_duration": count, "eval_count": count, "eval_duration": count}
    part = {"model": string, "created_at": {**string, "description": "RFC 3339"}, "done": {"type": "boolean"}}
    model = {"name": string, "model": string, "modified_at": string, "size": count, "digest": string,
             "details": {"type": "object"}}  # fmt: skip
    return {
        "OllamaChatResponse": obj({**part, "message": message, **last}, required=["model", "created_at", "message",
                                                                                  "done"]),
        "OllamaGenerateResponse": obj({**part, "response": string, "thinking": string, **last},
                                      required=["model", "created_at", "response", "done"]),
        "OllamaModel": obj(model, required=list(model)),
        "OllamaModelList": obj({"models": {"type": "array", "items": ref("OllamaModel")}}, required=["models"]),
        "OllamaRunningList": obj({"models": {"type": "array", "items": {"allOf": [ref("OllamaModel"), obj(
            {"expires_at": string, "size_vram": count, "context_length": nullable(count)},
            required=["expires_at", "size_vram", "context_length"])]}}}, required=["models"]),  # fmt: skip
        "OllamaShowResponse": obj({"modelfile": string, "parameters": string, "template": string,
                                   "details": {"type": "object"}, "model_info": {"type": "object"},
                                   "capabilities": {"type": "array", "items": {"enum": ["completion", "tools",
                                                                                        "thinking"]}},
                                   "modified_at": string},
                                  required=["modelfile", "parameters", "template", "details", "model_info",
                                            "capabilities", "modified_at"]),  # fmt: skip
        ERROR: obj({"error": string}, required=["error"], additionalProperties=False),
    }


def openapi_description(backend: Backend, limits: Limits = Limits(), names: ModelNames = ModelNames()) -> ApiDescription:
    """What add_ollama_routes serves, for the OpenAPI document of this node (which names the
    models it serves, with and without their tag)."""
    model = model_schema(backend.models(), names, "GET /api/tags (its tag may be left out)")

    def generation(summary: str, request: str, answer: str) -> dict[str, Any]:
        ok = {"description": "the answer: one JSON object unless stream is true (the default), then NDJSON: "
                             f"one {answer} a line, the last with done: true, or an {ERROR} line if generation "
                             "fails after the first; a request with no prompt only loads the model (done_reason "
                             "load, JSON)",
              "content": {"application/json": {"schema": ref(answer)},
                          NDJSON: {"schema": {"type": "array", "items": {"anyOf": [ref(answer), ref(ERROR)]},
                                              "description": "the stream, its lines read as an array"}}}}  # fmt: skip
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, **json_body(ref(request), "the request (unknown fields are ignored)")},
            "responses": {"200": ok, **_errors({
                400: "a field is wrong or the body is not JSON; or what depends on the model (the code in "
                     f"the header {CODE_HEADER}): {CONTEXT_LENGTH_EXCEEDED} (the prompt and num_predict do "
                     f"not fit the context), {EMPTY_PROMPT} (a raw prompt of no token), {CHAT_TEMPLATE_ERROR} "
                     "(the model has no chat template, does not think, or its template refused the messages); "
                     f"or what the schema cannot say: {UNSUPPORTED_PREFILL} (/api/chat's last message is the "
                     "assistant's, which Ollama would continue)",
                404: "no such model here",
                413: f"the body is larger than {limits.max_body_bytes} bytes",
                500: "generation failed",
                503: "the model cannot serve now: no plan yet, it does not fit, a node went away",
            })},
        }}  # fmt: skip

    def listing(summary: str, answer: str) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {"200": json_body(ref(answer), "the models")}}}

    paths = {
        "/api/chat": generation("A chat answer (Ollama's)", "OllamaChatRequest", "OllamaChatResponse"),
        "/api/generate": generation("A completion of a prompt (Ollama's)", "OllamaGenerateRequest",
                                    "OllamaGenerateResponse"),
        "/api/tags": listing("The models served (Ollama's)", "OllamaModelList"),
        "/api/ps": listing("The models loaded: those that can serve now (Ollama's)", "OllamaRunningList"),
        "/api/show": {"post": {
            "summary": "One model's details, template and capabilities (Ollama's)",
            "requestBody": {"required": True, **json_body(ref("OllamaShowRequest"), "the model")},
            "responses": {"200": json_body(ref("OllamaShowResponse"), "the model"), **_errors({
                400: "no model named, or the body is not JSON",
                404: "no such model here",
                413: f"the body is larger than {limits.max_body_bytes} bytes",
                500: "the model's tokenizer failed",
                503: "the model cannot serve now",
            })},
        }},
        "/api/version": {"get": {"summary": "The Ollama version whose API this follows", "responses": {
            "200": json_body(obj({"version": {"type": "string"}}, required=["version"]), "the version")}}},
        "/": {"get": {"summary": "Whether the node's API is up, as Ollama answers it (no API key needed)",
                      "responses": {"200": {"description": "it is", "content": {"text/plain": {"schema": {
                          "const": "Ollama is running"}}}}}}},
    }  # fmt: skip
    return ApiDescription(paths, {**_request_schemas(limits, model), **_response_schemas()})
