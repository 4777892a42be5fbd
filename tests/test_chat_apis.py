"""The agents' fields of the OpenAI and Anthropic APIs over one aiohttp server and LocalBackend
on the taught model: what tool_choice offers the model, logprobs, and every bad input answered
with the API's own error shape and a 4xx naming the field."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema_rs
import mlx.core as mx
import mlx_lm
import openai
import pytest
from api_server import ApiServer, SteeredBackend
from mlx_lm.generate import generate_step
from typer.testing import CliRunner

from tbmesh.cli.main import app
from tbmesh.core.generation import Unavailable
from tbmesh.http.common import Limits, ModelNames
from tbmesh.testbed.teach import CONVERSATIONS, WEATHER_TOOL

MODEL = "taught"
WEATHER = [{"role": "user", "content": "What is the weather in Oslo?"}]
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                               "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
MESSAGE = {"model": MODEL, "max_tokens": 8, "messages": WEATHER}


@pytest.fixture(scope="module")
def server(taught_model: Path) -> Iterator[ApiServer]:
    with SteeredBackend(taught_model) as backend, ApiServer(backend, Limits(max_body_bytes=64 * 1024)) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer(taught_model: Path) -> Any:
    return mlx_lm.load(str(taught_model))[1]


def rendered(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    return len(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))


@pytest.mark.parametrize("tool_choice, offered", [
    (None, [WEATHER_TOOL, CLOCK_TOOL]), ("auto", [WEATHER_TOOL, CLOCK_TOOL]), ("required", [WEATHER_TOOL, CLOCK_TOOL]),
    ("none", None), ({"type": "function", "function": {"name": "get_time"}}, [CLOCK_TOOL]),
])  # fmt: skip
def test_tool_choice_decides_which_tools_the_template_offers(server, tokenizer, tool_choice, offered) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    answer = client.chat.completions.create(model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL, CLOCK_TOOL],
                                            max_tokens=1, **extra)  # fmt: skip
    assert answer.usage.prompt_tokens == rendered(tokenizer, WEATHER, offered)


@pytest.mark.parametrize("tool_choice, offered", [
    ({"type": "auto"}, True), ({"type": "any"}, True), ({"type": "none"}, False), ({"type": "tool", "name": "get_weather"}, True),
])  # fmt: skip
def test_anthropic_tool_choice_and_system_through_the_template(server, tokenizer, tool_choice, offered) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    tool = {"name": "get_weather", "description": "The weather now in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"]}  # fmt: skip
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=WEATHER, tools=[tool],
                                           tool_choice=tool_choice).input_tokens  # fmt: skip
    system = [{"role": "system", "content": "Be brief."}]
    assert counted == rendered(tokenizer, system + WEATHER, [WEATHER_TOOL] if offered else None)


def test_local_logprobs_are_mlx_lms_and_max_completion_tokens_cuts(server, taught_model: Path) -> None:
    model, tokenizer = mlx_lm.load(str(taught_model))
    messages = CONVERSATIONS[3]["messages"][:1]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    steps = list(generate_step(mx.array(prompt), model, max_tokens=6))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2)  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert [e.token for e in content] == [tokenizer.decode([token]) for token, _ in steps]
    for entry, (token, logprobs) in zip(content, steps):
        assert math.isclose(entry.logprob, logprobs[token].item(), abs_tol=1e-4)
        best = mx.argsort(-logprobs)[:2].tolist()
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in best]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None
    assert (plain.usage.completion_tokens, plain.choices[0].finish_reason) == (3, "length")


CHAT = {"model": MODEL, "messages": WEATHER}
CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                              "function": {"name": "f", "arguments": "{oops"}}]}  # fmt: skip


@pytest.mark.parametrize("body, param, words", [
    ({**CHAT, "tools": {"type": "function"}}, "tools", "'tools' must be an array"),
    ({**CHAT, "tools": [{"type": "retrieval"}]}, "tools", "'tools[0]' must be a function tool"),
    ({**CHAT, "tools": [{"type": "function", "function": {}}]}, "tools", "'tools[0].function' must be an object with a name"),
    ({**CHAT, "tool_choice": "auto"}, "tool_choice", "only allowed when 'tools' are given"),
    ({**CHAT, "tools": [WEATHER_TOOL], "tool_choice": "always"}, "tool_choice", "'tool_choice' must be"),
    ({**CHAT, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": "f"}}, "tool_choice", "'tool_choice' must be"),
    ({**CHAT, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice", "'x'"),
    ({**CHAT, "messages": [*WEATHER, CALL]}, "messages", "'messages[1].tool_calls[0].function.arguments' is not JSON"),
    ({**CHAT, "messages": [*WEATHER, {**CALL, "tool_calls": [{"id": "c"}]}]}, "messages", "'messages[1].tool_calls[0]' must"),
    ({**CHAT, "logprobs": "yes"}, "logprobs", "'logprobs' must be a boolean"),
    ({**CHAT, "top_logprobs": 3}, "top_logprobs", "needs 'logprobs': true"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
    ({**CHAT, "n": 3}, "n", "only n=1"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format", "'response_format' must be"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format", "the JSON schema is not valid"),
    ({**CHAT, "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({**CHAT, "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({**CHAT, "functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ({"model": MODEL, "prompt": "Hi", "logprobs": 2}, "logprobs", "not supported on /v1/completions"),
    ({**CHAT, "reasoning_effort": "high"}, "reasoning_effort", "reasoning effort is not supported"),
    ({**CHAT, "top_k": 5}, "top_k", "Unrecognized request argument supplied: top_k"),
    ({"model": MODEL, "prompt": "Hi", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"model": MODEL, "prompt": "Hi", "echo": True}, "echo", "not supported"),
    ({"model": MODEL, "prompt": "Hi", "best_of": 2}, "best_of", "only best_of=1"),
])  # fmt: skip
def test_bad_openai_fields_are_400s_naming_the_field(server, body, param, words) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, answer = server.post(path, body)
    assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


@pytest.mark.parametrize("body, words", [
    ({"model": MODEL, "messages": WEATHER}, "'max_tokens' is required"),
    ({**MESSAGE, "max_tokens": "8"}, "'max_tokens' must be an integer"),
    ({**MESSAGE, "model": 5}, "'model' is required: a string"),
    ({**MESSAGE, "messages": []}, "'messages' is required"),
    ({**MESSAGE, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role: Unexpected role \"tool\". The input message role must be `user`, `assistant` or `system`."),
    ({**MESSAGE, "messages": [*WEATHER, {"role": "system", "content": 5}, *WEATHER]}, "'messages[1].content' must be a string or an array of text blocks"),
    ({**MESSAGE, "messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string or an array"),
    ({**MESSAGE, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image blocks are not supported"),
    ({**MESSAGE, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]},
     "'messages[0].content[0].content' must be a string or an array of text blocks"),
    ({**MESSAGE, "messages": [*WEATHER, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}, *WEATHER]},
     "'messages[1].content[0].input' must be an object"),
    ({**MESSAGE, "system": 5}, "'system' must be a string or an array of text blocks"),
    ({**MESSAGE, "messages": [{"role": "user", "content": []}]}, "'messages[0].content' is empty"),
    ({**MESSAGE, "messages": [*WEATHER, {"role": "assistant", "content": "It is"}]}, "a prefill to continue) is not supported"),
    ({**MESSAGE, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "'messages[0].content[0].text' must be a string"),
    ({**MESSAGE, "temperature": 1.5}, "'temperature' must be 0 to 1"),
    ({**MESSAGE, "top_k": 5}, "'top_k' is not supported"),
    ({**MESSAGE, "stop_sequences": "x"}, "'stop_sequences' must be an array of strings"),
    ({**MESSAGE, "stream": "yes"}, "'stream' must be a boolean"),
    ({**MESSAGE, "tools": [{"name": "f"}]}, "'tools[0].input_schema' must be a JSON schema object"),
    ({**MESSAGE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({**MESSAGE, "tool_choice": {"type": "tool", "name": "f"}}, "names the tool 'f', which is not in 'tools'"),
    ({**MESSAGE, "tool_choice": "auto"}, "'tool_choice' must be"),
    ({**MESSAGE, "thinking": "on"}, "'thinking' must be an object"),
    ({**MESSAGE, "messages": [{"role": "user", "content": "\ud800"}]}, "lone surrogate"),
    ([1, 2], "the request body must be a JSON object"),
])  # fmt: skip
def test_bad_anthropic_requests_are_400s_in_anthropics_shape(server, body, words) -> None:
    status, answer = server.post("/v1/messages", body)
    assert status == 400 and answer["type"] == "error", answer
    assert answer["error"]["type"] == "invalid_request_error" and words in answer["error"]["message"], answer


def test_anthropic_thinking_and_a_tool_result_without_content_are_read(server, tokenizer) -> None:
    """An assistant turn's thinking block goes to the template as its reasoning; a tool_result
    with no content is an empty result."""
    turn = {"role": "assistant", "content": [{"type": "thinking", "thinking": "Oslo.", "signature": ""},
                                             {"type": "tool_use", "id": "t1", "name": "get_weather",
                                              "input": {"city": "Oslo"}}]}  # fmt: skip
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}
    status, count = server.post("/v1/messages/count_tokens", {"model": MODEL, "messages": [*WEATHER, turn, result]})
    rendered_turn = {"role": "assistant", "content": "", "reasoning_content": "Oslo.", "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    expected = rendered(tokenizer, [*WEATHER, rendered_turn, {"role": "tool", "tool_call_id": "t1", "content": ""}], None)
    assert status == 200 and count == {"input_tokens": expected}, count


def _post(server: ApiServer, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
    """The status, the JSON body and the headers of a POST."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read()), error.headers


