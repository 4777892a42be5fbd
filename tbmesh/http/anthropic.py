"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

For the `anthropic` SDK and Claude Code (ANTHROPIC_BASE_URL=http://mac:port). Requests become
tbmesh.http.chat's messages and tools (content blocks: text, thinking, tool_use, tool_result), the
answer comes back as Anthropic's content blocks (thinking, text, tool_use), streamed or not
(`AnthropicAnswer`; the HTTP of it is tbmesh.http.common's). Errors are in Anthropic's shape:
{"type": "error", "error": {"type": ..., "message": ...}}; what OpenAI's errors say in their
`code` is in the header X-Tbmesh-Error-Code (for the 400s that no schema of the request
foresees: tbmesh.http.common.MODEL_DEPENDENT_CODES and UNDESCRIBABLE_CODES).
The `x-api-key` header is accepted (tbmesh.http.server checks it when the daemon has an API key).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tbmesh.core.generation import Backend
from tbmesh.http.chat import (
    ChatReader,
    Event,
    Reasoning,
    TemplateError,
    Text,
    ToolCall,
    chat_prompt,
    text_size,
)
from tbmesh.http.common import (
    CHAT_TEMPLATE_ERROR,
    CODE_HEADER,
    CONFLICTING_FIELDS,
    CONTEXT_LENGTH_EXCEEDED,
    UNSUPPORTED_PREFILL,
    ApiError,
    ContextTooLong,
    Generation,
    Limits,
    ModelNames,
    answer_events,
    bad_request,
    boolean,
    check_prompt_size,
    check_served,
    failure,
    fit_context,
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

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
               503: "overloaded_error"}  # fmt: skip
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


# the codes of a `thread` continuation refused, in the error's `details.error_code`, as the
# `anthropic` SDK reads them: it then sends the whole conversation again as a new thread
THREAD_NOT_FOUND = "thread_not_found"
THREAD_ERROR_CODES = (THREAD_NOT_FOUND,)


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    error = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
    if code in THREAD_ERROR_CODES:
        error["details"] = {"error_code": code}
    return {"type": "error", "error": error}


def error_message(error: ApiError) -> str:
    """The error's message; the too-long one in Anthropic's words, which Claude Code matches (and
    reads the numbers of) to compact the conversation. A prompt refused by its characters, before
    it is tokenized, says the fewest tokens it has."""
    if not isinstance(error, ContextTooLong):
        return error.message
    if error.max_tokens is None:
        return f"prompt is too long: {error.prompt_tokens} tokens > {error.context} maximum"
    return (f"input length and `max_tokens` exceed context limit: {error.prompt_tokens} + {error.max_tokens} > "
            f"{error.context}, decrease input length or `max_tokens` and try again")  # fmt: skip


PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def owns(path: str) -> bool:
    """Whether a path is this API's (its errors then in Anthropic's shape), routed or not."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_response(error: ApiError) -> web.Response:
    """An error as Anthropic answers it; OpenAI's `code` in the header CODE_HEADER."""
    headers = dict(error.headers or {})
    if error.code is not None:
        headers[CODE_HEADER] = error.code
    return web.json_response(error_body(error.status, error_message(error), error.code), status=error.status,
                             headers=headers)  # fmt: skip


def _bad(message: str, code: str | None = None) -> ApiError:
    return bad_request(None, message, code)  # Anthropic's errors name no field but in their message


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """A conversation as its requests sent it (Anthropic's JSON, checked), kept for `thread`
    continuations: the thread's system prompt and tools, its messages and answers."""

    system: Any
    tools: Any
    messages: list[Any]


class Threads:
    """The conversations kept for `thread` continuations, by the id of their last answer: at most
    `size`, the least recently used dropped first. Read by the request parser in the API's worker
    thread, written on the event loop: locked."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, message_id: str) -> Conversation | None:
        with self._lock:
            if message_id in self._kept:
                self._kept.move_to_end(message_id)
            return self._kept.get(message_id)

    def keep(self, message_id: str, conversation: Conversation) -> None:
        with self._lock:
            self._kept[message_id] = conversation
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)


@dataclass
class MessagesRequest:
    generation: Generation
    messages: list[dict[str, Any]]  # tbmesh.http.chat's form, the system prompt first
    tools: list[dict[str, Any]] | None  # tbmesh.http.chat's form, tool_choice applied
    stream: bool
    thread: Conversation | None = None  # to keep with the answer (`thread` create or continue), or None
    system_at: int | None = None  # the index in `messages` (as sent) of the first system message, if any


def _text(value: Any, where: str) -> str:
    """A string, or an array of text blocks (joined)."""
    if isinstance(value, str):
        return valid_unicode(value, where, None)
    if not isinstance(value, list):
        raise _bad(f"'{where}' must be a string or an array of text blocks, not {type_name(value)}")
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(f"'{where}[{i}]' must be a text block ({{\"type\": \"text\", \"text\": ...}})")
        texts.append(valid_unicode(block["text"], f"{where}[{i}].text", None))
    return "".join(texts)


def _block_text(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise _bad(f"'{where}.text' must be a string, not {type_name(block.get('text'))}")
    return valid_unicode(block["text"], f"{where}.text", None)


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"'{where}.content' must be a string or an array of content blocks, not {type_name(content)}")
    if not content:
        raise _bad(f"'{where}.content' is empty")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"'{where}.content[{i}]' must be a content block (an object with a type)")
    return content


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results (each a tool message) and its text, in their order."""
    messages: list[dict[str, Any]] = []
    for i, block in enumerate(_blocks(content, where)):
        here = f"{where}.content[{i}]"
        if block["type"] == "text":
            text = _block_text(block, here)
            if messages and messages[-1]["role"] == "user":
                messages[-1]["content"] += text
            else:
                messages.append({"role": "user", "content": text})
        elif block["type"] == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad(f"'{here}.tool_use_id' must be a string")
            result = block.get("content", "")
            messages.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                             "content": _text(result, f"{here}.content")})  # fmt: skip
        else:
            raise _bad(f"'{here}': a user message holds text and tool_result blocks; "
                       f"{block['type']} blocks are not supported")
    return messages


