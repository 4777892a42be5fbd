"""OpenAI's Responses API (/v1/responses) with the official `openai` client over one aiohttp
server and LocalBackend on the taught model: text, a function tool's round trip, reasoning that
round-trips encrypted through the client, previous_response_id, the streamed event sequence, and
bad input answered in OpenAI's shape. Answers are compared with single-process mlx-lm's."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import mlx.core as mx
import mlx_lm
import openai
import pytest
from api_server import ApiServer, SteeredBackend
from mlx_lm.generate import generate_step

from tbmesh.http.common import ApiError
from tbmesh.http.responses import ReasoningSeal, ResponseStore, StoredResponse
from tbmesh.testbed.teach import CONVERSATIONS, WEATHER_TOOL

MODEL = "taught"
HELLO = CONVERSATIONS[3]["messages"]
THINKING = CONVERSATIONS[1]["messages"]
WEATHER = CONVERSATIONS[2]["messages"]
TOOL = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses API's flat form


@pytest.fixture(scope="module")
def server(taught_model: Path) -> Iterator[ApiServer]:
    with SteeredBackend(taught_model) as backend, ApiServer(backend) as server:
        yield server


@pytest.fixture(scope="module")
def reference(taught_model: Path) -> Any:
    """Single-process mlx-lm: the greedy answer's text, raw, to the chat template's prompt."""
    model, tokenizer = mlx_lm.load(str(taught_model))

    def answer(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        tokens = []
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=200):
            if token in tokenizer.eos_token_ids:
                break
            tokens.append(token)
        return tokenizer.decode(tokens)

    answer.tokenizer = tokenizer  # type: ignore[attr-defined]
    return answer


@pytest.fixture
def client(server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_text_answer_is_mlx_lms_and_can_be_fetched(client, reference) -> None:
    response = client.responses.create(model=MODEL, input=HELLO[0]["content"], temperature=0)
    assert response.status == "completed"
    assert response.output_text == reference(HELLO[:1])
    assert [item.type for item in response.output] == ["message"]
    assert response.usage.input_tokens == len(reference.tokenizer.apply_chat_template(HELLO[:1], add_generation_prompt=True))
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_instructions_and_developer_messages_are_system_messages(client, reference) -> None:
    response = client.responses.create(model=MODEL, instructions="Be brief.", temperature=0, max_output_tokens=5,
                                       input=[{"role": "developer", "content": "Say hello."},
                                              {"role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}])
    expected = reference([{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Say hello."},
                          {"role": "user", "content": "Hello!"}])
    assert expected.startswith(response.output_text) and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5


def test_a_function_tool_round_trip(client, reference) -> None:
    hosted = {"type": "web_search"}  # never offered to the model, and no failure
    first = client.responses.create(model=MODEL, input=WEATHER[0]["content"], tools=[TOOL, hosted], temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    second = client.responses.create(model=MODEL, tools=[TOOL], temperature=0, input=[
        {"role": "user", "content": WEATHER[0]["content"]}, calls[0].model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": WEATHER[2]["content"]}])
    turn = {"role": "assistant", "content": "", "tool_calls": [{"id": calls[0].call_id, "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    expected = reference([WEATHER[0], turn, {"role": "tool", "tool_call_id": calls[0].call_id,
                                             "content": WEATHER[2]["content"]}], [WEATHER_TOOL])
    assert second.output_text == expected == WEATHER[3]["content"]
    # the same through previous_response_id: the stored conversation holds the call
    third = client.responses.create(model=MODEL, tools=[TOOL], temperature=0, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": WEATHER[2]["content"]}])
    assert third.output_text == expected


def test_reasoning_round_trips_encrypted_without_store(client, reference) -> None:
    question = THINKING[0]["content"]
    response = client.responses.create(model=MODEL, input=question, temperature=0, store=False,
                                       reasoning={"summary": "auto"}, include=["reasoning.encrypted_content"])
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == THINKING[1]["reasoning_content"]
    # the text as the model wrote it after its think block (as chat completions give it)
    assert reference([THINKING[0]]).endswith(response.output_text) and response.output_text.strip() == THINKING[1]["content"]
    assert reasoning.encrypted_content and THINKING[1]["reasoning_content"] not in reasoning.encrypted_content
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    follow = [{"role": "user", "content": question}, reasoning.model_dump(exclude_none=True),
              message.model_dump(exclude_none=True), {"role": "user", "content": "Hello!"}]
    again = client.responses.create(model=MODEL, input=follow, temperature=0, store=False)
    # the turn as the model wrote it, think block and text, through the template
    think_block = reference([THINKING[0]]).split("</think>")[0].removeprefix("<think>")
    expected = reference([THINKING[0], {"role": "assistant", "content": response.output_text,
                                        "reasoning_content": think_block}, HELLO[0]])
    assert again.output_text == expected
    tampered = {**follow[1], "encrypted_content": "x" + reasoning.encrypted_content}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=[follow[0], tampered, *follow[2:]], store=False)
    assert "encrypted_content" in caught.value.message


def test_the_stream_sends_every_event_in_order(client) -> None:
    with client.responses.stream(model=MODEL, input=THINKING[0]["content"], temperature=0,
                                 reasoning={"summary": "auto"}) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    compact = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert compact == ["response.created", "response.in_progress",
                       "response.output_item.added", "response.reasoning_summary_part.added",
                       "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
                       "response.reasoning_summary_part.done", "response.output_item.done",
                       "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                       "response.output_text.done", "response.content_part.done", "response.output_item.done",
                       "response.completed"]  # fmt: skip
    assert final.output_text.strip() == THINKING[1]["content"]
    assert final.output[0].summary[0].text == THINKING[1]["reasoning_content"]
    assert final.usage.output_tokens > 0
    with client.responses.stream(model=MODEL, input=WEATHER[0]["content"], tools=[TOOL], temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert final.output[-1].type == "function_call" and final.output[-1].arguments == '{"city": "Oslo"}'


@pytest.mark.parametrize("body, param, words", [
    ({"input": "hi"}, "model", "'model' is required"),
    ({"model": MODEL}, "input", "'input' is required"),
    ({"model": MODEL, "input": "hi", "seed": 1}, "seed", "Unrecognized request argument supplied: seed"),
    ({"model": MODEL, "input": "hi", "tools": [TOOL], "tool_choice": "required"}, "tool_choice", "not supported yet"),
    ({"model": MODEL, "input": "hi", "text": {"format": {"type": "json_object"}}}, "text", "only {\"type\": \"text\"}"),
    ({"model": MODEL, "input": "hi", "include": ["file_search_call.results"]}, "include", "not supported"),
    ({"model": MODEL, "input": "hi", "background": True}, "background", "not supported"),
    ({"model": MODEL, "input": [{"role": "tool", "content": "x"}]}, "input", "'input[0].role' must be"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input", "only text"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
     "input", "is not JSON"),
    ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, "input", "not supported"),
    ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens", "must be"),
])  # fmt: skip
def test_bad_requests_are_400s_in_openais_shape(server, body, param, words) -> None:
    status, answer = server.post("/v1/responses", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_an_unknown_response_is_refused_as_openai_does(server) -> None:
    status, answer = server.post("/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": "resp_x"})
    assert status == 400 and answer["error"]["param"] == "previous_response_id"
    assert answer["error"]["code"] == "previous_response_not_found"
    status, answer = server.get("/v1/responses/resp_x")
    assert status == 404 and "resp_x" in answer["error"]["message"]


def test_hosted_tools_are_never_offered_to_the_model(client, reference) -> None:
    hosted = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "local_shell"}]
    response = client.responses.create(model=MODEL, input="Hello!", tools=hosted, max_output_tokens=1)
    assert response.usage.input_tokens == len(reference.tokenizer.apply_chat_template(HELLO[:1], add_generation_prompt=True))


def test_the_store_keeps_the_most_recently_used() -> None:
    store = ResponseStore(size=2)
    for name in ("a", "b"):
        store.put(name, StoredResponse({"id": name}, []))
    assert store.get("a") is not None  # "b" is now the least recently used
    store.put("c", StoredResponse({"id": "c"}, []))
    assert [name for name in "abc" if store.get(name) is not None] == ["a", "c"]


def test_a_sealed_think_block_opens_only_unchanged_and_here() -> None:
    seal = ReasoningSeal()
    blob = seal.seal("Two are not enough.")
    assert seal.open(blob, "input[1]") == "Two are not enough."
    for changed in (blob[:-2] + "AA", "VHdv." + blob.partition(".")[2], blob + "é", "no dot"):
        with pytest.raises(ApiError) as caught:
            seal.open(changed, "input[1]")
        assert caught.value.code == "invalid_encrypted_content"
    with pytest.raises(ApiError):
        ReasoningSeal().open(blob, "input[1]")  # another daemon's key


def test_every_field_of_openais_requests_is_read_refused_or_harmless() -> None:
    """As tests/test_openai_api.py for chat: the `openai` library's ResponseCreateParams, each field
    sorted by what this server does with it, so that a new one is a decision, not an accident."""
    from openai.types.responses import response_create_params as params

    from tbmesh.http import responses

    base = params.ResponseCreateParamsBase
    fields = set(base.__required_keys__ | base.__optional_keys__) | {"stream"}
    assert fields == {*responses.READ, *responses.UNSUPPORTED, *responses.NO_EFFECT}


def test_the_answers_are_as_the_openapi_document_describes_them(server) -> None:
    """Every answer of the taught model (reasoning, a function call, text), whole and each streamed
    event, against the schemas of GET /openapi.json (the fuzzing's model seldom thinks or calls)."""
    status, document = server.get("/openapi.json")
    assert status == 200
    schemas = document["components"]["schemas"]

    def validate(name: str, value: Any) -> None:
        jsonschema_rs.validator_for({**schemas[name], "components": {"schemas": schemas}}).validate(value)

    seen: set[str] = set()
    for conversation in CONVERSATIONS:
        tools = [{"type": "function", **t["function"]} for t in conversation.get("tools", [])]
        body = {"model": MODEL, "input": conversation["messages"][0]["content"], "max_output_tokens": 48,
                "temperature": 0, "tools": tools, "store": False, "include": ["reasoning.encrypted_content"]}
        status, answer = server.post("/v1/responses", body)
        assert status == 200, answer
        validate("Response", answer)
        seen.update(item["type"] for item in answer["output"])
        request = urllib.request.Request(server.url + "/v1/responses", data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            blocks = response.read().decode().strip("\n").split("\n\n")
        for block in blocks:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            event = json.loads(fields["data"])
            assert fields["event"] == event["type"]
            validate("ResponseStreamEvent", event)
    assert seen == {"reasoning", "function_call", "message"}, seen