def test_a_last_assistant_message_is_refused_where_the_api_would_continue_it(server, tokenizer) -> None:
    """README, *Running a model* (`unsupported_prefill`): a last assistant message is refused on
    the Anthropic and Ollama APIs, which would continue it (this server's chat template would
    start a new turn after it), and answered with the next turn on the OpenAI API, as OpenAI's is."""
    conversation = [*WEATHER, {"role": "assistant", "content": "It is"}]
    status, answer, headers = _post(server, "/v1/messages", {**MESSAGE, "messages": conversation})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    assert headers["X-Tbmesh-Error-Code"] == "unsupported_prefill" and "not supported" in answer["error"]["message"]
    status, answer, headers = _post(server, "/api/chat", {"model": MODEL, "messages": conversation, "stream": False})
    assert status == 400 and "Ollama continues" in answer["error"], answer
    assert headers["X-Tbmesh-Error-Code"] == "unsupported_prefill"
    status, answer, _ = _post(server, "/v1/chat/completions", {**CHAT, "messages": conversation, "max_tokens": 1})
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == rendered(tokenizer, conversation, None)  # a new turn after it


def test_anthropic_errors_beyond_400_keep_anthropics_shape(server) -> None:
    status, answer = server.post("/v1/messages", None, raw=b"{not json")
    assert status == 400 and answer["error"]["type"] == "invalid_request_error" and "not valid JSON" in answer["error"]["message"]
    status, answer = server.post("/v1/messages", None, raw=json.dumps({**MESSAGE, "system": "x" * 70_000}).encode())
    assert status == 413 and answer["error"]["type"] == "request_too_large"
    status, answer = server.post("/v1/messages", {**MESSAGE, "model": "claude-sonnet-4"})
    assert status == 404 and answer["error"]["type"] == "not_found_error" and "'claude-sonnet-4'" in answer["error"]["message"]
    status, answer = server.post("/v1/messages", {**MESSAGE, "max_tokens": 8})
    assert status == 200 and answer["type"] == "message"  # and the server still answers