def _assistant(content: Any, where: str) -> dict[str, Any]:
    """An assistant turn: its text, its think block and its tool calls, as one message."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for i, block in enumerate(_blocks(content, where)):
        here = f"{where}.content[{i}]"
        if block["type"] == "text":
            message["content"] += _block_text(block, here)
        elif block["type"] == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise _bad(f"'{here}.thinking' must be a string")
            message["reasoning_content"] = message.get("reasoning_content", "") + block["thinking"]
        elif block["type"] == "redacted_thinking":
            continue  # nothing readable to render
        elif block["type"] == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad(f"'{here}' must have an id and a name (strings)")
            if not isinstance(block.get("input"), dict):
                raise _bad(f"'{here}.input' must be an object, not {type_name(block.get('input'))}")
            message.setdefault("tool_calls", []).append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": block["input"]}})
        else:
            raise _bad(f"'{here}': an assistant message holds text, thinking and tool_use blocks; "
                       f"{block['type']} blocks are not supported")
    return message


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required: a non-empty array of messages")
    result = []
    system = body.get("system")
    if system is not None:
        result.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object, not {type_name(message)}")
        role = message.get("role")
        if role == "user":
            result += _user(message.get("content"), where)
        elif role == "assistant":
            result.append(_assistant(message.get("content"), where))
        elif role == "system":  # Anthropic takes them mid-conversation (Claude Code sends them): where they stand
            result.append({"role": "system", "content": _text(message.get("content"), f"{where}.content")})
        else:  # in Anthropic's words
            raise _bad(f"messages.{i}.role: Unexpected role {json.dumps(role)}. The input message role must be "
                       "`user`, `assistant` or `system`.")  # fmt: skip
    if messages[-1].get("role") == "assistant":  # the chat template starts a new turn after it
        raise _bad(f"'messages[{len(messages) - 1}]': a last assistant message (a prefill to continue) "
                   "is not supported: end with a user message", UNSUPPORTED_PREFILL)
    return result


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tools offered to the model, in the chat templates' form, as tool_choice says:
    "none" offers none, "auto" and "any" all (nothing forces a call: there is no constrained
    decoding), {"type": "tool", "name": ...} only that one."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _bad(f"'tools' must be an array of tools, not {type_name(tools)}")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(f"'tools[{i}]' must be an object with a name")
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"'tools[{i}]': server tools ({tool['type']}) are not supported, only client tools")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"'tools[{i}].input_schema' must be a JSON schema object")
        function = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        functions.append({"type": "function", "function": {**function, "parameters": schema}})
    choice = body.get("tool_choice")
    if choice is None:
        return functions or None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "none":
        return None
    if kind in ("auto", "any"):
        return functions or None
    if kind == "tool":
        named = [f for f in functions if f["function"]["name"] == choice.get("name")]
        if not named:
            raise _bad(f"'tool_choice' names the tool {choice.get('name')!r}, which is not in 'tools'",
                       CONFLICTING_FIELDS)
        return named
    raise _bad("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} "
               "or {\"type\": \"tool\", \"name\": ...}")


def _continued(body: dict[str, Any], threads: Threads | None) -> tuple[dict[str, Any], bool]:
    """The body with the conversation its `thread` continues before its messages (the thread's
    system prompt and tools too), and whether the answer is to be kept for a continuation."""
    thread = body.get("thread")
    if thread is None:
        return body, False
    kind = thread.get("type") if isinstance(thread, dict) else None
    if kind == "create":
        return body, True
    if kind != "continue":
        raise _bad("'thread' must be {\"type\": \"create\"} or {\"type\": \"continue\", \"previous_message_id\": ...}")
    message_id = thread.get("previous_message_id")
    if not isinstance(message_id, str):
        raise _bad(f"'thread.previous_message_id' must be a string, not {type_name(message_id)}")
    for field in ("system", "tools"):  # set when the thread was created
        if body.get(field) is not None:
            raise _bad(f"'{field}' cannot be sent with a thread continuation: the thread's own is used",
                       CONFLICTING_FIELDS)
    if not isinstance(body.get("messages", []), list):
        raise _bad(f"'messages' must be an array of messages, not {type_name(body.get('messages'))}")
    kept = None if threads is None else threads.get(message_id)
    if kept is None:
        size = 0 if threads is None else threads.size
        raise ApiError(404, f"thread not found: this server keeps no conversation that ends with the message "
                            f"{message_id!r} (it keeps the last {size}); send the whole conversation with "
                            "'thread' {\"type\": \"create\"}", code=THREAD_NOT_FOUND)  # fmt: skip
    return {**body, "system": kept.system, "tools": kept.tools, "messages": [*kept.messages, *body.get("messages", [])]}, True


def parse_request(body: Any, limits: Limits, count_only: bool = False, threads: Threads | None = None) -> MessagesRequest:
    """Check a request body; raises ApiError(400) naming the first bad field (404: a `thread`
    continuation of a conversation `threads` does not keep)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {type_name(body)}")
    body, keep = _continued(body, threads)
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad(f"'model' is required: a string, not {type_name(model)}")
    # a ceiling, not a wish: clients (Claude Code) ask for more than a Mac's context holds, so
    # the answer may take what is left of it (then it stops with "max_tokens")
    max_tokens = integer(body, "max_tokens", 1)
    if max_tokens is None and not count_only:
        raise _bad("'max_tokens' is required")
    temperature = number(body, "temperature", 0.0, 1.0)
    top_p = number(body, "top_p", 0.0, 1.0)
    if body.get("top_k") is not None:  # it would change the answer; the sampler has no top-k
        raise _bad("'top_k' is not supported (temperature and top_p are)")
    stop = stop_strings(body, limits, "stop_sequences", one=False)
    thinking = body.get("thinking")
    if thinking is not None and (not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str)):
        raise _bad("'thinking' must be an object with a type ({\"type\": \"enabled\", ...})")
    sampling = request_sampling(1.0 if temperature is None else temperature,  # Anthropic's defaults
                                1.0 if top_p is None else top_p)  # fmt: skip
    generation = Generation(model, min(max_tokens or 1, limits.max_tokens), sampling, stop, max_tokens_strict=False)
    request = MessagesRequest(generation, _messages(body), _tools(body), boolean(body, "stream"))
    request.system_at = next((i for i, m in enumerate(body["messages"]) if m.get("role") == "system"), None)
    if keep:
        request.thread = Conversation(body.get("system"), body.get("tools"), list(body["messages"]))
    return request


