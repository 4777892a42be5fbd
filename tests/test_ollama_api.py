"""The Ollama-compatible API through real daemons on loopback, with the official `ollama`
client: answers token for token as single-process mlx-lm's (1 and 3 stages), the model
listings, errors in Ollama's shape, a client leaving mid-stream, and the API key (with the
`openai` SDK too, and `tbmesh status`)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from daemons import DaemonProcess, start_all, wait_for
from serving import mlx_reference, serving

from tbmesh.runtime.sampling import Sampling
from tbmesh.testbed.teach import WEATHER_TOOL

KEY = "test-key-" + uuid.uuid4().hex
HELLO = [{"role": "user", "content": "Hello!"}]
HELLO_ANSWER = "Hello! I am a tiny model, taught on this machine by tbmesh. Ask me how the Macs share one model."
GREEDY = {"temperature": 0}
ADDED_HOST = "studio.example"  # the daemon's --api-allow-host


@contextmanager
def running_cluster(tmp_path: Path, model_dir: Path, n: int, extra: tuple[str, ...] = (),
                    api_key: str | None = None) -> Iterator[list[DaemonProcess]]:  # fmt: skip
    """`n` daemons of one cluster, serving the model in `n` stages; killed at the end, even
    when they fail to start."""
    cluster = f"o{uuid.uuid4().hex[:8]}"
    daemons = [DaemonProcess(f"n{i}", tmp_path / f"n{i}", ["--interface", "lo", "--memory", "4GB", "--model",
                                                            str(model_dir), "--cluster", cluster, "--no-probe", *extra],
                             api_key=api_key) for i in range(n)]  # fmt: skip
    try:
        serving(start_all(daemons), n)
        yield daemons
    finally:
        for daemon in daemons:
            daemon.kill()


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, taught_model: Path) -> Iterator[DaemonProcess]:
    """One daemon serving the taught model on its API port and on --ollama-port, with an API key
    and a Host name added."""
    root = tmp_path_factory.mktemp("one")
    (root / "key").write_text(KEY + "\n")
    flags = ("--ollama-port", "0", "--api-key-file", str(root / "key"), "--api-allow-host", ADDED_HOST)
    with running_cluster(root, taught_model, 1, flags, KEY) as daemons:
        yield daemons[0]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[list[DaemonProcess]]:
    """Three daemons, one stage each, serving serving.py's random tiny model (it rarely ends)."""
    with running_cluster(tmp_path_factory.mktemp("three"), model_dir, 3) as daemons:
        yield daemons


@pytest.fixture(scope="module")
def taught_reference(taught_model: Path) -> Any:
    return mlx_reference(taught_model)


def ollama_url(daemon: DaemonProcess) -> str:
    """The daemon's --ollama-port when it has one, else its API port (the same endpoints)."""
    found = json.loads((daemon.state_dir / "api.json").read_text())
    return found.get("ollama_url", found["url"])


def client(daemon: DaemonProcess, key: str | None = KEY) -> ollama.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return ollama.Client(host=ollama_url(daemon), headers=headers, timeout=120)


@dataclass
class Setup:
    client: ollama.Client  # to a daemon of the cluster (not the one of stage 0, with 3)
    model: str
    model_dir: Path
    reference: Any  # serving.mlx_reference of the model


@pytest.fixture(params=[1, pytest.param(3, marks=pytest.mark.slow)], ids=["1-stage", "3-stages"])
def setup(request: pytest.FixtureRequest, model_dir: Path, reference: Any) -> Setup:
    if request.param == 1:
        taught = request.getfixturevalue("taught_model")
        return Setup(client(request.getfixturevalue("one")), "taught", taught, request.getfixturevalue("taught_reference"))
    return Setup(client(request.getfixturevalue("three")[2], key=None), "tiny", model_dir, reference)