def test_tbmesh_chat_shows_the_think_block_as_the_model_wrote_it(server, taught_model: Path) -> None:
    question = CONVERSATIONS[1]["messages"][0]["content"]
    model, tokenizer = mlx_lm.load(str(taught_model))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    raw = mlx_lm.generate(model, tokenizer, prompt, max_tokens=100)
    assert raw.startswith("<think>\n40 GB") and "</think>\n\nYou need three Macs." in raw
    result = subprocess.run([sys.executable, "-m", "tbmesh", "chat", question, "--api", server.url, "--temperature", "0"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stdout == raw + "\n", result.stderr


def test_anthropic_max_tokens_is_a_ceiling_within_the_context(server, tokenizer) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    prompt = rendered(tokenizer, WEATHER, None)
    try:
        server.backend.room = prompt + 4  # what the cluster's --context leaves this request
        with client.messages.stream(model=MODEL, max_tokens=64000, messages=WEATHER) as stream:  # as Claude Code asks
            cut = stream.get_final_message()
        assert (cut.stop_reason, cut.usage.output_tokens) == ("max_tokens", 4)
        server.backend.room = prompt
        with pytest.raises(anthropic.BadRequestError) as raised:
            client.messages.create(model=MODEL, max_tokens=10, messages=WEATHER)
        # Anthropic's words, which Claude Code compacts on (and reads the numbers of)
        assert raised.value.body["error"] == {"type": "invalid_request_error",
                                              "message": f"prompt is too long: {prompt} tokens > {prompt} maximum"}
        assert raised.value.response.headers["X-Tbmesh-Error-Code"] == "context_length_exceeded"
        # Ollama's words (as it refuses an input longer than the context with truncate false)
        status, answer, headers = _post(server, "/api/chat", {"model": MODEL, "messages": WEATHER, "stream": False})
        assert (status, answer) == (400, {"error": "the input length exceeds the context length "
                                                   f"({prompt} tokens; the context is {prompt})"})
        assert headers["X-Tbmesh-Error-Code"] == "context_length_exceeded"
        server.backend.room = prompt + 2
        status, answer, _ = _post(server, "/api/chat", {"model": MODEL, "messages": WEATHER, "stream": False,
                                                        "options": {"num_predict": 10}})  # fmt: skip
        assert (status, answer) == (400, {"error": f"the input length and num_predict exceed the context length "
                                                   f"({prompt} + 10 tokens; the context is {prompt + 2}): lower "
                                                   "num_predict to at most 2"})
        server.backend.room = prompt
        # count_tokens counts whatever the length: clients count to learn whether a prompt fits
        assert client.messages.count_tokens(model=MODEL, messages=WEATHER).input_tokens == prompt
        server.backend.room = 2
        assert client.messages.count_tokens(model=MODEL, messages=WEATHER).input_tokens == prompt
    finally:
        server.backend.reset()


def test_anthropic_system_messages_stand_where_they_are_sent(server, taught_model: Path) -> None:
    """Claude Code sends system messages inside `messages`: they go through the chat template
    where they stand, and the answer is single-process mlx-lm's on that prompt."""
    model, tokenizer = mlx_lm.load(str(taught_model))
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    reply = {"role": "assistant", "content": "Rainy."}
    later = {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]}
    conversation = [*WEATHER, reply, later, *WEATHER]
    expected = tokenizer.apply_chat_template([*WEATHER, reply, {"role": "system", "content": "Answer in one word."},
                                              *WEATHER], add_generation_prompt=True)  # fmt: skip
    assert client.messages.count_tokens(model=MODEL, system="Be brief.", messages=conversation).input_tokens == \
        len(tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *WEATHER, reply,
                                           {"role": "system", "content": "Answer in one word."}, *WEATHER],
                                          add_generation_prompt=True))  # fmt: skip
    answer = client.messages.create(model=MODEL, max_tokens=6, messages=conversation, extra_body={"temperature": 0})
    steps = [token for token, _ in generate_step(mx.array(expected), model, max_tokens=6)]
    assert answer.usage.input_tokens == len(expected)
    assert answer.usage.output_tokens == len(steps) or answer.stop_reason == "end_turn"
    text = "".join(block.text for block in answer.content if block.type == "text")
    assert text in tokenizer.decode(steps), (text, tokenizer.decode(steps))


