"""The OpenAI-compatible API over a real aiohttp server and LocalBackend on a tiny model."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mlx_lm
import pytest
from api_server import ApiServer, SteeredBackend, wait_until
from mlx_lm.tokenizer_utils import load as load_tokenizer

from tbmesh.core.generation import Sampling, Unavailable
from tbmesh.http.chat import StopText
from tbmesh.http.common import Limits
from tbmesh.runtime.sampling import make_sampler
from tbmesh.testbed.tiny import make_tiny_model

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello café 🙂"}]
HI = [{"role": "user", "content": "Hi there"}]
# the tiny model's own EOS ends its answer to HELLO within 24 tokens; its answer to HI goes on
CASES = [(HELLO, 24), (HI, 12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / MODEL, layers=2, hidden=128)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    """mlx-lm itself, in the test's thread (only used while the server is idle)."""
    return mlx_lm.load(str(model_dir))


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> Iterator[SteeredBackend]:
    backend = SteeredBackend(model_dir)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def module_server(backend: SteeredBackend) -> Iterator[ApiServer]:
    with ApiServer(backend, Limits(max_body_bytes=64 * 1024, default_max_tokens=16)) as server:
        yield server


@pytest.fixture
def server(module_server: ApiServer, backend: SteeredBackend) -> Iterator[ApiServer]:
    backend.reset()
    yield module_server
    backend.reset()
    # every test leaves no generation behind: each one was ended and its cache freed
    wait_until(lambda: not backend.requests, 5, "the backend to free every request")


@pytest.fixture
def endless(backend: SteeredBackend) -> Iterator[None]:
    """No EOS: every generation goes on to max_tokens (unless its client leaves)."""
    tokenizer = backend.tokenizer(MODEL)
    eos = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = set()
    yield
    tokenizer.eos_token_ids = eos


def greedy(reference: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], str, str]:
    """The tokens mlx-lm generates at temperature 0, their text as mlx-lm streams it, and why it ended."""
    model, tokenizer = reference
    tokens, text, finish = [], "", ""
    for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += response.text
        finish = response.finish_reason or ""
        if finish != "stop":  # "stop" carries the EOS token, which is no output
            tokens.append(response.token)
    return tokens, text, finish


def chat_prompt(reference: Any, messages: list[dict[str, str]]) -> list[int]:
    return reference[1].apply_chat_template(messages, add_generation_prompt=True)


