"""Structured output over one aiohttp server and LocalBackend on the taught model: OpenAI's
response_format (JSON mode, a schema, the SDK's pydantic `parse`) and Ollama's `format`. Every
answer parses and validates against its schema, and equals single-process mlx-lm's
generate_step with the same grammar applied as a logits processor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import mlx.core as mx
import mlx_lm
import ollama
import openai
import pydantic
import pytest
from api_server import ApiServer, SteeredBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step

from tbmesh.http.common import Limits
from tbmesh.runtime.grammar import GrammarMatcher, json_grammar, tool_call_grammar
from tbmesh.testbed.teach import WEATHER_TOOL

MODEL = "taught"
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def server(taught_model: Path) -> Iterator[ApiServer]:
    with SteeredBackend(taught_model) as backend, ApiServer(backend, Limits(max_body_bytes=64 * 1024)) as server:
        yield server


@pytest.fixture(scope="module")
def loaded(taught_model: Path) -> tuple[Any, Any]:
    return mlx_lm.load(str(taught_model))


def reference(loaded: tuple[Any, Any], messages: list[dict[str, Any]], schema: dict[str, Any] | None,
              grammar: str | None = None, tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    """mlx-lm's greedy answer with the grammar's mask (`schema`'s, or `grammar`) as a logits
    processor (advanced by each token)."""
    model, tokenizer = loaded
    matcher = GrammarMatcher(grammar or json_grammar(schema), tokenizer)
    calls = 0

    def constrain(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal calls
        if calls:  # from the second step on, tokens ends with the token sampled last
            matcher.advance(tokens[-1].item())
        calls += 1
        return matcher.mask(logits)

    prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    answer = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS, logits_processors=[constrain]):
        if token in tokenizer.eos_token_ids:
            break
        answer.append(token)
    return tokenizer.decode(answer, skip_special_tokens=False)


def openai_client(server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_json_mode_answers_a_json_object_as_mlx_lm_does(server, loaded) -> None:
    answer = openai_client(server).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"})
    text = answer.choices[0].message.content
    # the tiny model does not know JSON: its free strings may run to max_tokens, so the answer
    # parses once it ends, and is the start of an object whatever the length
    assert text.startswith("{") and text == reference(loaded, ASK, None)
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # no free keys: the tiny model would write them on and on

    city: str = pydantic.Field(max_length=12)
    degrees: int = pydantic.Field(ge=-50, le=50)
    sunny: bool


def test_the_sdks_parse_gets_a_valid_pydantic_object_as_mlx_lm_answers(server, loaded) -> None:
    answer = openai_client(server).chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, response_format=Weather)
    message = answer.choices[0].message
    assert isinstance(message.parsed, Weather), message.content
    schema = openai.lib._pydantic.to_strict_json_schema(Weather)
    assert message.content == reference(loaded, ASK, schema)


def test_ollama_format_json_and_schema(server, loaded) -> None:
    client = ollama.Client(host=server.url)
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    free = client.chat(model=MODEL, messages=ASK, format="json", options=options)
    assert free.message.content.startswith("{") and free.message.content == reference(loaded, ASK, None)
    schema = Weather.model_json_schema()
    shaped = client.chat(model=MODEL, messages=ASK, format=schema, options=options)
    Weather.model_validate_json(shaped.message.content)
    assert shaped.message.content == reference(loaded, ASK, schema)
    generated = client.generate(model=MODEL, prompt="Oslo", format=schema, options=options)
    Weather.model_validate_json(generated.response)


def test_an_invalid_schema_is_a_400_in_openais_shape(server) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(server).chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}})
    assert refused.value.param == "response_format"


def test_unconstrained_answers_do_not_change(server, loaded) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True)
    expected = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=10)]
    answer = openai_client(server).chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0,
                                                           logprobs=True)  # fmt: skip
    assert [e.token for e in answer.choices[0].logprobs.content] == [tokenizer.decode([t]) for t in expected]


# small schemas whose every valid answer is short: bounded strings and integers, enums, booleans
LEAF = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-100, 100), st.integers(0, 100)),
    st.just({"type": "boolean"}),
    st.builds(lambda values: {"enum": values}, st.lists(st.sampled_from(["a", "bc", 1, True, None]), min_size=1,
                                                         max_size=3, unique=True)),
)
SCHEMAS = st.dictionaries(st.sampled_from(["city", "n", "ok", "kind", "x"]), LEAF, min_size=1, max_size=3).map(
    lambda properties: {"type": "object", "properties": properties, "required": sorted(properties),
                        "additionalProperties": False})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_every_answer_validates_against_its_schema(server, loaded, schema) -> None:
    answer = openai_client(server).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
    text = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop", text
    jsonschema_rs.validate(schema, json.loads(text))
    assert text == reference(loaded, ASK, schema)


def test_the_wire_form_of_unconstrained_steps_is_as_before_and_a_grammar_travels() -> None:
    from tbmesh.core.generation import Sampling
    from tbmesh.serving.messages import Constraint, Member, Origin

    plain = Member("a", "e", 0, 0, Sampling(), Origin())
    assert len(plain.meta()) == 9 and Member.from_meta(plain.meta()) == plain
    constrained = Member("a", "e", 3, 9, Sampling(), Origin(), Constraint("grammar text", (5, 6, 7)))
    assert Member.from_meta(constrained.meta()) == constrained


@pytest.fixture(scope="module")
def cluster(taught_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    """Three daemons, the taught model in three stages: the mask applies at the last one."""
    import uuid

    from daemons import DaemonProcess, wait_for
    from serving import serving

    root = tmp_path_factory.mktemp("grammar3")
    name = f"g{uuid.uuid4().hex[:8]}"
    started = [DaemonProcess(f"n{i}", root / f"n{i}", ["--interface", "lo", "--memory", "4GB", "--model",
                                                       str(taught_model), "--cluster", name, "--no-probe"])
               for i in range(3)]  # fmt: skip
    try:
        for daemon in started:
            daemon.launch()
        for daemon in started:
            wait_for(lambda daemon=daemon: daemon.api_url() and daemon.status(), 120, f"{daemon.name} to start")
        serving(started, 3)
        yield started
    finally:
        for daemon in started:
            daemon.kill()


def test_three_stages_answer_the_schema_as_mlx_lm_does(cluster, loaded) -> None:
    client = openai.OpenAI(base_url=cluster[0].api_url() + "/v1", api_key="none", max_retries=0, timeout=120)
    answer = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                           response_format=Weather)  # fmt: skip
    assert isinstance(answer.choices[0].message.parsed, Weather), answer.choices[0].message.content
    assert answer.choices[0].message.content == reference(loaded, ASK, openai.lib._pydantic.to_strict_json_schema(Weather))
    shaped = ollama.Client(host=cluster[1].api_url(), timeout=120).chat(
        model=MODEL, messages=ASK, format=Weather.model_json_schema(), options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert shaped.message.content == reference(loaded, ASK, Weather.model_json_schema())
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0)
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True)
    assert plain.choices[0].message.content == tokenizer.decode([t for t, _ in generate_step(mx.array(prompt), model, max_tokens=10)])


# the tools' arguments bounded (no free keys, short strings): the tiny model would write on and on
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {**WEATHER_TOOL["function"], "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice, offered, name", [
    ("required", [WEATHER, CLOCK_TOOL], None),
    ({"type": "function", "function": {"name": "get_time"}}, [CLOCK_TOOL], "get_time"),
])  # fmt: skip
def test_a_forced_tool_choice_always_calls_a_tool_as_mlx_lm_does(server, loaded, tool_choice, offered, name) -> None:
    # asked of the time, the weather tool taught: only the grammar makes it call get_time
    messages = [{"role": "user", "content": "Hello"}]
    answer = openai_client(server).chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK_TOOL], tool_choice=tool_choice,
        max_tokens=MAX_TOKENS, temperature=0)
    calls = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls" and len(calls) == 1, answer.choices[0].message
    assert name is None or calls[0].function.name == name
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    _, tokenizer = loaded
    grammar = tool_call_grammar(tokenizer, offered)
    text = reference(loaded, messages, None, grammar=grammar, tools=offered)
    expected = json.loads(text.split("<tool_call>")[1].split("</tool_call>")[0])
    assert expected == {"name": calls[0].function.name, "arguments": json.loads(calls[0].function.arguments)}
    unforced = openai_client(server).chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK_TOOL], max_tokens=MAX_TOKENS, temperature=0)
    assert unforced.choices[0].message.tool_calls is None  # the model alone would not call: the grammar did


def test_a_resumed_attempt_tells_the_last_stage_its_answer_so_far_and_the_mask_continues(loaded) -> None:
    """A resume replays prompt + tokens so far: the first step's constraint carries those tokens,
    and a matcher built from them masks exactly as the one that saw them one by one."""
    import itertools

    from tbmesh.core.generation import Sampling
    from tbmesh.serving.messages import Admit
    from tbmesh.serving.scheduler import Scheduler
    from tbmesh.serving.settings import ServingSettings

    _, tokenizer = loaded
    grammar = json_grammar(Weather.model_json_schema())
    so_far = tokenizer.encode('{"city":"Oslo","deg', add_special_tokens=False)
    ids = itertools.count()
    scheduler = Scheduler(ServingSettings(), lambda: f"x{next(ids)}")
    prompt = [1, 2, 3]
    scheduler.admit(Admit("r", (("a", 0, 8),), "e", (*prompt, *so_far), len(so_far), 50, Sampling(grammar=grammar), (9,)))
    first, _ = scheduler.next_step()
    assert first.members[0].constraint.grammar == grammar and first.members[0].constraint.answer == tuple(so_far)
    later, _ = scheduler.next_step() or (None, None)
    assert later is None or all(m.constraint is None for m in later.members)  # told once
    stepwise = GrammarMatcher(grammar, tokenizer)
    for token in so_far:
        stepwise.advance(token)
    rebuilt = GrammarMatcher(grammar, tokenizer, so_far)
    assert (rebuilt.allowed(768) == stepwise.allowed(768)).all()
    assert rebuilt.allowed(768).sum() < 768  # it is a real constraint: "deg" must go on as "degrees"