def test_anthropic_failures_before_and_during_a_stream_keep_anthropics_shape(server) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    try:
        server.backend.reason = Unavailable("no plan yet: waiting for a leader")
        with pytest.raises(anthropic.APIStatusError) as before:
            client.messages.create(model=MODEL, max_tokens=10, messages=WEATHER, stream=True)
        assert before.value.status_code == 503 and before.value.body["error"] == {
            "type": "overloaded_error", "message": "no plan yet: waiting for a leader"}
        server.backend.reset()
        server.backend.fail_after = 3
        events = []
        with pytest.raises(anthropic.APIStatusError, match="stage 1 went away"):
            for event in client.messages.create(model=MODEL, max_tokens=10, messages=WEATHER, stream=True):
                events.append(event.type)
        assert events[0] == "message_start" and "message_stop" not in events
    finally:
        server.backend.reset()


def test_ollama_failures_before_and_during_a_stream_keep_ollamas_shape(server) -> None:
    """The answer's one way out (tbmesh.http.common.respond), in Ollama's NDJSON: an error before
    the first line is an HTTP error status, one after it an {"error"} line that ends the stream."""
    ask = {"model": MODEL, "messages": WEATHER, "options": {"num_predict": 10, "temperature": 0}}
    try:
        server.backend.reason = Unavailable("no plan yet: waiting for a leader")
        status, answer, _ = _post(server, "/api/chat", ask)
        assert (status, answer) == (503, {"error": "no plan yet: waiting for a leader"})
        server.backend.reset()
        server.backend.fail_after = 3
        request = urllib.request.Request(server.url + "/api/chat", data=json.dumps(ask).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in response.read().splitlines()]
        *parts, last = lines
        assert parts and all(not part["done"] for part in parts)
        assert last == {"error": "generation failed: RuntimeError: stage 1 went away"}
    finally:
        server.backend.reset()


