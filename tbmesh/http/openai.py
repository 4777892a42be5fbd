"""OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions and /v1/models.

This module is OpenAI's wire format alone: its requests read into a tbmesh.http.common
`Generation` (a field OpenAI's API does not know is refused as OpenAI refuses it: "Unrecognized
request argument supplied"), its answers and errors written in OpenAI's shapes
(`OpenAIAnswer`). The way in and out (body limits, the worker thread, streaming, client
disconnects, the backend's errors) is tbmesh.http.common's; the chat template, detokenization,
stop strings, reasoning and tool calls are tbmesh.http.chat's.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tbmesh.core.generation import MAX_TOP_LOGPROBS, Backend, BadRequest, TokenLogprobs
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
    CONFLICTING_FIELDS,
    CONTEXT_LENGTH_EXCEEDED,
    EMPTY_PROMPT,
    INVALID_TOOL_ARGUMENTS,
    TOKEN_NOT_IN_VOCABULARY,
    ApiError,
    ContextTooLong,
    Generation,
    Limits,
    ModelNames,
    answer_events,
    as_integer,
    bad_request,
    boolean,
    chat_tokens,
    check_prompt_size,
    check_served,
    failure,
    fit_context,
    function_tools,
    in_worker,
    integer,
    model_schema,
    number,
    read_request,
    request_sampling,
    respond,
    stop_strings,
    type_name,
    valid_unicode,
)
from tbmesh.http.openapi import ApiDescription, Schema, json_body, nullable, obj, ref
from tbmesh.runtime.grammar import json_grammar, tool_call_grammar

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


def too_long_message(error: ContextTooLong) -> str:
    """OpenAI's wording of context_length_exceeded, which clients match (litellm's
    ContextWindowExceededError: "This model's maximum context length is")."""
    what = error.prompt_param  # "messages" or "prompt", as the request calls it
    limit = f"This model's maximum context length is {error.context} tokens. However, "
    if error.max_tokens is None:
        tokens = f"{error.prompt_tokens}" if error.counted else f"at least {error.prompt_tokens}"
        return limit + f"your {what} resulted in {tokens} tokens. Please reduce the length of the {what}."
    return limit + (f"you requested {error.prompt_tokens + error.max_tokens} tokens ({error.prompt_tokens} in the "
                    f"{what}, {error.max_tokens} in the completion). Please reduce the length of the {what} or "
                    "completion.")  # fmt: skip


def error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    message = too_long_message(error) if isinstance(error, ContextTooLong) else error.message
    return {"error": {"message": message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error_body(error), status=error.status, headers=error.headers)


# --- parsing requests ------------------------------------------------------------------------


ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class CompletionRequest:
    chat: bool  # /v1/chat/completions, else /v1/completions
    generation: Generation
    stream: bool
    include_usage: bool
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat, as tbmesh.http.chat takes them
    tools: list[dict[str, Any]] | None = None  # chat: the tools offered (tool_choice applied)
    prompt: str | list[int] = ""  # completions: text, or token ids
    forced_tool: bool = False  # chat: tool_choice "required" or a named function: the answer is one call


# Every field of OpenAI's requests (those of the `openai` library's CompletionCreateParams, which
# tests/test_openai_api.py compares with these), by what this server does with it: read, refused
# unless its value asks for nothing (it would change the answer in a way this server cannot
# honour), or accepted and left alone (it changes nothing of the answer: who asks, what OpenAI
# would store or bill). A field of none of them is refused as OpenAI refuses it.
READ = ("model", "max_tokens", "n", "temperature", "top_p", "seed", "stop", "stream", "stream_options")
CHAT_READ = (*READ, "messages", "max_completion_tokens", "tools", "tool_choice", "logprobs", "top_logprobs",
             "response_format", "modalities")  # fmt: skip
COMPLETION_READ = (*READ, "prompt", "logprobs")
NO_EFFECT = (None, 0, False, {}, [])  # what a client sends for "not asked" (0 for a penalty)
# name: (why it is refused, its values that ask for nothing)
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "logit_bias": ("logit biases are not supported", NO_EFFECT),
    "presence_penalty": ("presence penalties are not supported", NO_EFFECT),
    "frequency_penalty": ("frequency penalties are not supported", NO_EFFECT),
}
CHAT_UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    **UNSUPPORTED,
    "functions": ("the old 'functions' are not supported: use 'tools'", NO_EFFECT),
    "function_call": ("the old 'function_call' is not supported: use 'tool_choice'", NO_EFFECT),
    "audio": ("audio output is not supported", NO_EFFECT),
    "prediction": ("predicted outputs are not supported", NO_EFFECT),
    "reasoning_effort": ("reasoning effort is not supported: a thinking model thinks as its chat template says",
                         (None,)),
    "verbosity": ("verbosity is not supported", (None,)),
    "web_search_options": ("web search is not supported", (None,)),
    "moderation": ("moderation is not supported", (None,)),
}  # fmt: skip
COMPLETION_UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    **UNSUPPORTED,
    "best_of": ("only best_of=1 is supported", (None, 1)),
    "echo": ("echoing the prompt is not supported", (None, False)),
    "suffix": ("a suffix is not supported (no filling in the middle)", (None, "")),
}
CHAT_NO_EFFECT = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "safety_identifier",
                  "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options")  # fmt: skip
COMPLETION_NO_EFFECT = ("user",)


def _asks_nothing(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


def _refuse_unknown_and_unsupported(body: dict[str, Any], chat: bool) -> None:
    read, unsupported, no_effect = ((CHAT_READ, CHAT_UNSUPPORTED, CHAT_NO_EFFECT) if chat else
                                    (COMPLETION_READ, COMPLETION_UNSUPPORTED, COMPLETION_NO_EFFECT))  # fmt: skip
    unknown = [name for name in body if name not in read and name not in unsupported and name not in no_effect]
    if unknown:  # OpenAI's own words
        raise bad_request(unknown[0], f"Unrecognized request argument{'s' if len(unknown) > 1 else ''} supplied: "
                                      f"{', '.join(unknown)}")  # fmt: skip
    for name, (why, neutral) in unsupported.items():
        if name in body and not _asks_nothing(body[name], neutral):
            raise bad_request(name, f"'{name}': {why}")


def _content(message: dict[str, Any], where: str) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    content = message.get("content")
    if isinstance(content, str):
        return valid_unicode(content, f"{where}.content", "messages")
    if content is None and message.get("role") == "assistant":  # e.g. a tool-calling turn
        return ""
    if not isinstance(content, list):
        raise bad_request("messages", f"'{where}.content' must be a string or an array of text parts, "
                                      f"not {type_name(content)}")  # fmt: skip
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request("messages", f"'{where}.content[{i}]' is not a text part "
                                          '({"type": "text", "text": "..."}); only text is supported')  # fmt: skip
        texts.append(valid_unicode(part["text"], f"{where}.content[{i}].text", "messages"))
    return "".join(texts)


def _arguments(call: dict[str, Any], where: str) -> Any:
    """A tool call's arguments as chat templates want them: OpenAI sends a JSON string."""
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError as error:
        raise bad_request("messages", f"'{where}.arguments' is not JSON: {error}", INVALID_TOOL_ARGUMENTS) from None