def chat_ids(reference: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def stats_are_sane(part: Any, prompt: list[int], tokens: int) -> None:
    assert part.done is True
    assert part.prompt_eval_count == len(prompt) and part.eval_count == tokens
    assert part.total_duration >= part.prompt_eval_duration + part.eval_duration > 0
    assert part.load_duration == 0 and part.created_at.endswith("Z")


# --- answers: the ollama client against 1 and 3 stages -----------------------------------------


def test_chat_is_mlx_lm_greedy(setup: Setup) -> None:
    ollama_client, model, reference = setup.client, setup.model, setup.reference
    prompt = chat_ids(reference, HELLO)
    for num_predict in (40, 5):
        text, tokens = reference(prompt, num_predict)
        answer = ollama_client.chat(model=model, messages=HELLO, stream=False,
                                    options={**GREEDY, "num_predict": num_predict})  # fmt: skip
        assert answer.message.role == "assistant" and answer.message.content == text
        assert answer.model == model
        assert answer.done_reason == ("length" if tokens == num_predict else "stop")
        stats_are_sane(answer, prompt, tokens)
    if model == "taught":
        assert ollama_client.chat(model="taught:latest", messages=HELLO, options=GREEDY).message.content == HELLO_ANSWER


def test_streamed_chat_is_the_same_text_in_ndjson_parts(setup: Setup) -> None:
    ollama_client, model, reference = setup.client, setup.model, setup.reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do the Macs share one model?"}]
    prompt = chat_ids(reference, messages)
    text, tokens = reference(prompt, 30)
    parts = list(ollama_client.chat(model=model, messages=messages, stream=True, options={**GREEDY, "num_predict": 30}))
    *pieces, last = parts
    assert len(pieces) > 3 and all(p.done is False and p.done_reason is None for p in pieces)
    assert "".join(p.message.content for p in parts) == text
    assert last.done_reason == ("length" if tokens == 30 else "stop")
    stats_are_sane(last, prompt, tokens)


def test_generate_through_the_template_and_raw(setup: Setup) -> None:
    ollama_client, model, reference = setup.client, setup.model, setup.reference
    templated = chat_ids(reference, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}])
    text, tokens = reference(templated, 25)
    answer = ollama_client.generate(model=model, prompt="Hello!", system="Be brief.", stream=False,
                                    options={**GREEDY, "num_predict": 25})  # fmt: skip
    assert answer.response == text
    stats_are_sane(answer, templated, tokens)
    raw = list(reference.tokenizer.encode("The quick brown fox"))
    text, tokens = reference(raw, 12)
    parts = list(ollama_client.generate(model=model, prompt="The quick brown fox", raw=True, stream=True,
                                        options={**GREEDY, "num_predict": 12}))  # fmt: skip
    assert "".join(p.response for p in parts) == text
    stats_are_sane(parts[-1], raw, tokens)


def test_options_seed_top_p_and_stop(setup: Setup) -> None:
    ollama_client, model, reference = setup.client, setup.model, setup.reference
    prompt = chat_ids(reference, HELLO)
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "num_predict": 16}
    text, _ = reference(prompt, 16, Sampling(0.9, 0.95, 11))
    assert ollama_client.chat(model=model, messages=HELLO, options=sampled).message.content == text
    greedy, _ = reference(prompt, 20)
    start = next(i for i in range(3, len(greedy) - 2) if greedy.find(greedy[i:i + 2]) == i)  # first met there
    stop = greedy[start:start + 2]
    for stream in (False, True):
        parts = ollama_client.chat(model=model, messages=HELLO, stream=stream,
                                   options={**GREEDY, "num_predict": 20, "stop": ["never said", stop]})  # fmt: skip
        parts = list(parts) if stream else [parts]
        assert "".join(p.message.content for p in parts) == greedy[:start]
        assert parts[-1].done_reason == "stop" and parts[-1].eval_count < 20