def _validator(document: dict[str, Any], name: str) -> Any:
    schemas = document["components"]["schemas"]
    return jsonschema_rs.validator_for({**schemas[name], "components": {"schemas": schemas}})


def _sse(server: ApiServer, path: str, body: dict[str, Any]) -> list[tuple[str | None, str]]:
    """A streamed answer's events as (their name, their data), as they came."""
    request = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = []
    for block in raw.strip("\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_the_answers_are_as_the_openapi_document_describes_them(server) -> None:
    """Every answer of the taught model (thinking, tool calls, text, logprobs), streamed and not,
    against the schemas of GET /openapi.json (the fuzzing's model is random: it seldom thinks
    or calls a tool)."""
    status, document = server.get("/openapi.json")
    assert status == 200
    events = {e["properties"]["event"]["const"]: e["properties"]["data"]["contentSchema"]
              for e in document["components"]["schemas"]["MessageEvent"]["anyOf"]}  # fmt: skip
    schemas = document["components"]["schemas"]
    seen: set[str] = set()
    for conversation in CONVERSATIONS:
        question = conversation["messages"][:1]
        tools = conversation.get("tools")
        chat = {"model": MODEL, "messages": question, "max_tokens": 48, "temperature": 0, "logprobs": True,
                "top_logprobs": 2, "stream_options": {"include_usage": True}, **({"tools": tools} if tools else {})}
        status, answer = server.post("/v1/chat/completions", chat)
        assert status == 200, answer
        _validator(document, "ChatCompletion").validate(answer)
        seen.update(k for k in ("reasoning_content", "tool_calls") if k in answer["choices"][0]["message"])
        for _, data in _sse(server, "/v1/chat/completions", chat):
            if data != "[DONE]":
                _validator(document, "ChatCompletionChunk").validate(json.loads(data))
        anthropic_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                            "input_schema": t["function"]["parameters"]} for t in tools or []]  # fmt: skip
        message = {"model": MODEL, "messages": question, "max_tokens": 48, "temperature": 0,
                   **({"tools": anthropic_tools} if tools else {})}  # fmt: skip
        status, answer = server.post("/v1/messages", message)
        assert status == 200, answer
        _validator(document, "Message").validate(answer)
        seen.update(block["type"] for block in answer["content"])
        streamed = _sse(server, "/v1/messages", message)
        assert [name for name, _ in streamed][::len(streamed) - 1] == ["message_start", "message_stop"]
        for name, data in streamed:
            assert name in events, name
            jsonschema_rs.validator_for({**events[name], "components": {"schemas": schemas}}).validate(json.loads(data))
        status, count = server.post("/v1/messages/count_tokens", {"model": MODEL, "messages": question})
        assert status == 200
        _validator(document, "TokenCount").validate(count)
    assert seen >= {"reasoning_content", "tool_calls", "thinking", "tool_use", "text"}, seen