def _tool_calls(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise bad_request("messages", f"'{where}.tool_calls' must be an array, not {type_name(calls)}")
    result = []
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request("messages", f"'{here}' must be an object with a function (with a name)")
        result.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                       "function": {"name": function["name"], "arguments": _arguments(function, f"{here}.function")}})
    return result


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages in the form chat templates read (see tbmesh.http.chat). A last assistant
    message is a turn of the conversation, as on OpenAI's API: the answer is the next turn."""
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "'messages' must be a non-empty array of messages")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request("messages", f"'{where}' must be an object, not {type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request("messages", f"'{where}.role' must be one of {', '.join(ROLES)}, not {json.dumps(role)}")
        # OpenAI's "developer" is the newer name of "system", which chat templates know
        chat: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(message, where)}
        if role == "assistant":
            if message.get("tool_calls") is not None:
                chat["tool_calls"] = _tool_calls(message, where)
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if isinstance(reasoning, str) and reasoning:
                chat["reasoning_content"] = valid_unicode(reasoning, f"{where}.reasoning_content", "messages")
        if role == "tool":
            for name in ("tool_call_id", "name"):
                if isinstance(message.get(name), str):
                    chat[name] = message[name]
        result.append(chat)
    return result


def _offered_tools(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The tools the chat template offers the model, as tool_choice says. "none": none (the
    model is not told of them); "auto" and "required": all; a named function: only that one.
    "required" and a named function also force a call (tool_call_grammar, in `tokenize`)."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required"):
        if choice is not None and tools is None:
            raise bad_request("tool_choice", "'tool_choice' is only allowed when 'tools' are given", CONFLICTING_FIELDS)
        return tools
    if choice == "none":
        return None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                         '{"type": "function", "function": {"name": ...}}')
    named = [tool for tool in tools or [] if tool["function"]["name"] == name]
    if not named:
        raise bad_request("tool_choice", f"'tool_choice' names the function {name!r}, which is not in 'tools'",
                          CONFLICTING_FIELDS)
    return named