def _prompt(tokenizer: TokenizerWrapper, request: MessagesRequest, context: int | None, limits: Limits) -> list[int]:
    """The prompt's tokens. CPU-heavy: in_worker."""
    check_prompt_size(text_size(request.messages, request.tools), context, limits, "messages")
    try:
        return chat_prompt(tokenizer, request.messages, request.tools)
    except TemplateError as error:
        if request.system_at is not None:  # in Anthropic's words, on which Claude Code merges its system messages
            raise _bad(f"messages.{request.system_at}.role: Unexpected role \"system\". The input message role "
                       f"must be `user` or `assistant` (the model's chat template refused it: {error})",
                       CHAT_TEMPLATE_ERROR) from None  # fmt: skip
        raise _bad(str(error), CHAT_TEMPLATE_ERROR) from None


# --- answers ---------------------------------------------------------------------------------


def _block_of(event: Text | Reasoning | ToolCall) -> dict[str, Any]:
    """The content block that `event` starts, as it is before its deltas (streamed)."""
    if isinstance(event, Text):
        return {"type": "text", "text": ""}
    if isinstance(event, Reasoning):
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": event.name, "input": {}}


def _delta_of(event: Text | Reasoning | ToolCall) -> dict[str, Any]:
    if isinstance(event, Text):
        return {"type": "text_delta", "text": event.text}
    if isinstance(event, Reasoning):
        return {"type": "thinking_delta", "thinking": event.text}
    return {"type": "input_json_delta", "partial_json": json.dumps(event.arguments, ensure_ascii=False)}


