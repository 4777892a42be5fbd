"""Agents' APIs through real daemons (1 and 3 stages) on the taught model, with the official
`openai` and `anthropic` SDKs as the clients: tool-call round trips, reasoning, logprobs,
streaming, a client leaving mid-stream. Every answer (temperature 0) is single-process
mlx-lm's for the same chat-template rendering, split by mlx-lm's own state machine and parser."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import mlx.core as mx
import mlx_lm
import openai
import pytest
from daemons import DaemonProcess, wait_for
from mlx_lm.generate import generate_step, make_text_state_machine
from serving import serving

from tbmesh.testbed.teach import CONVERSATIONS, DEMO_ANSWER, DEMO_QUESTION, WEATHER_TOOL

MODEL = "taught"  # the model directory's name
WEATHER = [{"role": "user", "content": "What is the weather in Oslo?"}]
RESULT = '{"temperature": 4, "sky": "rain"}'
THINK = CONVERSATIONS[1]["messages"][:1]  # answered with a think block
ANTHROPIC_TOOL = {"name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
                  "input_schema": WEATHER_TOOL["function"]["parameters"]}  # fmt: skip
GREEDY = {"temperature": 0}  # the anthropic SDK has no temperature argument any more: extra_body


@dataclass
class Expected:
    """mlx-lm's greedy answer, as mlx_lm.server splits it."""

    tokens: list[int]
    logprobs: list[mx.array]  # each step's log-probabilities
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] | None = None


@pytest.fixture(scope="module")
def loaded(taught_model: Path) -> Any:
    return mlx_lm.load(str(taught_model))


def expected(loaded: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             max_tokens: int = 300) -> Expected:  # fmt: skip
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    answer = Expected([], [])
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if token in tokenizer.eos_token_ids:
            break
        answer.tokens.append(token)
        answer.logprobs.append(logprobs)
    machine = make_text_state_machine(tokenizer)
    _, segments = machine.split(machine.make_state("normal"), tokenizer.decode(answer.tokens))
    tool_text = ""
    for state, piece in segments:
        if state == "reasoning":
            answer.reasoning += piece
        elif state == "tool":
            tool_text += piece
        else:
            answer.text += piece
    if tool_text:
        answer.tool_calls = [tokenizer.tool_parser(tool_text, tools)]
    return answer


@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.slow), 3], ids=["1-stage", "3-stages"])
def daemons(request: pytest.FixtureRequest, taught_model: Path, tmp_path_factory: pytest.TempPathFactory):
    stages = request.param
    root = tmp_path_factory.mktemp(f"agents{stages}")
    cluster = f"a{uuid.uuid4().hex[:8]}"
    started = [DaemonProcess(f"n{i}", root / f"n{i}", ["--interface", "lo", "--memory", "4GB", "--model",
                                                       str(taught_model), "--cluster", cluster, "--no-probe",
                                                       "--model-alias", "claude-*=taught"])
               for i in range(stages)]  # fmt: skip
    try:
        for daemon in started:
            daemon.launch()
        for daemon in started:  # a loaded machine may take more than start_all's 30 s to import MLX
            wait_for(lambda: daemon.api_url() and daemon.status(), 120, f"{daemon.name} to start")
        serving(started, stages)
        yield started
    finally:
        for daemon in started:
            daemon.kill()


def openai_client(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url() + "/v1", api_key="none", max_retries=0, timeout=120)


def anthropic_client(daemon: DaemonProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.api_url(), api_key="any key", max_retries=0, timeout=120)


def idle(daemons: list[DaemonProcess]) -> None:
    """No request left anywhere, and no KV cache but the prefix cache's."""
    wait_for(lambda: all(d.status()["runtime"]["requests"] == 0 and d.status()["runtime"]["stage_requests"] == 0
                         for d in daemons), 10, "every request and its caches gone")  # fmt: skip


def test_openai_tool_call_round_trip(daemons, loaded) -> None:
    client = openai_client(daemons[-1])
    call = expected(loaded, WEATHER, [WEATHER_TOOL])
    assert call.tool_calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]  # what the model was taught
    first = client.chat.completions.create(model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id
    assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert first.usage.completion_tokens == len(call.tokens)

    # the client runs the tool and sends its result back, as an agent does
    messages = [*WEATHER, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": tool_call.id, "content": RESULT}]
    rendered = [*WEATHER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": RESULT}]  # fmt: skip
    final = expected(loaded, rendered, [WEATHER_TOOL])
    assert final.text == "It is 4 degrees and raining in Oslo."
    streamed, finish, calls = "", None, []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                temperature=0, stream=True):  # fmt: skip
        delta = chunk.choices[0].delta
        streamed += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert (streamed, finish, calls) == (final.text, "stop", [])

    # the call itself, streamed: one delta.tool_calls in OpenAI's chunk format
    chunks = list(client.chat.completions.create(model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL],
                                                 temperature=0, stream=True))  # fmt: skip
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].function.name == "get_weather"
    assert json.loads(deltas[0][0].function.arguments) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    idle(daemons)