def _response_grammar(body: dict[str, Any]) -> str | None:
    """The grammar of `response_format`: None for text, llguidance's for JSON mode or a schema."""
    response_format = body.get("response_format")
    if response_format is None or response_format == {"type": "text"}:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return _json_grammar(None)
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request("response_format", "'response_format' must be {\"type\": \"text\"}, {\"type\": "
                                             "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                                             "{\"name\": ..., \"schema\": {...}}}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise bad_request("response_format", "'response_format.json_schema.schema' must be an object")
    return _json_grammar(schema)


def _json_grammar(schema: dict[str, Any] | None) -> str:
    try:
        return json_grammar(schema)
    except BadRequest as error:  # the client's schema: a 400 naming the field, in OpenAI's shape
        raise bad_request("response_format", str(error)) from None


def _refuse_other_formats(body: dict[str, Any]) -> None:
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad_request("modalities", "'modalities': only [\"text\"] is supported")


def _logprobs(body: dict[str, Any]) -> int | None:
    """None, or how many of the likeliest tokens to give with each token's log-probability."""
    wanted = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad_request("top_logprobs", "'top_logprobs' needs 'logprobs': true", CONFLICTING_FIELDS)
    return (top or 0) if wanted else None


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("prompt", "'prompt' is required")
    # OpenAI takes a batch too (an array of strings or of token arrays): one prompt is served
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt", f"only one prompt per request is supported, not {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return valid_unicode(prompt, "prompt", "prompt")
    if isinstance(prompt, list):
        tokens = [as_integer(t) for t in prompt]
        if None not in tokens:
            return tokens
    raise bad_request("prompt", "'prompt' must be a string or an array of token ids")


def parse_request(body: Any, chat: bool, limits: Limits) -> CompletionRequest:
    """Check a request body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type_name(body)}")
    _refuse_unknown_and_unsupported(body, chat)
    model = body.get("model")
    if model is None:
        raise bad_request("model", "'model' is required (GET /v1/models lists them)")
    if not isinstance(model, str):
        raise bad_request("model", f"'model' must be a string, not {type_name(model)}")
    n = integer(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request("n", f"only n=1 is supported, not {n}")
    # max_completion_tokens is the newer name; it wins when both are given (as in mlx-lm),
    # but both are checked: a wrong value is an error even where the other one wins
    max_completion_tokens = integer(body, "max_completion_tokens", 1, limits.max_tokens) if chat else None
    max_tokens = integer(body, "max_tokens", 1, limits.max_tokens)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    temperature = number(body, "temperature", 0.0, 2.0)
    top_p = number(body, "top_p", 0.0, 1.0)
    seed = integer(body, "seed", -(2**63), 2**63 - 1)
    stop = stop_strings(body, limits)
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options", f"'stream_options' must be an object, not {type_name(options)}")
    include_usage = boolean(options or {}, "include_usage")
    logprobs = grammar = None
    if chat:
        _refuse_other_formats(body)
        logprobs = _logprobs(body)
        grammar = _response_grammar(body)
    elif body.get("logprobs") is not None:
        raise bad_request("logprobs", "'logprobs' is not supported on /v1/completions: use /v1/chat/completions")
    sampling = request_sampling(1.0 if temperature is None else temperature,  # OpenAI's defaults
                                1.0 if top_p is None else top_p, seed, logprobs, grammar)  # fmt: skip
    generation = Generation(model, limits.default_max_tokens if max_tokens is None else max_tokens, sampling, stop,
                            max_tokens_strict=max_tokens is not None)  # fmt: skip
    request = CompletionRequest(chat, generation, stream, stream and include_usage)
    if chat:
        request.messages = _messages(body)
        request.tools = _offered_tools(body, function_tools(body))
        request.forced_tool = body.get("tool_choice") not in (None, "auto", "none")
        if request.forced_tool and grammar is not None:
            raise bad_request("response_format", "'response_format' and a forced tool call ('tool_choice') cannot "
                                                 "both constrain the answer", CONFLICTING_FIELDS)  # fmt: skip
    else:
        request.prompt = _prompt(body)
    return request


def prompt_tokens(tokenizer: TokenizerWrapper, request: CompletionRequest, context: int | None = None,
                  limits: Limits = Limits()) -> list[int]:  # fmt: skip
    """The prompt as token ids: chat messages through the model's chat template. A text that
    could not fit `context` tokens is refused before (check_prompt_size). CPU-heavy: in_worker."""
    if request.chat:
        if not tokenizer.has_chat_template:
            raise bad_request("messages", f"the model {request.generation.model} has no chat template: use "
                                          "/v1/completions", CHAT_TEMPLATE_ERROR)  # fmt: skip
        check_prompt_size(text_size(request.messages, request.tools), context, limits, "messages")
        return chat_tokens(tokenizer, request.messages, request.tools, "messages")
    if isinstance(request.prompt, str):
        check_prompt_size(len(request.prompt), context, limits, "prompt")
        tokens = tokenizer.encode(request.prompt)  # with the BOS token where the model wants one, as mlx-lm
        if not tokens:
            raise bad_request("prompt", "'prompt' is empty", EMPTY_PROMPT)
        return list(tokens)
    if not request.prompt:
        raise bad_request("prompt", "'prompt' is empty")
    vocabulary = len(tokenizer)
    wrong = next((t for t in request.prompt if not 0 <= t < vocabulary), None)
    if wrong is not None:
        raise bad_request("prompt", f"token id {wrong} is not in the vocabulary (0 to {vocabulary - 1})",
                          TOKEN_NOT_IN_VOCABULARY)
    return list(request.prompt)


# --- answers ---------------------------------------------------------------------------------


def usage(reader: ChatReader) -> dict[str, int]:
    return {"prompt_tokens": reader.prompt_tokens, "completion_tokens": reader.completion_tokens,
            "total_tokens": reader.prompt_tokens + reader.completion_tokens}  # fmt: skip


def _event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class OpenAIAnswer:
    """One completion's answer in OpenAI's shapes (a tbmesh.http.common.AnswerShape): a chat
    completion or a text completion, whole or as server-sent chunks."""

    media_type = "text/event-stream"

    def __init__(self, completion: CompletionRequest, tokenizer: TokenizerWrapper, reader: ChatReader) -> None:
        self.completion = completion
        self.tokenizer = tokenizer
        self.reader = reader
        self.id = f"{'chatcmpl' if completion.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage: dict[str, Any] = {"usage": None} if completion.include_usage else {}
        self.logprobs: list[TokenLogprobs] = []  # streamed: of the tokens since the last chunk

    def _object(self, chunk: bool) -> str:
        if not self.completion.chat:
            return "text_completion"  # both streamed and not
        return "chat.completion.chunk" if chunk else "chat.completion"

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self._object(chunk), "created": self.created,
                "model": self.completion.generation.model, "choices": choices}  # fmt: skip

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

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, p) for i, p in t.top]}
                            for t in tokens], "refusal": None}  # fmt: skip

    def _tool_call(self, call: ToolCall, chunk: bool) -> dict[str, Any]:
        body = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        return {"index": call.index, **body} if chunk else body

    def whole(self, events: list[Event]) -> dict[str, Any]:
        text = "".join(e.text for e in events if isinstance(e, Text))
        reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
        calls = [self._tool_call(e, chunk=False) for e in events if isinstance(e, ToolCall)]
        logprobs = [e for e in events if isinstance(e, TokenLogprobs)]
        message: dict[str, Any] = {"content": text or (None if calls else "")}  # as OpenAI: a turn of calls has none
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        choice = self._choice(message, self.reader.finish_reason, chunk=False, logprobs=logprobs)
        if self.completion.generation.sampling.logprobs is not None and not logprobs:
            choice["logprobs"] = {"content": [], "refusal": None}
        return {**self._envelope(False, [choice]), "usage": usage(self.reader)}

    def _chunk(self, content: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = self._choice(content, finish_reason, chunk=True, logprobs=self.logprobs)
        self.logprobs = []
        return _event({**self._envelope(True, [choice]), **self.include_usage})

    def opening(self) -> bytes:
        if not self.completion.chat:
            return b""
        first = self._envelope(True, [self._choice({"role": "assistant", "content": ""}, None, chunk=True)])
        return _event({**first, **self.include_usage})  # OpenAI's first chunk gives the role

    def event(self, event: Event) -> bytes:
        if isinstance(event, TokenLogprobs):
            self.logprobs.append(event)  # sent with the text they make
            return b""
        if isinstance(event, Text):
            return self._chunk({"content": event.text}, None)
        if isinstance(event, Reasoning):
            return self._chunk({"reasoning_content": event.text}, None)
        return self._chunk({"tool_calls": [self._tool_call(event, chunk=True)]}, None)

    def closing(self) -> bytes:
        data = self._chunk({}, self.reader.finish_reason)
        if self.completion.include_usage:
            data += _event({**self._envelope(True, []), "usage": usage(self.reader)})
        return data + _event("[DONE]")

    def error_event(self, error: ApiError) -> bytes:
        return _event(error_body(error)) + _event("[DONE]")

    def error_response(self, error: ApiError) -> web.Response:
        return error_response(error)


# --- routes ----------------------------------------------------------------------------------


def add_openai_routes(app: web.Application, backend: Backend, limits: Limits = Limits(),
                      names: ModelNames = ModelNames()) -> None:  # fmt: skip
    """Add the OpenAI endpoints. Call it before adding any catch-all route: aiohttp matches
    routes in the order they were added."""
    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tbmesh"}

    def tokenize(completion: CompletionRequest, context: int | None) -> tuple[TokenizerWrapper, list[int]]:
        tokenizer = backend.tokenizer(completion.generation.model)  # the first call loads it
        prompt = prompt_tokens(tokenizer, completion, context, limits)
        # a forced call in the model's own tool-call syntax (a syntax not known here: offered only)
        grammar = tool_call_grammar(tokenizer, completion.tools or []) if completion.forced_tool else None
        if grammar is not None:
            generation = completion.generation
            completion.generation = replace(generation, sampling=replace(generation.sampling, grammar=grammar))
        return tokenizer, prompt

    async def complete(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            completion = await read_request(request, limits, lambda body: parse_request(body, chat, limits))
            model = check_served(backend, completion.generation.model, names)
            completion.generation = replace(completion.generation, model=model)
            context = backend.context(model)
            tokenizer, prompt = await in_worker(tokenize, completion, context)
            completion.generation = fit_context(completion.generation, len(prompt), context,
                                                "messages" if chat else "prompt")  # fmt: skip
        except Exception as error:  # ApiError, and a backend that fails to say what it serves or to tokenize
            return error_response(failure(error))
        reader = ChatReader(tokenizer, prompt, completion.generation.stop, completion.tools, split=chat)
        events = answer_events(request, backend, completion.generation, prompt, reader)
        return await respond(request, events, OpenAIAnswer(completion, tokenizer, reader), completion.stream)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, chat=False)

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_card(m) for m in backend.models()]})

    async def get_model(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        model = names.resolve(name, backend.models())
        if model is None:
            return error_response(ApiError(404, f"the model {name!r} does not exist here", param="model",
                                           code="model_not_found"))  # fmt: skip
        return web.json_response(model_card(model))

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
    """The request bodies as parse_request checks them: every field OpenAI's API has, no other."""
    token_count = nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens,
                            "description": "with the prompt, at most the context (--context); none: the answer "
                                           "may take what the context leaves, at most "
                                           f"{limits.default_max_tokens}"})
    common: dict[str, Schema] = {
        "model": model,
        "max_tokens": token_count,
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

    def unsupported(fields: dict[str, tuple[str, tuple[Any, ...]]]) -> dict[str, Schema]:
        return {name: {"enum": list(neutral), "description": f"{why}: only a value that asks for nothing"}
                for name, (why, neutral) in fields.items()}  # fmt: skip

    def no_effect(names: tuple[str, ...]) -> dict[str, Schema]:
        return {name: {"description": "accepted: it changes nothing of the answer"} for name in names}

    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": ref("TextPart")}]}
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    one = {"minItems": 1, "maxItems": 1, "description": "a batch of one prompt"}
    ignored = "read if a string, else ignored"
    tool_call = obj({"id": {"description": "any; one is made if it is missing"},
                     "function": obj({"name": {"type": "string"}, "arguments": {
                         "description": "a string of JSON (code invalid_tool_arguments if it is not), or the "
                                        "arguments themselves"}}, required=["name"])},
                    required=["function"])  # fmt: skip
    chat = {
        **common,
        "max_completion_tokens": {**token_count, "description": "the newer name of max_tokens; wins over it"},
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
        **unsupported(CHAT_UNSUPPORTED),
        **no_effect(CHAT_NO_EFFECT),
        "response_format": nullable({"anyOf": [
            obj({"type": {"enum": ["text", "json_object"]}}, required=["type"], additionalProperties=False),
            obj({"type": {"const": "json_schema"},
                 "json_schema": obj({"name": {"type": "string"}, "schema": {"type": "object"},
                                     "strict": nullable({"type": "boolean"}),
                                     "description": {"type": "string"}}, required=["name"])},
                required=["type", "json_schema"], additionalProperties=False,
                description="the answer matches the schema (a grammar masks the sampler)"),
        ]}),
        "modalities": nullable({"const": ["text"]}),
    }  # fmt: skip
    return {
        "ChatCompletionRequest": obj(chat, required=["model", "messages"], additionalProperties=False),
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
        ]}, "logprobs": {"type": "null", "description": "not supported here: use /v1/chat/completions"},
            **unsupported(COMPLETION_UNSUPPORTED), **no_effect(COMPLETION_NO_EFFECT)},
            required=["model", "prompt"], additionalProperties=False),  # fmt: skip
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


def openapi_description(backend: Backend, limits: Limits = Limits(), names: ModelNames = ModelNames()) -> ApiDescription:
    """What add_openai_routes serves, for the OpenAPI document of this node (which names the
    models it serves)."""
    model = model_schema(backend.models(), names)

    def completion(summary: str, request: str, answer: str, chunk: str) -> dict[str, Any]:
        ok = {"description": "the answer; server-sent events with stream: true",
              "content": {"application/json": {"schema": ref(answer)}, **_event_stream(chunk)}}  # fmt: skip
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, **json_body(ref(request), "the request (a field OpenAI's API does "
                                                                        "not have is a 400)")},
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