def _stop(reader: ChatReader) -> tuple[str, str | None]:
    if reader.stop.matched is not None:
        return "stop_sequence", reader.stop.matched
    return STOP_REASONS[reader.finish_reason], None


def _event(name: str, data: dict[str, Any]) -> bytes:
    """A server-sent event named as its data's type."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n".encode()


class AnthropicAnswer:
    """One Messages answer in Anthropic's shapes (a tbmesh.http.common.AnswerShape): content
    blocks, whole or as server-sent events (message_start, each block's start, deltas and
    stop, message_delta, message_stop)."""

    media_type = "text/event-stream"

    def __init__(self, messages: MessagesRequest, reader: ChatReader) -> None:
        self.messages = messages
        self.reader = reader
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.block: dict[str, Any] | None = None  # streamed: the content block open now
        self.index = -1  # ... and its index
        self.content: list[dict[str, Any]] = []  # the content blocks sent so far, whole
        self.done = False  # the whole answer was sent

    def _message(self, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        stop_reason, stop_sequence = _stop(self.reader) if done else (None, None)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.messages.generation.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": self.reader.prompt_tokens, "output_tokens": self.reader.completion_tokens}}

    def whole(self, events: list[Event]) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ToolCall):
                content.append({**_block_of(event), "input": event.arguments})
            elif isinstance(event, (Text, Reasoning)):
                key = "text" if isinstance(event, Text) else "thinking"
                if not content or content[-1]["type"] != _block_of(event)["type"]:
                    content.append(_block_of(event))
                content[-1][key] += event.text
        self.content, self.done = content, True
        return self._message(content, done=True)

    def opening(self) -> bytes:
        return _event("message_start", {"message": self._message([], done=False)})

    def _close_block(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return _event("content_block_stop", {"index": self.index})

    def event(self, event: Event) -> bytes:
        if not isinstance(event, (Text, Reasoning, ToolCall)):
            return b""
        data = b""
        starts = _block_of(event)
        if self.block is None or self.block["type"] != starts["type"] or isinstance(event, ToolCall):
            data += self._close_block()
            self.block, self.index = starts, self.index + 1
            data += _event("content_block_start", {"index": self.index, "content_block": starts})
            self.content.append({**starts, "input": event.arguments} if isinstance(event, ToolCall) else dict(starts))
        if isinstance(event, (Text, Reasoning)):
            self.content[-1]["text" if isinstance(event, Text) else "thinking"] += event.text
        return data + _event("content_block_delta", {"index": self.index, "delta": _delta_of(event)})

    def closing(self) -> bytes:
        stop_reason, stop_sequence = _stop(self.reader)
        self.done = True
        return self._close_block() + \
            _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                     "usage": {"output_tokens": self.reader.completion_tokens}}) + \
            _event("message_stop", {})  # fmt: skip

    def error_event(self, error: ApiError) -> bytes:
        return _event("error", {"error": error_body(error.status, error_message(error), error.code)["error"]})

    def error_response(self, error: ApiError) -> web.Response:
        return error_response(error)


def add_anthropic_routes(app: web.Application, backend: Backend, limits: Limits = Limits(),
                         names: ModelNames = ModelNames()) -> None:  # fmt: skip
    """Add POST /v1/messages and /v1/messages/count_tokens. Before any catch-all route."""
    threads = Threads(limits.stored_threads)

    def tokenize(messages: MessagesRequest, context: int | None) -> tuple[TokenizerWrapper, list[int]]:
        tokenizer = backend.tokenizer(messages.generation.model)  # the first call loads it
        return tokenizer, _prompt(tokenizer, messages, context, limits)

    async def prepare(request: web.Request, count_only: bool) -> tuple[MessagesRequest, TokenizerWrapper, list[int]]:
        messages = await read_request(request, limits, lambda body: parse_request(body, limits, count_only, threads))
        model = check_served(backend, messages.generation.model, names)
        messages.generation = replace(messages.generation, model=model)
        if count_only:  # counted whatever its length: clients count to learn whether a prompt fits
            return messages, *await in_worker(tokenize, messages, None)
        context = backend.context(model)
        tokenizer, prompt = await in_worker(tokenize, messages, context)
        messages.generation = fit_context(messages.generation, len(prompt), context, "messages")
        return messages, tokenizer, prompt

    async def create_message(request: web.Request) -> web.StreamResponse:
        try:
            messages, tokenizer, prompt = await prepare(request, count_only=False)
        except Exception as error:  # ApiError, and a backend that fails to say what it serves
            return error_response(failure(error))
        reader = ChatReader(tokenizer, prompt, messages.generation.stop, messages.tools)
        events = answer_events(request, backend, messages.generation, prompt, reader)
        answer = AnthropicAnswer(messages, reader)
        response = await respond(request, events, answer, messages.stream)
        if messages.thread is not None and answer.done:  # kept for a continuation from this answer
            turn = {"role": "assistant", "content": answer.content or ""}
            threads.keep(answer.id, replace(messages.thread, messages=[*messages.thread.messages, turn]))
        return response

    async def count_tokens(request: web.Request) -> web.Response:
        try:
            _, _, prompt = await prepare(request, count_only=True)
        except Exception as error:
            return error_response(failure(error))
        return web.json_response({"input_tokens": len(prompt)})

    app.router.add_post("/v1/messages", create_message)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)


# --- the OpenAPI description -----------------------------------------------------------------

ERROR = "AnthropicError"
EVENTS = ("message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
          "message_stop", "error")  # fmt: skip


def _error_responses(statuses: dict[int, str]) -> dict[str, Any]:
    """OpenAPI responses in Anthropic's error shape, by status code."""
    code = {CODE_HEADER: {"description": "what OpenAI's error would say in its `code`, where it says one",
                          "schema": {"type": "string"}}}  # fmt: skip
    return {str(status): {**json_body(ref(ERROR), f"{why} (error.type {ERROR_TYPES.get(status, 'api_error')})"),
                          "headers": code} for status, why in statuses.items()}  # fmt: skip