def test_openai_reasoning_logprobs_and_usage_streamed(daemons, loaded) -> None:
    client = openai_client(daemons[0])
    think = expected(loaded, THINK)
    assert think.reasoning.startswith("\n40 GB over 16 GB") and think.text == "\n\nYou need three Macs."
    whole = client.chat.completions.create(model=MODEL, messages=THINK, temperature=0)
    assert whole.choices[0].message.content == think.text
    assert whole.choices[0].message.model_extra["reasoning_content"] == think.reasoning

    reasoning, content, logprobs, usage = "", "", [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=THINK, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, logprobs=True,
                                                top_logprobs=3):  # fmt: skip
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        if chunk.choices[0].logprobs is not None:
            logprobs += chunk.choices[0].logprobs.content
    assert (reasoning, content) == (think.reasoning, think.text)
    assert usage.completion_tokens == len(think.tokens) and usage.prompt_tokens > 0
    tokenizer = loaded[1]
    assert [entry.token for entry in logprobs] == [tokenizer.decode([t]) for t in think.tokens]
    for entry, token, step in zip(logprobs, think.tokens, think.logprobs):
        assert math.isclose(entry.logprob, step[token].item(), abs_tol=1e-3)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    idle(daemons)


def test_anthropic_tool_use_round_trip(daemons, loaded) -> None:
    client = anthropic_client(daemons[-1])
    call = expected(loaded, WEATHER, [WEATHER_TOOL])
    first = client.messages.create(model=MODEL, max_tokens=200, messages=WEATHER, tools=[ANTHROPIC_TOOL],
                                   extra_body=GREEDY)  # fmt: skip
    assert first.stop_reason == "tool_use" and first.usage.output_tokens == len(call.tokens)
    (block,) = first.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert (block.name, block.input) == ("get_weather", {"city": "Oslo"})

    messages = [*WEATHER, {"role": "assistant", "content": first.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": RESULT}]}]
    with client.messages.stream(model=MODEL, max_tokens=200, messages=messages, tools=[ANTHROPIC_TOOL],
                                extra_body=GREEDY) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == "It is 4 degrees and raining in Oslo."
    assert final.stop_reason == "end_turn"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_stop" in kinds

    # the call streamed: a tool_use block whose input comes as input_json_delta
    with client.messages.stream(model=MODEL, max_tokens=200, messages=WEATHER, tools=[ANTHROPIC_TOOL],
                                extra_body=GREEDY) as stream:  # fmt: skip
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert deltas == ["input_json_delta"] and streamed.content[0].input == {"city": "Oslo"}
    assert streamed.stop_reason == "tool_use"
    idle(daemons)


def test_anthropic_thread_tool_round_trip_and_system_messages_as_claude_code_sends_them(daemons, loaded) -> None:
    """The SDK's message thread (the tool result sent alone, after the id of the answer that
    called the tool), under Claude Code's own model name (--model-alias 'claude-*=taught'), and a
    system message inside `messages`: each answer mlx-lm's on the whole conversation."""
    client = anthropic_client(daemons[0])
    thread = client.beta.messages.thread(model="claude-sonnet-4-5", max_tokens=200, tools=[ANTHROPIC_TOOL],
                                         extra_body=GREEDY)  # fmt: skip
    first = thread.send(WEATHER[0])
    (block,) = first.content
    assert first.stop_reason == "tool_use" and (block.name, block.input) == ("get_weather", {"city": "Oslo"})
    assert first.model == MODEL  # the served model answers, under its own name
    final = thread.send({"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": RESULT}]})
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == "It is 4 degrees and raining in Oslo."
    assert thread.previous_message_id == final.id

    late = [*WEATHER, {"role": "assistant", "content": "Rainy."}, {"role": "system", "content": "Answer briefly."},
            *WEATHER]  # fmt: skip
    want = expected(loaded, late, max_tokens=40)
    answer = client.messages.create(model="claude-haiku-4-5", max_tokens=40, messages=late, extra_body=GREEDY)
    assert answer.usage.output_tokens == len(want.tokens)
    assert "".join(b.text for b in answer.content if b.type == "text") == want.text
    assert "".join(b.thinking for b in answer.content if b.type == "thinking") == want.reasoning
    idle(daemons)