def content(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"])


# --- answers -------------------------------------------------------------------------------


def test_models(server: ApiServer) -> None:
    status, body = server.get("/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"
    assert server.get(f"/v1/models/{MODEL}")[1]["id"] == MODEL
    status, body = server.get("/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_chat_is_mlx_lm_greedy_text_with_usage(server: ApiServer, reference: Any) -> None:
    finishes = set()
    for messages, max_tokens in CASES:
        prompt = chat_prompt(reference, messages)
        tokens, text, finish = greedy(reference, prompt, max_tokens)
        assert text == reference[1].decode(tokens)
        status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                            "max_tokens": max_tokens, "temperature": 0})  # fmt: skip
        assert status == 200
        assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
        assert body["model"] == MODEL and isinstance(body["created"], int)
        (choice,) = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": text}
        assert choice["finish_reason"] == finish
        n = len(tokens)
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
        finishes.add(finish)
    assert finishes == {"stop", "length"}  # the model's EOS and max_tokens


def test_chat_stream_is_the_same_text_in_openai_chunks(server: ApiServer, reference: Any) -> None:
    for messages, max_tokens in CASES:
        tokens, text, finish = greedy(reference, chat_prompt(reference, messages), max_tokens)
        request = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        events = server.stream("/v1/chat/completions", {**request, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        *deltas, last, usage = chunks
        assert all(d["choices"][0]["finish_reason"] is None and d["usage"] is None for d in deltas)
        assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        assert content(chunks) == text
        assert len(deltas) > 2  # streamed piece by piece
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(tokens)
        assert usage["usage"]["prompt_tokens"] == len(chat_prompt(reference, messages))
        # without include_usage: no usage chunk, no usage fields
        plain = server.stream("/v1/chat/completions", request)
        assert all("usage" not in c for c in plain[:-1]) and content(plain) == text


def test_content_parts_system_and_developer_roles(server: ApiServer, reference: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    _, text, _ = greedy(reference, chat_prompt(reference, messages), 6)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]  # fmt: skip
    status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": parts, "max_tokens": 6,
                                                        "temperature": 0})  # fmt: skip
    assert status == 200 and body["choices"][0]["message"]["content"] == text


def test_completion_of_text_and_of_token_ids(server: ApiServer, reference: Any) -> None:
    prompt = reference[1].encode("The quick brown")
    tokens, text, finish = greedy(reference, prompt, 10)
    assert finish == "length"
    for given in ("The quick brown", prompt, [prompt], ["The quick brown"]):
        status, body = server.post("/v1/completions", {"model": MODEL, "prompt": given, "max_tokens": 10,
                                                       "temperature": 0})  # fmt: skip
        assert status == 200, body
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == text == reference[1].decode(tokens)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 10, "total_tokens": len(prompt) + 10}
    events = server.stream("/v1/completions", {"model": MODEL, "prompt": "The quick brown", "max_tokens": 10,
                                               "temperature": 0, "stream_options": {"include_usage": True}})  # fmt: skip
    *chunks, usage, done = events
    assert done == "[DONE]" and usage["usage"]["completion_tokens"] == 10
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_default_max_tokens_applies(server: ApiServer, reference: Any) -> None:
    tokens, _, _ = greedy(reference, reference[1].encode("Hello"), 16)  # the server's default here
    status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "Hello", "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == len(tokens)


def test_without_max_tokens_an_answer_takes_what_the_context_leaves(server: ApiServer, backend: SteeredBackend,
                                                                    reference: Any, endless: None) -> None:  # fmt: skip
    """README, *Running a model* (the KV room is budgeted): "without `max_tokens` an answer may
    take what is left of the context, at most 32768 tokens"."""
    assert Limits().default_max_tokens == Limits().max_tokens == 32768
    prompt = chat_prompt(reference, HI)
    backend.room = len(prompt) + 5  # the context: 5 tokens after the prompt (this server's default is 16)
    status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": HI, "temperature": 0})
    assert status == 200, body
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (5, "length")
    status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 6})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"  # asked for: whole, or refused