def _request_schemas(limits: Limits, model: Schema) -> dict[str, Schema]:
    """The request bodies as parse_request checks them (what it ignores is allowed)."""
    string = {"type": "string"}
    text = ref("TextBlock")
    texts = {"anyOf": [string, {"type": "array", "items": text}]}
    anything = "anything: ignored"

    def blocks(*kinds: str) -> Schema:
        return {"anyOf": [string, {"type": "array", "minItems": 1, "items": {"anyOf": [ref(k) for k in kinds]}}]}

    fields: dict[str, Schema] = {
        "model": model,
        "max_tokens": {"type": "integer", "minimum": 1, "description": "a ceiling: the answer may take what is left "
                                                                        f"of the context, and at most {limits.max_tokens}"},
        "system": nullable({**texts, "description": "the system prompt"}),
        "messages": {"type": "array", "minItems": 1, "items": {"anyOf": [
            obj({"role": {"const": "user"}, "content": blocks("TextBlock", "ToolResultBlock")},
                required=["role", "content"]),
            obj({"role": {"const": "assistant"},
                 "content": blocks("TextBlock", "ThinkingBlock", "RedactedThinkingBlock", "ToolUseBlock")},
                required=["role", "content"]),
            obj({"role": {"const": "system"}, "content": texts}, required=["role", "content"],
                description="a system message where it stands, through the chat template"),
        ]}, "description": f"the last a user message (code {UNSUPPORTED_PREFILL} if not: no prefill)"},
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "top_k": {"type": "null", "description": "not supported"},
        "stop_sequences": nullable({"type": "array", "items": string, "maxItems": limits.max_stop}),
        "stream": nullable({"type": "boolean"}),
        "thinking": nullable(obj({"type": string}, required=["type"], description="the model thinks as its "
                                                                                 "chat template says")),
        "tools": nullable({"type": "array", "items": ref("AnthropicTool")}),
        "thread": nullable({"anyOf": [
            obj({"type": {"const": "create"}}, required=["type"],
                description=f"keep the conversation with the answer (the last {limits.stored_threads} are kept)"),
            obj({"type": {"const": "continue"}, "previous_message_id": string}, required=["type", "previous_message_id"],
                description="the kept conversation that ends with this answer, then messages (system and tools: the "
                            f"thread's, code {CONFLICTING_FIELDS} if sent; 404 with details.error_code {THREAD_NOT_FOUND} when it is not kept)"),
        ]}),
        "tool_choice": nullable({"anyOf": [
            obj({"type": {"enum": ["auto", "any", "none"]}}, required=["type"],
                description="any offers the tools as auto does (nothing forces a call); none offers none"),
            obj({"type": {"const": "tool"}, "name": string}, required=["type", "name"],
                description=f"only this tool of tools (code {CONFLICTING_FIELDS} if it is not one)"),
        ]}),
    }  # fmt: skip
    return {
        "MessagesRequest": obj(fields, required=["model", "max_tokens", "messages"]),
        "CountTokensRequest": obj({**fields, "max_tokens": nullable(fields["max_tokens"])},
                                  required=["model", "messages"]),
        "TextBlock": obj({"type": {"const": "text"}, "text": string}, required=["type", "text"]),
        "ToolResultBlock": obj({"type": {"const": "tool_result"}, "tool_use_id": string, "content": texts,
                                "is_error": {"description": anything}}, required=["type", "tool_use_id"]),
        "ThinkingBlock": obj({"type": {"const": "thinking"}, "thinking": string, "signature": {"description": anything}},
                             required=["type", "thinking"]),
        "RedactedThinkingBlock": obj({"type": {"const": "redacted_thinking"}}, required=["type"],
                                     description="left out of the prompt"),
        "ToolUseBlock": obj({"type": {"const": "tool_use"}, "id": string, "name": string, "input": {"type": "object"}},
                            required=["type", "id", "name", "input"]),
        "AnthropicTool": obj({"name": {"type": "string", "minLength": 1},
                              "type": nullable({"const": "custom", "description": "client tools only"}),
                              "description": {"description": "read if a string"},
                              "input_schema": {"type": "object", "description": "a JSON schema of the input"}},
                             required=["name", "input_schema"]),  # fmt: skip
    }


