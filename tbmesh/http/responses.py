"""OpenAI's Responses API: POST /v1/responses and GET /v1/responses/{id} (what Codex, the OpenAI
Agents SDK and other agents speak).

Its wire format alone: input items read into chat messages (tbmesh.http.chat's form) and a
tbmesh.http.common `Generation`; the answer written as Responses output items, whole or as the
stream of typed events (`ResponsesAnswer`, an AnswerShape). Errors are OpenAI's (tbmesh.http.openai).

Stored responses (`store`, default true) are kept per daemon in a bounded LRU, for
`previous_response_id` and GET. With `store: false` and `include: ["reasoning.encrypted_content"]`
the think block goes to the client as an opaque blob (its text and an HMAC under a per-daemon key)
and comes back in a `reasoning` input item; a blob that was changed is a 400.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tbmesh.core.generation import Backend
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
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_ENCRYPTED_CONTENT,
    INVALID_TOOL_ARGUMENTS,
    PREVIOUS_RESPONSE_NOT_FOUND,
    ApiError,
    Generation,
    Limits,
    ModelNames,
    answer_events,
    bad_request,
    boolean,
    chat_tokens,
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
    type_name,
    valid_unicode,
)
from tbmesh.http.openai import error_response, error_responses
from tbmesh.http.openapi import ApiDescription, Schema, json_body, nullable, obj, ref

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

MAX_STORED = 256  # responses kept per daemon for previous_response_id and GET (least recently used go)
ENCRYPTED_REASONING = "reasoning.encrypted_content"

# Every field of OpenAI's ResponseCreateParams, by what this server does with it (as tbmesh.http.openai).
READ = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
        "tool_choice", "parallel_tool_calls", "reasoning", "include", "store", "previous_response_id", "text")
NO_EFFECT = ("user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
             "prompt_cache_options", "stream_options")  # fmt: skip
# name: (why it is refused, its values that ask for nothing)
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "background": ("background responses are not supported", (None, False)),
    "conversation": ("conversations are not supported: use previous_response_id", (None,)),
    "prompt": ("prompt templates are not supported", (None,)),
    "max_tool_calls": ("max_tool_calls is not supported", (None,)),
    "top_logprobs": ("log-probabilities are not supported on /v1/responses", (None, 0)),
    "truncation": ("only truncation \"disabled\" is supported", (None, "disabled")),
    "context_management": ("context management is not supported", (None,)),
    "background_options": ("background responses are not supported", (None,)),
    "moderation": ("moderation is not supported", (None,)),
    "image": ("image generation is not supported", (None,)),
    "access_programs": ("access programs are not supported", (None,)),
}
INCLUDABLE = (ENCRYPTED_REASONING,)  # the others (search results, image URLs, logprobs) are of what is refused


def _asks_nothing(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


# --- the reasoning's round trip through the client -------------------------------------------


class ReasoningSeal:
    """The think block as an opaque blob the client sends back: base64 of its text, and an HMAC
    of it under a key of this daemon (a blob changed, or made by another daemon, is refused)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or secrets.token_bytes(32)

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self.key, data, hashlib.sha256).digest()

    def seal(self, text: str) -> str:
        data = text.encode()
        return f"{base64.b64encode(data).decode()}.{base64.b64encode(self._mac(data)).decode()}"

    def open(self, blob: str, where: str) -> str:
        try:
            text, _, mac = blob.partition(".")
            data, tag = base64.b64decode(text, validate=True), base64.b64decode(mac, validate=True)
            if hmac.compare_digest(tag, self._mac(data)):
                return data.decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, and b64decode's of a text not ASCII
            pass
        raise bad_request("input", f"'{where}.encrypted_content' was not made by this server, or was changed",
                          INVALID_ENCRYPTED_CONTENT)


# --- parsing requests ------------------------------------------------------------------------


@dataclass
class ResponsesRequest:
    generation: Generation
    stream: bool
    messages: list[dict[str, Any]]  # this request's input (and instructions), as tbmesh.http.chat takes them
    instructions: str | None
    tools: list[dict[str, Any]] | None  # offered to the model (tool_choice applied), in chat-template form
    tool_choice: str
    parallel_tool_calls: bool
    store: bool
    encrypted_reasoning: bool
    previous_response_id: str | None
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats


def _text_of(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A message's text: a string, or an array of text parts of `kinds` (joined)."""
    if isinstance(content, str):
        return valid_unicode(content, where, "input")
    if not isinstance(content, list):
        raise bad_request("input", f"'{where}' must be a string or an array of parts, not {type_name(content)}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise bad_request("input", f"'{where}[{i}]' is not a text part ({' or '.join(kinds)}); only text is "
                                       "supported")  # fmt: skip
        texts.append(valid_unicode(part["text"], f"{where}[{i}].text", "input"))
    return "".join(texts)


def _arguments(arguments: Any, where: str) -> Any:
    if not isinstance(arguments, str):
        raise bad_request("input", f"'{where}' must be a string of JSON, not {type_name(arguments)}")
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError as error:
        raise bad_request("input", f"'{where}' is not JSON: {error}", INVALID_TOOL_ARGUMENTS) from None


def input_messages(items: Any, seal: ReasoningSeal) -> list[dict[str, Any]]:
    """The input items as chat messages: a function_call joins the assistant turn before it (or
    starts one), a reasoning item gives the next assistant turn its think block."""
    if isinstance(items, str):
        return [{"role": "user", "content": valid_unicode(items, "input", "input")}]
    if not isinstance(items, list):
        raise bad_request("input", f"'input' must be a string or an array of items, not {type_name(items)}")
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None

    def assistant_turn() -> dict[str, Any]:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or reasoning is not None:
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning is not None:
            last["reasoning_content"], reasoning = reasoning, None
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request("input", f"'{where}' must be an object, not {type_name(item)}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("developer", "system", "user", "assistant"):
                raise bad_request("input", f"'{where}.role' must be one of developer, system, user, assistant, "
                                           f"not {json.dumps(role)}")  # fmt: skip
            kinds = ("output_text", "refusal") if role == "assistant" else ("input_text",)
            text = _text_of(item.get("content"), f"{where}.content", (*kinds, "text"))
            if role == "assistant":
                turn = assistant_turn()
                turn["content"] += text
            else:  # "developer" is the newer name of "system", which chat templates know
                messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise bad_request("input", f"'{where}.name' must be a function's name")
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise bad_request("input", f"'{where}.call_id' must be a string")
            turn = assistant_turn()
            turn.setdefault("tool_calls", []).append({"id": call_id, "type": "function", "function": {
                "name": name, "arguments": _arguments(item.get("arguments"), f"{where}.arguments")}})  # fmt: skip
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise bad_request("input", f"'{where}.call_id' must be a string")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text_of(output, f"{where}.output", ("input_text", "text"))})  # fmt: skip
        elif kind == "reasoning":
            blob, summary = item.get("encrypted_content"), item.get("summary", [])
            if not isinstance(summary, list):
                raise bad_request("input", f"'{where}.summary' must be an array of summary_text parts")
            summary_text = _text_of(summary, f"{where}.summary", ("summary_text",))
            if blob is not None and not isinstance(blob, str):
                raise bad_request("input", f"'{where}.encrypted_content' must be a string")
            # the think block as the model wrote it, else its summary
            reasoning = seal.open(blob, where) if blob is not None else summary_text or None
        else:
            raise bad_request("input", f"'{where}.type' {json.dumps(kind)} is not supported: only message, "
                                       "function_call, function_call_output and reasoning")  # fmt: skip
    if reasoning is not None:  # a last reasoning item: the think block of an assistant turn with no text yet
        assistant_turn()
    return messages


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The function tools in chat-template form. Hosted tools (web_search, file_search, ...) run
    on OpenAI's servers, not here: the model is never offered them, and they fail nothing."""
    offered = body.get("tools")
    if offered is None:
        return None
    if not isinstance(offered, list):
        raise bad_request("tools", f"'tools' must be an array of tools, not {type_name(offered)}")
    tools = []
    for i, tool in enumerate(offered):
        if not isinstance(tool, dict):
            raise bad_request("tools", f"'tools[{i}]' must be an object, not {type_name(tool)}")
        if not isinstance(tool.get("type"), str):
            raise bad_request("tools", f"'tools[{i}].type' must be a string")
        if tool["type"] != "function":
            continue
        name, parameters = tool.get("name"), tool.get("parameters")
        if not isinstance(name, str) or not name:
            raise bad_request("tools", f"'tools[{i}].name' must be a function's name")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request("tools", f"'tools[{i}].parameters' must be a JSON schema object")
        if tool.get("description") is not None and not isinstance(tool["description"], str):
            raise bad_request("tools", f"'tools[{i}].description' must be a string")
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise bad_request("tools", f"'tools[{i}].strict' must be a boolean")
        function = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools or None


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> str:
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return choice or "auto"
    if choice == "required" or isinstance(choice, dict):
        raise bad_request("tool_choice", "'tool_choice': forcing a tool call (\"required\" or a named tool) is not "
                                         "supported yet: use \"auto\" or \"none\"")  # fmt: skip
    raise bad_request("tool_choice", "'tool_choice' must be \"auto\" or \"none\"")