def test_seed_gives_the_same_sample(server: ApiServer, endless: None) -> None:
    def ask(seed: int | None, stream: bool = False) -> str:
        body = {"model": MODEL, "messages": HI, "max_tokens": 16, "temperature": 1.0, "top_p": 0.95}
        if seed is not None:
            body["seed"] = seed
        if stream:
            return content(server.stream("/v1/chat/completions", body))
        return server.post("/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]

    first = ask(42)
    assert ask(42) == first
    assert ask(-1) == ask(-1) != first  # OpenAI's seeds are signed 64-bit integers
    assert ask(42, stream=True) == first
    assert ask(7) != first
    assert ask(None) != ask(None)  # each request its own random key


def test_seeded_sample_is_mlx_lm_with_the_same_sampler(server: ApiServer, reference: Any) -> None:
    prompt = chat_prompt(reference, HELLO)
    sampler = make_sampler(Sampling(temperature=0.8, top_p=0.9, seed=3))
    text = mlx_lm.generate(*reference, prompt, max_tokens=12, sampler=sampler)
    body = {**CHAT, "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    assert server.post("/v1/chat/completions", body)[1]["choices"][0]["message"]["content"] == text


def test_stop_strings_end_the_answer_and_the_generation(server: ApiServer, reference: Any, backend: SteeredBackend) -> None:
    _, text, _ = greedy(reference, chat_prompt(reference, HI), 24)
    # a stop string first met well inside the answer, that no earlier text begins
    start = next(i for i in range(4, len(text) - 2) if text.find(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    cancelled = len(backend.cancelled)
    request = {"model": MODEL, "messages": HI, "max_tokens": 24, "temperature": 0}
    status, body = server.post("/v1/chat/completions", {**request, "stop": ["never said", stop]})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == text[:start]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 24
    events = server.stream("/v1/chat/completions", {**request, "stop": stop})
    assert content(events) == text[:start]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    wait_until(lambda: len(backend.cancelled) == cancelled + 2, 5, "both generations cancelled")


def test_eos_ends_the_answer_with_stop(model_dir: Path, reference: Any) -> None:
    """A token made EOS for this backend ends the answer where the model first says it."""
    prompt = chat_prompt(reference, HI)
    tokens, _, _ = greedy(reference, prompt, 12)
    eos = tokens[3]
    end = tokens.index(eos)
    backend = SteeredBackend(model_dir)
    backend.tokenizer(MODEL).eos_token_ids = {*backend.tokenizer(MODEL).eos_token_ids, eos}
    try:
        with ApiServer(backend) as server:
            status, body = server.post("/v1/chat/completions", {"model": MODEL, "messages": HI,
                                                                "max_tokens": 12, "temperature": 0})  # fmt: skip
            assert body["choices"][0]["finish_reason"] == "stop"
            assert body["choices"][0]["message"]["content"] == reference[1].decode(tokens[:end])
            assert body["usage"]["completion_tokens"] == end
    finally:
        backend.close()


def test_concurrent_requests_are_each_right(server: ApiServer, reference: Any) -> None:
    asks = [[{"role": "user", "content": f"Question number {i}"}] for i in range(4)]
    expected = [greedy(reference, chat_prompt(reference, m), 8 + i)[1] for i, m in enumerate(asks)]
    answers: list[str | None] = [None] * 4

    def ask(i: int) -> None:
        body = {"model": MODEL, "messages": asks[i], "max_tokens": 8 + i, "temperature": 0}
        if i % 2:
            answers[i] = content(server.stream("/v1/chat/completions", body))
        else:
            answers[i] = server.post("/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == expected


# --- errors --------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": HELLO}
BAD_CHATS = [
    ({"messages": HELLO}, "model"),
    ({**CHAT, "model": 3}, "model"),
    ({"model": MODEL}, "messages"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": "hi"}, "messages"),
    ({**CHAT, "messages": ["hi"]}, "messages"),
    ({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({**CHAT, "max_tokens": "10"}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": 32769}, "max_tokens"),
    ({**CHAT, "max_tokens": True}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({**CHAT, "max_completion_tokens": 2, "max_tokens": "x"}, "max_tokens"),  # checked though the other wins
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": -0.1}, "temperature"),
    ({**CHAT, "temperature": 2.5}, "temperature"),
    ({**CHAT, "top_p": 1.5}, "top_p"),
    ({**CHAT, "seed": "x"}, "seed"),
    ({**CHAT, "seed": 1.5}, "seed"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "stop": ["a", 1]}, "stop"),
    ({**CHAT, "stop": [str(i) for i in range(17)]}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({**CHAT, "stream_options": []}, "stream_options"),
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "n": "one"}, "n"),
]


@pytest.mark.parametrize("body,param", BAD_CHATS)
def test_bad_chat_fields_are_400_naming_the_field(server: ApiServer, body: dict[str, Any], param: str) -> None:
    status, answer = server.post("/v1/chat/completions", body)
    assert status == 400
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("prompt", [None, {"text": "hi"}, ["a", "b"], [[1], [2]], [1, "a"], [-1], [10**6], []])
def test_bad_prompts_are_400(server: ApiServer, prompt: Any) -> None:
    body = {"model": MODEL, "max_tokens": 2} | ({} if prompt is None else {"prompt": prompt})
    status, answer = server.post("/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == "prompt", answer
    # only what depends on the model has a code: the vocabulary (the document cannot know it)
    assert answer["error"]["code"] == ("token_not_in_vocabulary" if prompt in ([-1], [10**6]) else None)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', "{\"model\": \"\xe9\"}".encode("latin-1")])
def test_malformed_bodies_are_400(server: ApiServer, raw: bytes) -> None:
    status, answer = server.post("/v1/chat/completions", None, raw=raw)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"


# JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer can encode
LONE_SURROGATES = [
    ("/v1/completions", rb'{"model": "tiny", "prompt": "\ud800", "max_tokens": 2}', "prompt", "'prompt'"),
    ("/v1/completions", rb'{"model": "tiny", "prompt": ["ok \udfff"], "max_tokens": 2}', "prompt", "'prompt'"),
    # the surrogate's own bytes rather than its escape (json.loads takes them too)
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xed\xa0\x80", "max_tokens": 2}', "prompt", "'prompt'"),
    ("/v1/chat/completions", rb'{"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}',
     "messages", "'messages[0].content'"),
    ("/v1/chat/completions", (rb'{"model": "tiny", "messages": [{"role": "system", "content": "hi"}, '
                              rb'{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]}'),
     "messages", "'messages[1].content[0].text'"),
]  # fmt: skip


@pytest.mark.parametrize("path,raw,param,field", LONE_SURROGATES)
def test_a_lone_surrogate_is_400_naming_the_field(server: ApiServer, path: str, raw: bytes, param: str, field: str) -> None:
    status, answer = server.post(path, None, raw=raw)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(f"{field} is not valid Unicode"), error


def _nested(depth: int) -> bytes:
    """A chat request whose body nests `depth` levels: the object, then arrays in "metadata"."""
    return (b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "[[[[{{{{"}], '
            b'"metadata": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}")  # fmt: skip


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b"[" * 100_000, b'{"a": ' * 50_000,
                                 _nested(65)])  # fmt: skip
def test_too_deep_a_body_is_400_saying_the_limit(backend: SteeredBackend, raw: bytes) -> None:
    with ApiServer(backend) as server:  # the daemon's limits: 100 000 levels are well within 8 MiB
        status, answer = server.post("/v1/chat/completions", None, raw=raw)
        assert status == 400, answer
        assert answer["error"]["message"] == "the request body nests arrays and objects deeper than 64 levels"
        assert server.post("/v1/chat/completions", None, raw=_nested(64))[0] == 200  # brackets in strings do not count


ODD_VALUES = [
    (b'"temperature": NaN', "temperature"),
    (b'"temperature": Infinity', "temperature"),
    (b'"top_p": -Infinity', "top_p"),
    (b'"top_p": 1e999', "top_p"),
    (b'"max_tokens": 1e999', "max_tokens"),
    (b'"max_tokens": 10000000000000000000000000000000', "max_tokens"),
    (b'"max_tokens": ' + b"9" * 5000, None),  # beyond Python's int digits: json.loads refuses it
    (b'"seed": 18446744073709551616', "seed"),
    (b'"seed": NaN', "seed"),
    (b'"n": 2.0', "n"),
    (b'"stop": {"a": 1}', "stop"),
    (b'"stream_options": {"include_usage": 1}', "include_usage"),
    (b'"max_tokens": "12"', "max_tokens"),
]


@pytest.mark.parametrize("field,param", ODD_VALUES)
def test_odd_values_are_400(server: ApiServer, field: bytes, param: str | None) -> None:
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], ' + field + b"}"
    status, answer = server.post("/v1/chat/completions", None, raw=raw)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param


def test_integral_numbers_are_integers(server: ApiServer, reference: Any) -> None:
    """JSON has one kind of number: 3.0 and 3e0 are the integer 3, as JSON Schema (and so the
    OpenAPI document) says, though json.loads makes them floats."""
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, '
    status, as_integers = server.post("/v1/chat/completions", None, raw=raw + b'"max_tokens": 3, "n": 1, "seed": 7}')
    status_floats, as_floats = server.post("/v1/chat/completions", None,
                                           raw=raw + b'"max_tokens": 3.0, "n": 1e0, "seed": 7.0}')
    assert status == status_floats == 200, as_floats
    assert as_floats["choices"] == as_integers["choices"] and as_floats["usage"]["completion_tokens"] == 3
    prompt = reference[1].encode("Hello")
    status, answer = server.post("/v1/completions", {"model": MODEL, "prompt": [float(t) for t in prompt],
                                                     "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert status == 200 and answer["usage"]["prompt_tokens"] == len(prompt), answer


def test_too_large_a_body_is_413(server: ApiServer) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    status, answer = server.post("/v1/chat/completions", big)
    assert status == 413 and "larger than" in answer["error"]["message"]


def test_fields_that_change_nothing_of_the_answer_are_accepted(server: ApiServer) -> None:
    """README, *Running a model*: OpenAI's fields that change nothing of the answer are accepted
    (what the openai library, Codex and LangChain send), as are the neutral values of those
    refused."""
    body = {**CHAT, "max_tokens": 2, "user": "me", "frequency_penalty": 0, "logit_bias": {}, "n": 1,
            "metadata": {"a": 1}, "stream": False, "stop": None, "seed": None, "store": False,
            "parallel_tool_calls": True, "service_tier": "auto", "prompt_cache_key": "k",
            "safety_identifier": "h", "stream_options": None, "reasoning_effort": None}  # fmt: skip
    status, answer = server.post("/v1/chat/completions", body)
    assert status == 200, answer
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "user": "me", "best_of": 1, "echo": False,
            "suffix": None, "presence_penalty": 0.0}  # fmt: skip
    status, answer = server.post("/v1/completions", body)
    assert status == 200, answer


@pytest.mark.parametrize("path, body, unknown", [
    ("/v1/chat/completions", {**CHAT, "top_k": 5}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "min_p": 0.1, "top_k": 5}, "min_p, top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "top_k": 5}, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "tools": []}, "tools"),  # a chat field
])  # fmt: skip
def test_a_field_openais_api_does_not_have_is_a_400_in_openais_words(server: ApiServer, path: str,
                                                                      body: dict[str, Any], unknown: str) -> None:  # fmt: skip
    """README, *Running a model*: "a field OpenAI's API does not have (`top_k`, `min_p`, ...) is a
    400 in OpenAI's words" (it would change the answer, or the client thinks it does)."""
    status, answer = server.post(path, body)
    assert status == 400, answer
    plural = "s" if "," in unknown else ""
    assert answer["error"]["message"] == f"Unrecognized request argument{plural} supplied: {unknown}"
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == unknown.split(",")[0]


def test_the_fields_known_are_those_of_the_openai_library() -> None:
    """Every field the `openai` library can send is read, refused for what it asks, or accepted as
    changing nothing: none is taken for a field OpenAI's API does not have."""
    from openai.types import completion_create_params as completion
    from openai.types.chat import completion_create_params as chat

    from tbmesh.http import openai as openai_api

    def fields(params: Any) -> set[str]:
        base = params.CompletionCreateParamsBase
        return set(base.__required_keys__ | base.__optional_keys__) | {"stream"}

    assert fields(chat) == {*openai_api.CHAT_READ, *openai_api.CHAT_UNSUPPORTED, *openai_api.CHAT_NO_EFFECT}
    assert fields(completion) == {*openai_api.COMPLETION_READ, *openai_api.COMPLETION_UNSUPPORTED,
                                  *openai_api.COMPLETION_NO_EFFECT}  # fmt: skip


def test_unknown_model_is_404(server: ApiServer) -> None:
    for path, body in (("/v1/chat/completions", {**CHAT, "model": "gpt-4"}),
                       ("/v1/completions", {"model": "gpt-4", "prompt": "hi"})):  # fmt: skip
        status, answer = server.post(path, body)
        assert status == 404
        assert answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
        assert MODEL in answer["error"]["message"]  # says what is served


def test_unavailable_model_is_503_with_its_reason(server: ApiServer, backend: SteeredBackend) -> None:
    backend.reason = Unavailable("no plan yet: waiting for the leader's plan")
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {"model": MODEL, "prompt": "hi"})):
        status, answer = server.post(path, body)
        assert status == 503
        assert answer["error"] == {"message": "no plan yet: waiting for the leader's plan",
                                   "type": "service_unavailable", "param": None, "code": None}  # fmt: skip
    backend.reason = None
    assert server.post("/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200


def test_backend_failure_mid_answer(server: ApiServer, backend: SteeredBackend) -> None:
    backend.fail_after = 3
    request = {**CHAT, "max_tokens": 10, "temperature": 0}
    status, answer = server.post("/v1/chat/completions", request)
    assert status == 500
    assert answer["error"]["type"] == "server_error" and "stage 1 went away" in answer["error"]["message"]
    events = server.stream("/v1/chat/completions", request)  # the status went out with the first text
    assert events[-1] == "[DONE]"
    assert "stage 1 went away" in events[-2]["error"]["message"]
    # a failure that the backend words itself keeps its status
    backend.failure = lambda: Unavailable("the plan changed")
    status, answer = server.post("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 10,
                                                     "temperature": 0})  # fmt: skip
    assert status == 503 and answer["error"]["message"] == "the plan changed"
    # before any text, a stream is still answered with the error's status
    backend.fail_after = 0
    status, answer = server.post("/v1/chat/completions", {**request, "stream": True})
    assert status == 503 and answer["error"]["message"] == "the plan changed"
    backend.reset()
    assert server.post("/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200  # still serving


# --- client disconnects --------------------------------------------------------------------


def _send(server: ApiServer, body: dict[str, Any]) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection


def test_closing_a_stream_cancels_the_generation(server: ApiServer, backend: SteeredBackend, endless: None) -> None:
    cancelled = len(backend.cancelled)
    connection = _send(server, {**CHAT, "max_tokens": 30000, "temperature": 0, "stream": True})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the answer is under way
    assert len(backend.requests) == 1
    connection.close()  # long before the end: 30000 tokens take a minute here
    wait_until(lambda: not backend.requests and len(backend.cancelled) == cancelled + 1, 3,
               "the backend to see the cancellation and free the request")  # fmt: skip


def test_leaving_a_request_cancels_the_generation(server: ApiServer, backend: SteeredBackend, endless: None) -> None:
    cancelled = len(backend.cancelled)
    connection = _send(server, {**CHAT, "max_tokens": 30000, "temperature": 0})
    wait_until(lambda: backend.requests, 5, "the generation to start")
    connection.close()
    wait_until(lambda: not backend.requests and len(backend.cancelled) == cancelled + 1, 3,
               "the backend to see the cancellation and free the request")  # fmt: skip
    assert server.post("/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200


def test_leaving_a_cancelling_server_cancels_the_generation(backend: SteeredBackend, endless: None) -> None:
    """A server that cancels the handler of a client that left (as aiohttp's test server does)."""
    with ApiServer(backend, handler_cancellation=True) as server:
        for stream in (False, True):
            cancelled = len(backend.cancelled)
            connection = _send(server, {**CHAT, "max_tokens": 30000, "temperature": 0, "stream": stream})
            wait_until(lambda: backend.requests, 5, "the generation to start")
            connection.close()
            wait_until(lambda: not backend.requests and len(backend.cancelled) == cancelled + 1, 3,
                       "the backend to see the cancellation and free the request")  # fmt: skip


def test_top_p_zero_is_greedy(server: ApiServer, reference: Any) -> None:
    _, text, _ = greedy(reference, chat_prompt(reference, HI), 8)
    body = {**CHAT, "max_tokens": 8, "temperature": 1.5, "top_p": 0}
    assert server.post("/v1/chat/completions", body)[1]["choices"][0]["message"]["content"] == text


# --- text pieces: multi-byte characters and stop strings over scripted tokens ----------------


class ScriptedBackend:
    """Yields the tokens of a fixed text: exact control over what is streamed."""

    def __init__(self, model_dir: Path, text: str, extra: list[int] | None = None) -> None:
        self._tokenizer = load_tokenizer(model_dir)
        self.tokens = self._tokenizer.encode(text, add_special_tokens=False) + (extra or [])
        self.closed = 0

    def models(self) -> list[str]:
        return [MODEL]

    def unavailable(self, model: str) -> Unavailable | None:
        return None

    def context(self, model: str) -> int | None:
        return None

    def tokenizer(self, model: str) -> Any:
        return self._tokenizer

    async def generate(self, model: str, prompt: list[int], max_tokens: int, sampling: Sampling) -> AsyncIterator[int]:
        try:
            for token in self.tokens[:max_tokens]:
                yield token
        finally:
            self.closed += 1


TEXT = "Café crème 日本語 🙂🚀 done"


def test_multibyte_characters_stream_whole(model_dir: Path) -> None:
    backend = ScriptedBackend(model_dir, TEXT)
    tokenizer = backend.tokenizer(MODEL)
    # the emoji are split over byte tokens that do not decode alone
    assert any("\ufffd" in tokenizer.decode([t]) for t in backend.tokens)
    with ApiServer(backend) as server:
        events = server.stream("/v1/chat/completions", {**CHAT, "max_tokens": 100})
        pieces = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        assert "".join(pieces) == TEXT
        assert not any("\ufffd" in piece for piece in pieces)
        assert len([p for p in pieces if p]) > 3
        assert events[-2]["choices"][0]["finish_reason"] == "stop"  # the backend ended before max_tokens
        events = server.stream("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100, "stop": "日本"})
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Café crème "


def test_an_eos_token_from_the_backend_is_no_text(model_dir: Path) -> None:
    backend = ScriptedBackend(model_dir, "Hello")
    eos = next(iter(backend.tokenizer(MODEL).eos_token_ids))
    backend.tokens += [eos] + backend.tokens
    with ApiServer(backend) as server:
        status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100})
        assert body["choices"][0] == {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop"}
        assert backend.closed == 1


@pytest.mark.parametrize("stops,pieces,expected", [
    (["ab"], ["xa", "bc"], ("x", True)),
    (["abc"], ["xab", "d"], ("xabd", False)),
    (["abc", "bd"], ["xab", "d"], ("xa", True)),
    (["ü"], ["..", "ü."], ("..", True)),
    ([], ["ab"], ("ab", False)),
])  # fmt: skip
def test_stop_text(stops: list[str], pieces: list[str], expected: tuple[str, bool]) -> None:
    stop = StopText(stops)
    sent, stopped = "", False
    for piece in pieces:
        text, stopped = stop.feed(piece)
        sent += text
        if stopped:
            break
    if not stopped:
        sent += stop.flush()
    assert (sent, stopped) == expected


# --- the context: the most a request may hold --------------------------------------------------


def test_a_request_that_cannot_fit_the_context_is_400_with_the_numbers(server: ApiServer, backend: SteeredBackend,
                                                                         endless: None) -> None:
    import openai

    backend.room = 40  # a cluster's --context
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    prompt = [backend.tokenizer(MODEL).bos_token_id] + [300] * 29  # 30 tokens
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=11, temperature=0)
    error = raised.value.body
    assert error["code"] == "context_length_exceeded"  # OpenAI's code: what a schema of the request cannot say
    # OpenAI's words, which clients match: litellm's is_error_str_context_window_exceeded looks for
    # "this model's maximum context length is" (litellm_core_utils/exception_mapping_utils.py)
    assert error["param"] == "max_tokens" and error["message"] == "This model's maximum context length is 40 " \
        "tokens. However, you requested 41 tokens (30 in the prompt, 11 in the completion). Please reduce the " \
        "length of the prompt or completion."
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=prompt * 2, temperature=0)
    assert raised.value.body["param"] == "prompt" and raised.value.body["message"] == "This model's maximum context " \
        "length is 40 tokens. However, your prompt resulted in 60 tokens. Please reduce the length of the prompt."
    assert "this model's maximum context length is" in str(raised.value).lower()
    assert raised.value.body["code"] == "context_length_exceeded"
    # without max_tokens the answer gets what is left of the context (the default, 16, is more)
    answer = client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert answer.usage.completion_tokens == 10 and answer.choices[0].finish_reason == "length"
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0).usage.completion_tokens == 10