def _response_schemas() -> dict[str, Schema]:
    """The answers as Answer writes them."""
    string, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    stop_reason = {"enum": list(STOP_REASONS.values()) + ["stop_sequence"]}

    def message(done: bool) -> Schema:
        return obj({"id": string, "type": {"const": "message"}, "role": {"const": "assistant"}, "model": string,
                    "content": {"type": "array", "items": ref("ContentBlock")} if done else {"const": []},
                    "stop_reason": stop_reason if done else {"type": "null"},
                    "stop_sequence": nullable(string) if done else {"type": "null"},
                    "usage": ref("AnthropicUsage")},
                   required=["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"])  # fmt: skip

    def event(name: str, fields: dict[str, Schema]) -> Schema:
        return obj({"type": {"const": name}, **fields}, required=["type", *fields])

    index = count
    text = obj({"type": {"const": "text"}, "text": string}, required=["type", "text"])
    thinking = obj({"type": {"const": "thinking"}, "thinking": string, "signature": string},
                   required=["type", "thinking", "signature"])
    tool_use = obj({"type": {"const": "tool_use"}, "id": string, "name": string,
                    "input": {"description": "the arguments as the model wrote them: an object, normally"}},
                   required=["type", "id", "name", "input"])  # fmt: skip
    deltas = {"anyOf": [
        obj({"type": {"const": "text_delta"}, "text": string}, required=["type", "text"]),
        obj({"type": {"const": "thinking_delta"}, "thinking": string}, required=["type", "thinking"]),
        obj({"type": {"const": "input_json_delta"}, "partial_json": string}, required=["type", "partial_json"]),
    ]}  # fmt: skip
    events = {
        "message_start": event("message_start", {"message": message(done=False)}),
        "content_block_start": event("content_block_start", {"index": index, "content_block": ref("ContentBlock")}),
        "content_block_delta": event("content_block_delta", {"index": index, "delta": deltas}),
        "content_block_stop": event("content_block_stop", {"index": index}),
        "message_delta": event("message_delta", {
            "delta": obj({"stop_reason": stop_reason, "stop_sequence": nullable(string)},
                         required=["stop_reason", "stop_sequence"]),
            "usage": obj({"output_tokens": count}, required=["output_tokens"])}),
        "message_stop": event("message_stop", {}),
        "error": ref(ERROR),
    }  # fmt: skip
    assert events.keys() == set(EVENTS)
    return {
        "Message": message(done=True),
        "ContentBlock": {"anyOf": [text, thinking, tool_use]},
        "AnthropicUsage": obj({"input_tokens": count, "output_tokens": count},
                              required=["input_tokens", "output_tokens"]),
        "MessageEvent": {"anyOf": [
            obj({"event": {"const": name}, "data": {"type": "string", "contentMediaType": "application/json",
                                                    "contentSchema": schema}}, required=["event", "data"])
            for name, schema in events.items()],
            "description": "One server-sent event, named as its data's type: message_start, then each content "
                           "block (content_block_start, its deltas, content_block_stop), message_delta and "
                           "message_stop; an error event when generation fails after the first event"},  # fmt: skip
        "TokenCount": obj({"input_tokens": count}, required=["input_tokens"]),
        ERROR: obj({"type": {"const": "error"}, "error": obj({
            "type": {"enum": sorted({*ERROR_TYPES.values(), "api_error"})}, "message": string,
            "details": obj({"error_code": {"enum": list(THREAD_ERROR_CODES)}}, required=["error_code"]),
        }, required=["type", "message"], additionalProperties=False)},
            required=["type", "error"], additionalProperties=False),  # fmt: skip
    }