def test_model_names_with_latest_and_aliases_reach_the_served_model(server) -> None:
    """README, *Claude Code*: a served model's name with Ollama's ":latest" tag means it on every
    API (real Ollama takes both, and /api/tags lists the tagged one); --model-alias PATTERN=NAME
    takes clients' own model names (Claude Code's main and small models) to a served one; the
    lists keep the real name."""
    names = ModelNames.parse(["claude-*=taught:latest", "gpt-*=not-served"])
    with ApiServer(server.backend, names=names) as aliased:
        chat = openai.OpenAI(base_url=aliased.url + "/v1", api_key="none", max_retries=0)
        ask = {"messages": WEATHER, "max_tokens": 4, "temperature": 0}
        plain = chat.chat.completions.create(model=MODEL, **ask)
        latest = chat.chat.completions.create(model=MODEL + ":latest", **ask)
        assert latest.choices[0].message.content == plain.choices[0].message.content and latest.model == MODEL
        assert [m.id for m in chat.models.list()] == [MODEL] and chat.models.retrieve(MODEL + ":latest").id == MODEL
        messages = anthropic.Anthropic(base_url=aliased.url, api_key="k", max_retries=0)
        real = messages.messages.create(model=MODEL, max_tokens=4, messages=WEATHER, extra_body={"temperature": 0})
        for name in ("claude-sonnet-4-5-20250929", "claude-haiku-4-5", MODEL + ":latest"):  # main, small, tagged
            answer = messages.messages.create(model=name, max_tokens=4, messages=WEATHER, extra_body={"temperature": 0})
            assert answer.content == real.content and answer.model == MODEL, name
            assert messages.messages.count_tokens(model=name, messages=WEATHER).input_tokens == real.usage.input_tokens
        with pytest.raises(anthropic.NotFoundError) as raised:  # an alias to a model not served
            messages.messages.create(model="gpt-4o", max_tokens=4, messages=WEATHER)
        assert raised.value.body["error"]["type"] == "not_found_error"
        status, answer, _ = _post(aliased, "/api/chat", {"model": "claude-opus-4-1", "messages": WEATHER, "stream": False,
                                                         "options": {"temperature": 0, "num_predict": 4}})  # fmt: skip
        assert status == 200 and answer["message"]["content"] == plain.choices[0].message.content, answer
        document = json.loads(urllib.request.urlopen(aliased.url + "/openapi.json", timeout=10).read())
        model = document["components"]["schemas"]["MessagesRequest"]["properties"]["model"]
        assert "enum" not in model and "--model-alias" in model["description"]  # any name may be an alias's
    with pytest.raises(anthropic.NotFoundError):  # no alias: another name is a 404
        anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0).messages.create(
            model="claude-haiku-4-5", max_tokens=4, messages=WEATHER)


@pytest.mark.parametrize("spec", ["claude-*", "=taught", "claude-*="])
def test_a_model_alias_without_pattern_and_name_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="give PATTERN=NAME"):
        ModelNames.parse([spec])
    result = CliRunner().invoke(app, ["daemon", "--model-alias", spec])
    assert result.exit_code == 2 and "--model-alias: bad model alias" in result.output, result.output