def test_anthropic_thinking_block_streamed_and_max_tokens(daemons, loaded) -> None:
    client = anthropic_client(daemons[0])
    think = expected(loaded, THINK)
    with client.messages.stream(model=MODEL, max_tokens=200, messages=THINK, extra_body=GREEDY) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert (message.content[0].thinking, message.content[1].text) == (think.reasoning, think.text)
    assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == len(think.tokens)

    cut = client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": DEMO_QUESTION}],
                                 extra_body=GREEDY)  # fmt: skip
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 5
    assert DEMO_ANSWER.startswith(cut.content[0].text)
    stopped = client.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": DEMO_QUESTION}],
                                     stop_sequences=["model"], extra_body=GREEDY)  # fmt: skip
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "model")
    assert stopped.content[0].text == DEMO_ANSWER[: DEMO_ANSWER.index("model")]
    idle(daemons)


def test_anthropic_client_leaving_mid_stream_frees_every_stage(daemons, loaded) -> None:
    entry = daemons[-1]
    before = entry.status()["runtime"]["tokens"]
    with anthropic_client(entry).messages.stream(model=MODEL, max_tokens=1000, extra_body=GREEDY,
                                                 messages=[{"role": "user", "content": DEMO_QUESTION}]) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break  # leaving the block closes the connection
    idle(daemons)
    answer = len(loaded[1].encode(DEMO_ANSWER, add_special_tokens=False))
    assert entry.status()["runtime"]["tokens"] - before < answer  # cut short, not generated to its end


def test_bad_requests_get_each_apis_error_shape_and_the_daemon_goes_on(daemons) -> None:
    daemon = daemons[0]
    with pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client(daemon).messages.create(model=MODEL, max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "tool_result", "content": "no id"}]}])  # fmt: skip
    assert raised.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message":
                                 "'messages[0].content[0].tool_use_id' must be a string"}}  # fmt: skip
    with pytest.raises(anthropic.NotFoundError) as missing:
        anthropic_client(daemon).messages.create(model="gpt-4o", max_tokens=10, messages=WEATHER)  # no alias's
    assert missing.value.body["error"]["type"] == "not_found_error" and "gpt-4o" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(daemon).chat.completions.create(model=MODEL, messages=WEATHER, n=2)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as wrong:
        openai_client(daemon).chat.completions.create(model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL],
                                                      tool_choice={"type": "function", "function": {"name": "nope"}})
    assert wrong.value.body["param"] == "tool_choice" and "'nope'" in wrong.value.body["message"]
    assert anthropic_client(daemon).messages.count_tokens(model=MODEL, messages=WEATHER).input_tokens > 0
    idle(daemons)


def test_openai_responses_tool_round_trip_reasoning_and_stream(daemons, loaded) -> None:
    """The Responses API (what Codex speaks): a function call and its output through
    previous_response_id, reasoning that round-trips encrypted with store=False, the typed stream."""
    client = openai_client(daemons[-1])
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    first = client.responses.create(model=MODEL, input=WEATHER[0]["content"], tools=[tool, {"type": "web_search"}],
                                    temperature=0)  # fmt: skip
    (call,) = first.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Oslo"})
    assert first.usage.output_tokens == len(expected(loaded, WEATHER, [WEATHER_TOOL]).tokens)
    second = client.responses.create(model=MODEL, tools=[tool], temperature=0, previous_response_id=first.id,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": RESULT}])
    rendered = [*WEATHER, {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": RESULT}]  # fmt: skip
    assert second.output_text == expected(loaded, rendered, [WEATHER_TOOL]).text == "It is 4 degrees and raining in Oslo."

    thought = expected(loaded, THINK)
    with client.responses.stream(model=MODEL, input=THINK[0]["content"], temperature=0, store=False,
                                 include=["reasoning.encrypted_content"]) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert {"response.reasoning_summary_text.delta", "response.output_text.delta"} <= set(kinds)
    reasoning, message = final.output
    assert (reasoning.summary[0].text, message.content[0].text) == (thought.reasoning.strip(), thought.text)
    follow = client.responses.create(model=MODEL, temperature=0, store=False, input=[
        THINK[0], reasoning.model_dump(exclude_none=True), message.model_dump(exclude_none=True), *WEATHER])
    rendered = [THINK[0], {"role": "assistant", "content": thought.text, "reasoning_content": thought.reasoning},
                *WEATHER]  # fmt: skip
    assert follow.output_text == expected(loaded, rendered).text
    idle(daemons)