def openapi_description(backend: Backend, limits: Limits = Limits(), names: ModelNames = ModelNames()) -> ApiDescription:
    """What add_anthropic_routes serves, for the OpenAPI document of this node (which names the
    models it serves)."""
    model = model_schema(backend.models(), names)
    errors = _error_responses({
        400: "a field is wrong (the message names it) or the body is not JSON; or what the schema cannot say, "
             f"with the code header: {CHAT_TEMPLATE_ERROR} (the model has no chat template, or it refused the "
             f"messages), {CONTEXT_LENGTH_EXCEEDED} (the prompt does not fit the context), {UNSUPPORTED_PREFILL}, "
             f"{CONFLICTING_FIELDS}",
        404: f"no such model here (code model_not_found), or a thread continuation of a conversation not kept "
             f"(code {THREAD_NOT_FOUND})",
        413: f"the body is larger than {limits.max_body_bytes} bytes",
        500: "generation failed",
        503: "the model cannot serve now: no plan yet, it does not fit, a node went away",
    })  # fmt: skip

    def body(name: str) -> dict[str, Any]:
        return {"required": True, **json_body(ref(name), "the request (unknown fields are ignored)")}

    paths = {
        "/v1/messages": {"post": {
            "summary": "A message (Anthropic's Messages API)",
            "requestBody": body("MessagesRequest"),
            "responses": {"200": {
                "description": "the answer; server-sent events with stream: true",
                "content": {"application/json": {"schema": ref("Message")},
                            "text/event-stream": {"schema": ref("MessageEvent")}},
            }, **errors},
        }},
        "/v1/messages/count_tokens": {"post": {
            "summary": "The prompt's tokens, tools included (Anthropic's Messages API)",
            "requestBody": body("CountTokensRequest"),
            "responses": {"200": json_body(ref("TokenCount"), "the count"), **errors},
        }},
    }  # fmt: skip
    assert set(paths) == set(PATHS)
    return ApiDescription(paths, {**_request_schemas(limits, model), **_response_schemas()})