def test_anthropic_thread_continues_the_conversation_the_server_kept(server) -> None:
    """`thread`: {"type": "create"} keeps the conversation with its answer; a continuation sends
    only the new turn and gets the answer the whole conversation gets (the `anthropic` SDK's
    message threads, as its tool runner uses them)."""
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    greedy = {"max_tokens": 6, "extra_body": {"temperature": 0}}
    thread = client.beta.messages.thread(model=MODEL, system="Be brief.", **greedy)
    first = thread.send(WEATHER[0])  # kept whole
    follow, again = {"role": "user", "content": "And in Bergen?"}, {"role": "user", "content": "And tomorrow?"}
    with thread.stream(follow) as stream:  # kept as it was streamed
        second = stream.get_final_message()
    third = thread.send(again)
    assert thread.previous_message_id == third.id
    history = [*WEATHER]
    for turn, reply in ((follow, second), (again, third)):
        history += [{"role": "assistant", "content": (first if turn is follow else second).content}, turn]
        whole = client.messages.create(model=MODEL, system="Be brief.", messages=history, **greedy)
        assert [b.model_dump() for b in reply.content] == [b.model_dump() for b in whole.content]
        assert reply.usage.input_tokens == whole.usage.input_tokens


def test_anthropic_thread_not_kept_is_told_so_and_the_sdk_sends_it_all_again(taught_model: Path) -> None:
    """A continuation of a conversation the server no longer keeps (it keeps the last
    `stored_threads`) is a 404 with Anthropic's details.error_code thread_not_found; the SDK then
    sends the whole conversation again under a new thread, and the turn is answered."""
    with SteeredBackend(taught_model) as backend, ApiServer(backend, Limits(stored_threads=1)) as small:
        client = anthropic.Anthropic(base_url=small.url, api_key="k", max_retries=0)
        greedy = {"max_tokens": 4, "extra_body": {"temperature": 0}}
        one, two = (client.beta.messages.thread(model=MODEL, **greedy) for _ in range(2))
        one.send(WEATHER[0])
        kept = one.previous_message_id
        two.send(WEATHER[0])  # the server now keeps only this one
        status, answer = small.post("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": WEATHER,
                                                     "thread": {"type": "continue", "previous_message_id": kept}})  # fmt: skip
        assert status == 404 and answer["error"]["type"] == "not_found_error", answer
        assert answer["error"]["details"] == {"error_code": "thread_not_found"}
        reply = one.send({"role": "user", "content": "And in Bergen?"})  # replayed whole by the SDK
        assert reply.usage.input_tokens > 20 and one.previous_message_id == reply.id
        status, answer = small.post("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": WEATHER,
                                                     "system": "x", "thread": {"type": "continue",
                                                                               "previous_message_id": reply.id}})  # fmt: skip
        assert status == 400 and "'system' cannot be sent with a thread continuation" in answer["error"]["message"]


def test_a_template_that_refuses_system_messages_is_told_in_anthropics_words(taught_model: Path, tmp_path: Path) -> None:
    """A chat template that takes a system message only first: the refusal is worded as
    Anthropic's of a system message in `messages`, which Claude Code recognises to send its
    system messages merged instead."""
    strict = tmp_path / "strict"
    shutil.copytree(taught_model, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{%- for m in messages %}{%- if m.role == 'system' and not loop.first %}"
                               "{{ raise_exception('System message must be at the beginning.') }}{%- endif %}"
                               "{%- endfor %}" + config["chat_template"])  # fmt: skip
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    with SteeredBackend(strict) as backend, ApiServer(backend) as alone:
        client = anthropic.Anthropic(base_url=alone.url, api_key="k", max_retries=0)
        late = [*WEATHER, {"role": "assistant", "content": "Rainy."}, {"role": "system", "content": "Be brief."}, *WEATHER]
        with pytest.raises(anthropic.BadRequestError) as raised:
            client.messages.create(model="strict", max_tokens=4, messages=late)
        assert raised.value.body["error"]["type"] == "invalid_request_error"
        assert raised.value.body["error"]["message"].startswith(
            'messages.2.role: Unexpected role "system". The input message role must be `user` or `assistant`')
        merged = client.messages.create(model="strict", max_tokens=4, system="Be brief.", messages=late[:2] + late[3:])
        assert merged.stop_reason in ("max_tokens", "end_turn")  # the fallback is answered