def test_list_show_ps_and_version(setup: Setup) -> None:
    ollama_client, model, reference = setup.client, setup.model, setup.reference
    (listed,) = ollama_client.list().models
    assert listed.model == f"{model}:latest" and listed.size > 0 and len(listed.digest) == 64
    assert listed.details.family == "llama" and listed.details.format == "safetensors"
    shown = ollama_client.show(model)
    assert shown.details == listed.details and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == json.loads((setup.model_dir / "config.json").read_text())["num_hidden_layers"]
    assert shown.template == reference.tokenizer.chat_template and "completion" in shown.capabilities
    assert ollama_client.show(f"{model}:latest").details == listed.details
    (running,) = ollama_client.ps().models
    assert running.model == f"{model}:latest" and running.size_vram == listed.size
    assert running.context_length == 4096  # the cluster's --context
    # the client has no version(): its own HTTP connection, as it reaches every endpoint
    version = ollama_client._client.get("/api/version")
    assert version.status_code == 200 and version.json()["version"].count(".") == 2
    # Codex's --oss mode wants 0.13.4 or newer, and the Responses API that version serves on this port
    assert tuple(map(int, version.json()["version"].split("."))) >= (0, 13, 4)
    answer = ollama_client._client.post("/v1/responses", json={"model": model, "input": "Hello!", "max_output_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["output_tokens"] == 2


def test_load_requests_answer_at_once(setup: Setup) -> None:
    """Ollama's way to load a model: no messages (or no prompt); the cluster's is loaded."""
    ollama_client, model = setup.client, setup.model
    assert ollama_client.chat(model=model, messages=[]).done_reason == "load"
    assert ollama_client.generate(model=model).done_reason == "load"


# --- a client that goes away --------------------------------------------------------------------


@pytest.mark.slow
def test_leaving_a_streamed_chat_frees_every_stage(three: list[DaemonProcess]) -> None:
    from test_serving import idle, stage_0

    first = stage_0(three, three[0].status())
    decoded = first.status()["runtime"]["decoded"]
    parts = client(three[1], key=None).chat(model="tiny", messages=[{"role": "user", "content": "Go on and on"}],
                                            stream=True, options={"temperature": 0})  # up to the context  # fmt: skip
    for _ in range(3):
        assert next(parts).done is False
    wait_for(lambda: all(d.status()["runtime"]["stage_requests"] == 1 for d in three), 10, "every stage to hold it")
    parts.close()  # closes the connection mid-answer
    idle(three)
    assert first.status()["runtime"]["decoded"] - decoded < 1000  # cut short: it had 4000 tokens of room


# --- errors -------------------------------------------------------------------------------------

CHAT = {"model": "taught", "messages": HELLO, "stream": False}
BAD = [
    ("/api/chat", {"messages": HELLO}, 400, "'model' is required"),
    ("/api/chat", {**CHAT, "model": 7}, 400, "'model' must be a string"),
    ("/api/chat", {**CHAT, "model": "llama3"}, 404, "model 'llama3' not found; this node serves taught:latest"),
    ("/api/chat", {**CHAT, "messages": "hi"}, 400, "'messages' must be an array"),
    ("/api/chat", {**CHAT, "messages": ["hi"]}, 400, "'messages[0]' must be an object"),
    ("/api/chat", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "'messages[0].role' must be one of"),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "'messages[0].content' must be a string"),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "'messages[0].images' is not supported"),
    ("/api/chat", {**CHAT, "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/api/chat", {**CHAT, "options": [1]}, 400, "'options' must be an object"),
    ("/api/chat", {**CHAT, "options": {"temperature": "hot"}}, 400, "'temperature' must be a number"),
    ("/api/chat", {**CHAT, "options": {"temperature": -1}}, 400, "'temperature' must be 0 to 2"),
    ("/api/chat", {**CHAT, "options": {"top_p": 3}}, 400, "'top_p' must be 0 to 1"),
    ("/api/chat", {**CHAT, "options": {"seed": 1.5}}, 400, "'seed' must be an integer"),
    ("/api/chat", {**CHAT, "options": {"num_predict": 0}}, 400, "'num_predict' must be 1 to 32768, or -1"),
    ("/api/chat", {**CHAT, "options": {"num_predict": 5000}}, 400, "lower num_predict to at most"),
    ("/api/chat", {**CHAT, "options": {"stop": [1]}}, 400, "'stop' must be a string or an array of strings"),
    ("/api/chat", {**CHAT, "format": "xml"}, 400, "'format' must be \"json\" or a JSON schema"),
    ("/api/chat", {**CHAT, "think": 3}, 400, "'think' must be a boolean"),
    ("/api/chat", {**CHAT, "tools": {"a": 1}}, 400, "'tools' must be an array"),
    ("/api/chat", {**CHAT, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "x"}}]}]},
     400, "'messages[0].tool_calls[0].function.arguments' must be an object"),
    ("/api/chat", {**CHAT, "logprobs": True}, 400, "'logprobs' is not supported"),
    ("/api/generate", {"model": "taught", "prompt": "x", "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
    ("/api/generate", {"model": "taught", "prompt": 5}, 400, "'prompt' must be a string"),
    ("/api/generate", {"model": "taught", "prompt": "x", "raw": "no"}, 400, "'raw' must be a boolean"),
    ("/api/generate", {"model": "taught", "prompt": "x", "suffix": "y"}, 400, "'suffix' is not supported"),
    ("/api/generate", {"model": "taught", "prompt": "x", "images": ["aGk="]}, 400, "'images' is not supported"),
    ("/api/generate", {"model": "taught", "prompt": "x", "context": [1, 2]}, 400, "'context' is not supported"),
    ("/api/generate", {"model": "taught", "prompt": "x", "system": ["a"]}, 400, "'system' must be a string"),
    ("/api/generate", {"prompt": "x"}, 400, "'model' is required"),
    ("/api/show", {}, 400, "'model' is required"),
    ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
    ("/api/show", [1], 400, "the request body must be a JSON object"),
    ("/api/nothing", {}, 404, "no such endpoint: POST /api/nothing"),
]  # fmt: skip


def test_bad_requests_are_4xx_in_ollama_shape_naming_the_fault(one: DaemonProcess) -> None:
    ollama_client = client(one)
    for path, body, status, message in BAD:
        response = ollama_client._client.post(path, json=body)
        assert response.status_code == status and set(response.json()) == {"error"}, (path, body, response.text)
        assert message in response.json()["error"], (path, body)
    for raw in (b"{not json", b"", b'"text"', b"[" * 100 + b"]" * 100):
        response = ollama_client._client.post("/api/chat", content=raw)
        assert response.status_code == 400 and set(response.json()) == {"error"}, response.text
    # through the client, as an application sees it
    with pytest.raises(ollama.ResponseError) as raised:
        ollama_client.chat(model="llama3", messages=HELLO)
    assert raised.value.status_code == 404 and "taught:latest" in raised.value.error
    with pytest.raises(ollama.ResponseError) as raised:
        ollama_client.chat(model="taught", messages=HELLO, tools=[{"type": "function", "function": {"description": "f"}}])
    assert raised.value.status_code == 400 and "'tools[0].function' must be an object with a name" in raised.value.error


# --- tools and thinking (the taught model has both) ---------------------------------------------


def test_tool_calls_and_their_results(one: DaemonProcess) -> None:
    ollama_client = client(one)
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    for stream in (False, True):
        parts = ollama_client.chat(model="taught", messages=ask, tools=[WEATHER_TOOL], stream=stream, options=GREEDY)
        parts = list(parts) if stream else [parts]
        calls = [call for part in parts for call in part.message.tool_calls or []]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
        assert "".join(p.message.content for p in parts).strip() == "" and parts[-1].done_reason == "stop"
    turn = ask + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                     "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "content": '{"temperature": 4, "sky": "rain"}', "tool_name": "get_weather"}]  # fmt: skip
    answer = ollama_client.chat(model="taught", messages=turn, tools=[WEATHER_TOOL], options=GREEDY)
    assert answer.message.content == "It is 4 degrees and raining in Oslo." and not answer.message.tool_calls
    shown = ollama_client.show("taught")
    assert {"completion", "tools", "thinking"} <= set(shown.capabilities)


def test_thinking_comes_apart_from_the_answer(one: DaemonProcess, taught_reference: Any) -> None:
    ollama_client = client(one)
    ask = [{"role": "user", "content": "My model needs 40 GB and each Mac gives 16 GB. How many Macs do I need?"}]
    answer = ollama_client.chat(model="taught", messages=ask, think=True, options=GREEDY)
    assert answer.message.thinking.strip() == "40 GB over 16 GB a Mac is 2.5 Macs. Two are not enough, so three."
    assert answer.message.content.strip() == "You need three Macs."
    text, tokens = taught_reference(chat_ids(taught_reference, ask), 100)
    assert "<think>" not in answer.message.content and answer.eval_count == tokens
    parts = list(ollama_client.chat(model="taught", messages=ask, think=True, stream=True, options=GREEDY))
    assert "".join(p.message.thinking or "" for p in parts) == answer.message.thinking
    assert "".join(p.message.content for p in parts) == answer.message.content
    generated = ollama_client.generate(model="taught", prompt=ask[0]["content"], think=True, options=GREEDY)
    assert (generated.thinking, generated.response) == (answer.message.thinking, answer.message.content)


@pytest.mark.slow
def test_a_model_that_does_not_think_is_asked_to(three: list[DaemonProcess]) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client(three[0], key=None).chat(model="tiny", messages=HELLO, think=True)
    assert raised.value.status_code == 400 and "does not think" in raised.value.error


# --- the API key --------------------------------------------------------------------------------


def test_the_api_key_is_asked_by_every_api_in_its_shape(one: DaemonProcess) -> None:
    for key in (None, "wrong"):
        with pytest.raises(ollama.ResponseError) as raised:
            client(one, key).list()
        assert raised.value.status_code == 401 and "key" in raised.value.error
    with pytest.raises(openai.AuthenticationError) as denied:  # the SDK always sends one
        openai.OpenAI(base_url=one.api_url() + "/v1", api_key="wrong", max_retries=0).models.list()
    assert denied.value.body["code"] == "invalid_api_key" and denied.value.body["message"] == "the API key is wrong"
    missing = httpx.post(one.api_url() + "/v1/chat/completions", json={})
    assert missing.status_code == 401 and "needs a key" in missing.json()["error"]["message"]
    x_api_key = httpx.get(one.api_url() + "/api/tags", headers={"x-api-key": KEY})  # Anthropic's header
    assert x_api_key.status_code == 200 and x_api_key.json()["models"][0]["model"] == "taught:latest"
    with pytest.raises(anthropic.AuthenticationError) as refused:  # it sends x-api-key
        anthropic.Anthropic(base_url=one.api_url(), api_key="wrong", max_retries=0).messages.count_tokens(
            model="taught", messages=HELLO)
    assert refused.value.body["error"] == {"type": "authentication_error", "message": "the API key is wrong"}
    claude = anthropic.Anthropic(base_url=one.api_url(), api_key=KEY, max_retries=0)
    assert claude.messages.count_tokens(model="taught", messages=HELLO).input_tokens > 0
    right = openai.OpenAI(base_url=one.api_url() + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list()] == ["taught"]
    assert right.chat.completions.create(model="taught", messages=HELLO, temperature=0).choices[0].message.content == HELLO_ANSWER
    status = httpx.get(one.api_url() + "/status")
    assert status.status_code == 401 and status.json()["error"]["code"] == "invalid_api_key"
    for url in (one.api_url(), ollama_url(one)):  # the health checks are open
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert httpx.get(url + "/").text == "Ollama is running"


def test_a_web_page_is_refused_on_both_ports(one: DaemonProcess) -> None:
    """DNS rebinding (a Host of the attacker's) and a body a page may send without a CORS
    preflight (text/plain), against the daemon's flags: in Ollama's shape, as Ollama's fix of
    CVE-2024-28224 refuses the first; a name added with --api-allow-host is served."""
    for url in (one.api_url(), ollama_url(one)):
        host, port = url.split("//")[1].split(":")

        def ask(method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, Any]:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                connection.request(method, path, body, {"Authorization": f"Bearer {KEY}", **headers})
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        chat = json.dumps({"model": "taught", "messages": HELLO, "stream": False}).encode()
        for name in ("rebind.attacker.example", f"rebind.attacker.example:{port}"):
            for method, path, body in (("GET", "/api/tags", None), ("POST", "/api/chat", chat), ("GET", "/api/version", None)):
                status, answer = ask(method, path, {"Host": name, "Content-Type": "text/plain"}, body)
                assert status == 403 and "--api-allow-host rebind.attacker.example" in answer["error"], answer
        status, answer = ask("POST", "/api/chat", {"Content-Type": "text/plain"}, chat)
        assert status == 415 and "Content-Type: application/json" in answer["error"], answer
        for name in (ADDED_HOST, f"{ADDED_HOST}:{port}", f"localhost:{port}"):
            status, answer = ask("GET", "/api/tags", {"Host": name})
            assert status == 200 and answer["models"][0]["model"] == "taught:latest", (name, answer)


def tbmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TBMESH_API_KEY"} | (env or {})
    return subprocess.run([sys.executable, "-m", "tbmesh", *args], capture_output=True, text=True, env=environment,
                          timeout=60)  # fmt: skip


def test_tbmesh_status_and_chat_pass_the_key(one: DaemonProcess) -> None:
    status = tbmesh("status", "--api", one.api_url(), "--json", "--api-key", KEY)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["node"]["name"] == "n0"
    refused = tbmesh("status", "--api", one.api_url(), "--json")
    assert refused.returncode == 1 and "--api-key or TBMESH_API_KEY" in refused.stderr
    chat = tbmesh("chat", "Hello!", "--api", one.api_url(), "--temperature", "0", env={"TBMESH_API_KEY": KEY})
    assert chat.returncode == 0 and chat.stdout == HELLO_ANSWER + "\n", chat.stderr


def test_a_public_api_host_without_a_key_is_warned_about() -> None:
    from tbmesh.node.daemon import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost") and _loopback("127.0.0.2")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.2.1") and not _loopback("studio.local")