def _reasoning(body: dict[str, Any]) -> None:
    reasoning = body.get("reasoning")
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise bad_request("reasoning", f"'reasoning' must be an object, not {type_name(reasoning)}")
    for name in reasoning:
        if name not in ("effort", "summary", "generate_summary"):
            raise bad_request("reasoning", f"'reasoning.{name}' is not a field of 'reasoning'")
    # a thinking model thinks as its chat template says: effort is a hint it takes as its own
    effort = reasoning.get("effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise bad_request("reasoning", "'reasoning.effort' must be none, minimal, low, medium, high or xhigh")
    for name in ("summary", "generate_summary"):
        if reasoning.get(name) not in (None, "auto", "concise", "detailed"):
            raise bad_request("reasoning", f"'reasoning.{name}' must be auto, concise or detailed")


def _text_format(body: dict[str, Any]) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise bad_request("text", f"'text' must be an object, not {type_name(text)}")
    if text.get("format") not in (None, {"type": "text"}):
        raise bad_request("text", "'text.format': only {\"type\": \"text\"} is supported (no JSON mode or schema)")
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request("text", "'text.verbosity': only \"medium\" is supported")
    unknown = [name for name in text if name not in ("format", "verbosity")]
    if unknown:
        raise bad_request("text", f"'text.{unknown[0]}' is not a field of 'text'")


def parse_request(body: Any, limits: Limits, seal: ReasoningSeal) -> ResponsesRequest:
    """Check a request body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type_name(body)}")
    unknown = [name for name in body if name not in READ and name not in NO_EFFECT and name not in UNSUPPORTED]
    if unknown:  # OpenAI's own words
        raise bad_request(unknown[0], f"Unrecognized request argument{'s' if len(unknown) > 1 else ''} supplied: "
                                      f"{', '.join(unknown)}")  # fmt: skip
    for name, (why, neutral) in UNSUPPORTED.items():
        if name in body and not _asks_nothing(body[name], neutral):
            raise bad_request(name, f"'{name}': {why}")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model", "'model' is required (GET /v1/models lists them)" if model is None else
                                   f"'model' must be a string, not {type_name(model)}")  # fmt: skip
    if "input" not in body:
        raise bad_request("input", "'input' is required")
    max_tokens = integer(body, "max_output_tokens", 1, limits.max_tokens)
    temperature = number(body, "temperature", 0.0, 2.0)
    top_p = number(body, "top_p", 0.0, 1.0)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("instructions", f"'instructions' must be a string, not {type_name(instructions)}")
    include = [] if body.get("include") is None else body["include"]
    if not isinstance(include, list) or not all(isinstance(name, str) for name in include):
        raise bad_request("include", "'include' must be an array of strings")
    for name in include:
        if name not in INCLUDABLE:
            raise bad_request("include", f"'include': {name!r} is not supported; only {', '.join(INCLUDABLE)}")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise bad_request("previous_response_id", f"'previous_response_id' must be a string, not {type_name(previous)}")
    if body["input"] == [] and previous is None:
        raise bad_request("input", "'input' is empty, and there is no previous response")
    _reasoning(body)
    _text_format(body)
    tools = _tools(body)
    tool_choice = _tool_choice(body, tools)
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise bad_request("store", f"'store' must be a boolean, not {type_name(store)}")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls", f"'parallel_tool_calls' must be a boolean, not {type_name(parallel)}")
    sampling = request_sampling(1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p)
    generation = Generation(model, limits.default_max_tokens if max_tokens is None else max_tokens, sampling, [],
                            max_tokens_strict=max_tokens is not None)  # fmt: skip
    messages = input_messages(body["input"], seal)
    echo = {"instructions": instructions, "max_output_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "tools": [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"],
            "metadata": body.get("metadata") or {}, "text": {"format": {"type": "text"}},
            "truncation": "disabled", "user": body.get("user")}  # fmt: skip
    return ResponsesRequest(generation, boolean(body, "stream"), messages, instructions,
                            None if tool_choice == "none" else tools, tool_choice,
                            True if parallel is None else parallel, True if store is None else store,
                            ENCRYPTED_REASONING in include, previous, echo)  # fmt: skip


# --- stored responses ------------------------------------------------------------------------


@dataclass
class StoredResponse:
    response: dict[str, Any]  # as GET /v1/responses/{id} answers it
    messages: list[dict[str, Any]]  # the conversation to here, the answer included (without instructions)


class ResponseStore:
    """The responses of this daemon, the least recently used dropped beyond `size`."""

    def __init__(self, size: int = MAX_STORED) -> None:
        self.size = size
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self.responses.get(response_id)
        if stored is not None:
            self.responses.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.responses[response_id] = stored
        while len(self.responses) > self.size:
            self.responses.popitem(last=False)


RESPONSE_NOT_FOUND = "response_not_found"  # GET of an id not stored (or no longer)


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", code=RESPONSE_NOT_FOUND)


# --- answers ---------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesAnswer:
    """One answer as a Responses object, whole or as its stream of events (a
    tbmesh.http.common.AnswerShape). Output items: a reasoning item (the think block, as its
    summary), a message (the text), function calls, in the order the model wrote them."""

    media_type = "text/event-stream"

    def __init__(self, request: ResponsesRequest, reader: ChatReader, seal: ReasoningSeal,
                 history: list[dict[str, Any]], store: ResponseStore) -> None:  # fmt: skip
        self.request = request
        self.reader = reader
        self.seal = seal
        self.history = history  # the conversation before the answer
        self.store = store
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []  # the items, finished or open
        self.open: dict[str, Any] | None = None  # the item being written (a reasoning or a message)
        self.sequence = 0
        self.calls = 0
        self.started = False  # the stream's first events went out
        self.think_block = ""  # as the model wrote it (a summary is shown stripped)

    # the response object

    def _response(self, status: str) -> dict[str, Any]:
        incomplete = status == "incomplete"
        response = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                    "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                    "model": self.request.generation.model, "output": self.output,
                    "parallel_tool_calls": self.request.parallel_tool_calls, "tool_choice": self.request.tool_choice,
                    "previous_response_id": self.request.previous_response_id, "store": self.request.store,
                    **self.request.echo, "usage": None}  # fmt: skip
        if status in ("completed", "incomplete"):
            response["usage"] = {"input_tokens": self.reader.prompt_tokens,
                                 "input_tokens_details": {"cached_tokens": 0},
                                 "output_tokens": self.reader.completion_tokens,
                                 "output_tokens_details": {"reasoning_tokens": 0},  # not counted apart
                                 "total_tokens": self.reader.prompt_tokens + self.reader.completion_tokens}
        return response

    def _final(self) -> dict[str, Any]:
        response = self._response("incomplete" if self.reader.finish_reason == "length" else "completed")
        if self.request.store:
            self.store.put(self.id, StoredResponse(json.loads(json.dumps(response)), self._conversation()))
        return response

    def _conversation(self) -> list[dict[str, Any]]:
        """The conversation with the answer as one assistant turn (for previous_response_id)."""
        turn: dict[str, Any] = {"role": "assistant", "content": ""}
        if self.think_block:
            turn["reasoning_content"] = self.think_block
        for item in self.output:
            if item["type"] == "message":
                turn["content"] += item["content"][0]["text"]
            elif item["type"] == "function_call":
                turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                    "name": item["name"], "arguments": json.loads(item["arguments"])}})  # fmt: skip
        return [*self.history, turn]

    # items

    def _new_item(self, kind: str) -> dict[str, Any]:
        if kind == "reasoning":
            return {"type": "reasoning", "id": _id("rs"), "summary": [], "_text": ""}
        return {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}

    def _finished(self, item: dict[str, Any]) -> dict[str, Any]:
        """The item as the client sees it once whole."""
        shown = {k: v for k, v in item.items() if not k.startswith("_")}
        if item["type"] == "reasoning":
            # the summary is for people to read: the think block without the newlines around it
            shown["summary"] = [{"type": "summary_text", "text": item["_text"].strip()}]
            if self.request.encrypted_reasoning:
                shown["encrypted_content"] = self.seal.seal(item["_text"])
            self.think_block += item["_text"]
        elif item["type"] == "message":
            shown["status"] = "completed"
        return shown

    def _call(self, call: ToolCall) -> dict[str, Any]:
        return {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": call.name,
                "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": "completed"}

    def _wanted(self, event: Event) -> bool:
        """Whether the event goes into the answer: with parallel_tool_calls false, the first call only."""
        if isinstance(event, ToolCall):
            self.calls += 1
            return self.request.parallel_tool_calls or self.calls == 1
        return isinstance(event, (Text, Reasoning))

    def whole(self, events: list[Event]) -> dict[str, Any]:
        for event in events:
            if not self._wanted(event):
                continue
            if isinstance(event, ToolCall):
                self.open = None
                self.output.append(self._call(event))
                continue
            kind = "reasoning" if isinstance(event, Reasoning) else "message"
            if self.open is None or self.open["type"] != kind:
                self.open = self._new_item(kind)
                if kind == "message":
                    self.open["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                self.output.append(self.open)
            if kind == "reasoning":
                self.open["_text"] += event.text
            else:
                self.open["content"][0]["text"] += event.text
        self.output = [self._finished(item) if item["type"] != "function_call" else item for item in self.output]
        return self._final()

    # the stream

    def _sse(self, kind: str, data: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def _item_shown(self, item: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in item.items() if not k.startswith("_")}

    def opening(self) -> bytes:
        return b""  # respond() asks for it after the first event: that event starts the stream (_start)

    def _start(self) -> bytes:
        """response.created and response.in_progress, before the stream's first other event."""
        if self.started:
            return b""
        self.started = True
        return (self._sse("response.created", {"response": self._response("in_progress")})
                + self._sse("response.in_progress", {"response": self._response("in_progress")}))

    def _close_open(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = self.output.index(item)
        ids = {"item_id": item["id"], "output_index": index}
        data = b""
        if item["type"] == "reasoning":
            text = item["_text"]
            data += self._sse("response.reasoning_summary_text.done", {**ids, "summary_index": 0, "text": text})
            data += self._sse("response.reasoning_summary_part.done",
                              {**ids, "summary_index": 0, "part": {"type": "summary_text", "text": text}})
        else:
            part = item["content"][0]
            data += self._sse("response.output_text.done", {**ids, "content_index": 0, "text": part["text"],
                                                            "logprobs": []})
            data += self._sse("response.content_part.done", {**ids, "content_index": 0, "part": part})
        self.output[index] = self._finished(item)
        return data + self._sse("response.output_item.done", {"output_index": index, "item": self.output[index]})

    def _open_item(self, kind: str) -> bytes:
        item = self._new_item(kind)
        self.output.append(item)
        self.open = item
        ids = {"item_id": item["id"], "output_index": len(self.output) - 1}
        data = self._sse("response.output_item.added", {"output_index": ids["output_index"],
                                                        "item": self._item_shown(item)})
        if kind == "reasoning":
            return data + self._sse("response.reasoning_summary_part.added",
                                    {**ids, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        data += self._sse("response.content_part.added", {**ids, "content_index": 0, "part": dict(part)})
        item["content"].append(part)
        return data

    def event(self, event: Event) -> bytes:
        if not self._wanted(event):
            return b""
        if isinstance(event, ToolCall):
            data = self._start() + self._close_open()
            call = self._call(event)
            index = len(self.output)
            self.output.append(call)
            ids = {"item_id": call["id"], "output_index": index}
            data += self._sse("response.output_item.added", {"output_index": index,
                                                             "item": {**call, "arguments": "", "status": "in_progress"}})
            data += self._sse("response.function_call_arguments.delta", {**ids, "delta": call["arguments"]})
            data += self._sse("response.function_call_arguments.done", {**ids, "name": call["name"],
                                                                        "arguments": call["arguments"]})
            return data + self._sse("response.output_item.done", {"output_index": index, "item": call})
        kind = "reasoning" if isinstance(event, Reasoning) else "message"
        data = self._start()
        if self.open is None or self.open["type"] != kind:
            data += self._close_open() + self._open_item(kind)
        assert self.open is not None
        ids = {"item_id": self.open["id"], "output_index": len(self.output) - 1}
        if kind == "reasoning":
            self.open["_text"] += event.text
            return data + self._sse("response.reasoning_summary_text.delta", {**ids, "summary_index": 0,
                                                                              "delta": event.text})
        self.open["content"][0]["text"] += event.text
        return data + self._sse("response.output_text.delta", {**ids, "content_index": 0, "delta": event.text,
                                                               "logprobs": []})

    def closing(self) -> bytes:
        data = self._start() + self._close_open()
        response = self._final()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return data + self._sse(kind, {"response": response})

    def error_event(self, error: ApiError) -> bytes:
        return self._sse("error", {"code": error.code or error.type, "message": error.message, "param": error.param})

    def error_response(self, error: ApiError) -> web.Response:
        return error_response(error)


# --- routes ----------------------------------------------------------------------------------


def prompt_tokens(tokenizer: TokenizerWrapper, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  context: int | None, limits: Limits) -> list[int]:  # fmt: skip
    if not tokenizer.has_chat_template:
        raise bad_request("input", "the model has no chat template: use /v1/completions", CHAT_TEMPLATE_ERROR)
    check_prompt_size(text_size(messages, tools), context, limits, "input")
    return chat_tokens(tokenizer, messages, tools, "input")


def add_responses_routes(app: web.Application, backend: Backend, limits: Limits = Limits(),
                         names: ModelNames = ModelNames()) -> None:
    """Add POST /v1/responses and GET /v1/responses/{id}, with this app's store and key."""
    store = ResponseStore()
    seal = ReasoningSeal()

    async def create(request: web.Request) -> web.StreamResponse:
        try:
            asked = await read_request(request, limits, lambda body: parse_request(body, limits, seal))
            history: list[dict[str, Any]] = []
            if asked.previous_response_id is not None:
                previous = store.get(asked.previous_response_id)
                if previous is None:
                    # OpenAI's 400 (it is a field of the request at fault)
                    raise bad_request("previous_response_id", f"Previous response with id "
                                      f"'{asked.previous_response_id}' not found.", PREVIOUS_RESPONSE_NOT_FOUND)
                history = previous.messages
            conversation = [*history, *asked.messages]
            # instructions stand first, and are not carried over from a previous response (as OpenAI)
            messages = ([{"role": "system", "content": asked.instructions}] if asked.instructions else []) + conversation
            model = check_served(backend, asked.generation.model, names)
            asked.generation = replace(asked.generation, model=model)
            context = backend.context(model)

            def tokenize() -> tuple[TokenizerWrapper, list[int]]:
                tokenizer = backend.tokenizer(model)
                return tokenizer, prompt_tokens(tokenizer, messages, asked.tools, context, limits)

            tokenizer, prompt = await in_worker(tokenize)
            asked.generation = fit_context(asked.generation, len(prompt), context, "input", "max_output_tokens")
        except Exception as error:
            return error_response(failure(error))
        reader = ChatReader(tokenizer, prompt, (), asked.tools)
        events = answer_events(request, backend, asked.generation, prompt, reader)
        return await respond(request, events, ResponsesAnswer(asked, reader, seal, conversation, store), asked.stream)

    async def get(request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        stored = store.get(response_id)
        if stored is None:
            return error_response(not_found(response_id))
        return web.json_response(stored.response)

    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{response_id}", get)



# --- the OpenAPI description -----------------------------------------------------------------

EVENT_TYPES = ("response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.reasoning_summary_part.added",
               "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
               "response.reasoning_summary_part.done", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done", "response.completed",
               "response.incomplete", "error")  # fmt: skip


def _request_schema(limits: Limits, model: Schema) -> Schema:
    """The request body as parse_request checks it: every field of OpenAI's, no other."""
    text, string = {"type": "string"}, {"type": "string"}

    def parts(*kinds: str) -> Schema:
        return {"anyOf": [text, {"type": "array", "items": obj({"type": {"enum": [*kinds, "text"]}, "text": string},
                                                               required=["type", "text"])}]}  # fmt: skip

    message = obj({"type": {"const": "message"}, "role": {"enum": ["developer", "system", "user"]},
                   "content": parts("input_text")}, required=["role", "content"])  # fmt: skip
    answer = obj({"type": {"const": "message"}, "role": {"const": "assistant"},
                  "content": parts("output_text", "refusal")}, required=["role", "content"])  # fmt: skip
    call = obj({"type": {"const": "function_call"}, "call_id": string, "name": {"type": "string", "minLength": 1},
                "arguments": {"type": "string", "description": f"JSON (code {INVALID_TOOL_ARGUMENTS} if not)"}},
               required=["type", "call_id", "name", "arguments"])  # fmt: skip
    output = obj({"type": {"const": "function_call_output"}, "call_id": string, "output": parts("input_text")},
                 required=["type", "call_id", "output"])  # fmt: skip
    reasoning = obj({"type": {"const": "reasoning"},
                     "summary": {"type": "array", "items": obj({"type": {"const": "summary_text"}, "text": string},
                                                               required=["type", "text"])},
                     "encrypted_content": nullable({"type": "string", "description": (
                         f"as this server made it (code {INVALID_ENCRYPTED_CONTENT} if not): the think block")})},
                    required=["type"])  # fmt: skip
    function = obj({"type": {"const": "function"}, "name": {"type": "string", "minLength": 1},
                    "description": nullable(string), "parameters": nullable({"type": "object"}),
                    "strict": nullable({"type": "boolean"})}, required=["type", "name"])  # fmt: skip
    hosted = obj({"type": {"type": "string", "not": {"const": "function"}}}, required=["type"],
                 description="a hosted tool (web_search, file_search, ...): never offered to the model")
    fields: dict[str, Schema] = {
        "model": model,
        "input": {"anyOf": [text, {"type": "array", "minItems": 1,
                                   "items": {"anyOf": [message, answer, call, output, reasoning]}}]},
        "instructions": nullable(string),
        "max_output_tokens": nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens}),
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "stream": nullable({"type": "boolean"}),
        "tools": nullable({"type": "array", "items": {"anyOf": [function, hosted]}}),
        "tool_choice": nullable({"enum": ["auto", "none"], "description": "forcing a call is not supported yet"}),
        "parallel_tool_calls": nullable({"type": "boolean", "description": "false: the first call only"}),
        "reasoning": nullable(obj({"effort": nullable({"enum": ["none", "minimal", "low", "medium", "high", "xhigh"],
                                                       "description": "the model thinks as its chat template says"}),
                                   "summary": nullable({"enum": ["auto", "concise", "detailed"]}),
                                   "generate_summary": nullable({"enum": ["auto", "concise", "detailed"]})},
                                  additionalProperties=False)),
        "include": nullable({"type": "array", "items": {"enum": list(INCLUDABLE)}}),
        "store": nullable({"type": "boolean", "description": "kept for previous_response_id and GET (default true)"}),
        "previous_response_id": nullable({"type": "string", "description": (
            f"a stored response of this node (code {PREVIOUS_RESPONSE_NOT_FOUND} if not)")}),
        "text": nullable(obj({"format": nullable(obj({"type": {"const": "text"}}, required=["type"],
                                                     additionalProperties=False)),
                              "verbosity": nullable({"const": "medium"})}, additionalProperties=False)),
        **{name: {"enum": list(neutral), "description": f"{why}: only a value that asks for nothing"}
           for name, (why, neutral) in UNSUPPORTED.items()},
        **{name: {"description": "accepted: it changes nothing of the answer"} for name in NO_EFFECT},
    }  # fmt: skip
    return obj(fields, required=["model", "input"], additionalProperties=False)


def _response_schemas() -> dict[str, Schema]:
    string, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    output_text = obj({"type": {"const": "output_text"}, "text": string, "annotations": {"type": "array"},
                       "logprobs": {"type": "array"}}, required=["type", "text"])  # fmt: skip
    item = {"anyOf": [
        obj({"type": {"const": "message"}, "id": string, "role": {"const": "assistant"},
             "status": {"enum": ["in_progress", "completed"]}, "content": {"type": "array", "items": output_text}},
            required=["type", "id", "role", "status", "content"]),
        obj({"type": {"const": "reasoning"}, "id": string, "summary": {"type": "array", "items": obj(
            {"type": {"const": "summary_text"}, "text": string}, required=["type", "text"])},
             "encrypted_content": string}, required=["type", "id", "summary"]),
        obj({"type": {"const": "function_call"}, "id": string, "call_id": string, "name": string,
             "arguments": string, "status": {"enum": ["in_progress", "completed"]}},
            required=["type", "id", "call_id", "name", "arguments"]),
    ]}  # fmt: skip
    usage = obj({"input_tokens": count, "input_tokens_details": obj({"cached_tokens": count}),
                 "output_tokens": count, "output_tokens_details": obj({"reasoning_tokens": count}),
                 "total_tokens": count}, required=["input_tokens", "output_tokens", "total_tokens"])  # fmt: skip
    response = obj({"id": string, "object": {"const": "response"}, "created_at": {"type": "integer"},
                    "status": {"enum": ["in_progress", "completed", "incomplete"]}, "model": string,
                    "output": {"type": "array", "items": ref("ResponseOutputItem")},
                    "usage": nullable(usage), "previous_response_id": nullable(string)},
                   required=["id", "object", "created_at", "status", "model", "output"])  # fmt: skip
    event = obj({"type": {"enum": list(EVENT_TYPES)}, "sequence_number": count, "response": ref("Response"),
                 "item": ref("ResponseOutputItem"), "output_index": count, "item_id": string,
                 "delta": string, "text": string, "arguments": string, "message": string},
                required=["type", "sequence_number"])  # fmt: skip
    return {"Response": response, "ResponseOutputItem": item, "ResponseStreamEvent": event}


def openapi_description(backend: Backend, limits: Limits = Limits(), names: ModelNames = ModelNames()) -> ApiDescription:
    """What add_responses_routes serves, for the node's OpenAPI document."""
    model: Schema = model_schema(backend.models(), names)
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": ref("ResponseStreamEvent")}
    event = obj({"event": {"type": "string", "description": "the event's type"}, "data": data}, required=["data"],
                description="One event, typed; the last is response.completed (or response.incomplete at "
                            "max_output_tokens), or an error event when generation fails after the first")
    stream = {"text/event-stream": {"schema": event}}
    post = {
        "summary": "A response (OpenAI's Responses API)",
        "requestBody": {"required": True, **json_body(_request_schema(limits, model),
                                                      "the request (a field OpenAI's API does not have is a 400)")},
        "responses": {
            "200": {"description": "the response; server-sent events with stream: true",
                    "content": {"application/json": {"schema": ref("Response")}, **stream}},
            **error_responses({
                400: "a field is wrong (`param` names it) or the body is not JSON; or code "
                     f"{CONTEXT_LENGTH_EXCEEDED}, {CHAT_TEMPLATE_ERROR}, {INVALID_TOOL_ARGUMENTS}, "
                     f"{INVALID_ENCRYPTED_CONTENT} (a reasoning item's blob not made here, or changed), "
                     f"{PREVIOUS_RESPONSE_NOT_FOUND}",
                404: "no such model here (code model_not_found)",
                413: f"the body is larger than {limits.max_body_bytes} bytes",
                500: "generation failed (type server_error)",
                503: "the model cannot serve now (type service_unavailable)",
            }),
        },
    }  # fmt: skip
    get = {
        "summary": "A stored response",
        "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": json_body(ref("Response"), "the response"),
                      **error_responses({404: f"no such response stored here (code {RESPONSE_NOT_FOUND})"})},
    }  # fmt: skip
    return ApiDescription({"/v1/responses": {"post": post}, "/v1/responses/{response_id}": {"get": get}},
                          _response_schemas())
