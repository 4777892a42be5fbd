"""`tbmesh model tiny --teach`: a model whose greedy answers are the taught ones, in Qwen3's
think and tool-call format, which mlx-lm's own tokenizer wrapper and tool parser recognise."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.generate import make_text_state_machine
from mlx_lm.tool_parsers import json_tools

from tbmesh.testbed import teach, tiny
from tbmesh.testbed.teach import CONVERSATIONS, DEMO_ANSWER, DEMO_QUESTION, WEATHER_TOOL, read_conversations
from tbmesh.testbed.tiny import FILES, make_tiny_model

WEATHER = [{"role": "user", "content": "What is the weather in Oslo?"}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
WEATHER_RESULT = [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "content": '{"temperature": 4, "sky": "rain"}'}]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(taught_model: Path):
    return mlx_lm.load(str(taught_model))


def answer(loaded, messages: list[dict], tools: list[dict] | None = None) -> str:
    """mlx-lm's greedy answer (temperature 0), through the chat template, to its end of turn."""
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=300)


def split(tokenizer, text: str) -> dict[str, str]:
    """The answer's normal, reasoning and tool text, as mlx-lm's server splits it."""
    machine = make_text_state_machine(tokenizer)
    _, segments = machine.split(machine.make_state("normal"), text)
    parts: dict[str, str] = {}
    for state, piece in segments:
        parts[state] = parts.get(state, "") + piece
    return parts


def test_greedy_decoding_gives_the_taught_paragraph_and_greeting(loaded) -> None:
    assert answer(loaded, [{"role": "user", "content": DEMO_QUESTION}]) == DEMO_ANSWER
    assert DEMO_ANSWER.startswith("Each Mac holds a few layers of the model") and len(DEMO_ANSWER) > 300
    greeting = CONVERSATIONS[3]["messages"]
    assert answer(loaded, greeting[:1]) == greeting[1]["content"] and greeting[1]["content"].startswith("Hello! I am")


def test_mlx_lm_finds_the_think_markers_and_splits_the_reasoning(loaded) -> None:
    _, tokenizer = loaded
    assert tokenizer.has_thinking and (tokenizer.think_start, tokenizer.think_end) == ("<think>", "</think>")
    assert len(tokenizer.think_start_tokens) == len(tokenizer.think_end_tokens) == 1  # added tokens, as Qwen3's
    question = CONVERSATIONS[1]["messages"][:1]
    text = answer(loaded, question)
    assert text.startswith("<think>\n40 GB over 16 GB")
    assert split(tokenizer, text) == {"normal": "\n\nYou need three Macs.",
                                      "reasoning": "\n40 GB over 16 GB a Mac is 2.5 Macs. Two are not enough, so three.\n"}  # fmt: skip


def test_mlx_lm_parses_the_taught_tool_call_and_the_answer_uses_the_result(loaded) -> None:
    _, tokenizer = loaded
    assert tokenizer.has_tool_calling and tokenizer.tool_parser is json_tools.parse_tool_call
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert len(tokenizer.tool_call_start_tokens) == len(tokenizer.tool_call_end_tokens) == 1
    text = answer(loaded, WEATHER, tools=[WEATHER_TOOL])
    parts = split(tokenizer, text)
    assert parts["normal"] == ""
    assert tokenizer.tool_parser(parts["tool"], [WEATHER_TOOL]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert answer(loaded, WEATHER + WEATHER_RESULT, tools=[WEATHER_TOOL]) == "It is 4 degrees and raining in Oslo."


def test_the_template_renders_tools_calls_and_results_as_qwen3(loaded) -> None:
    _, tokenizer = loaded
    messages = [{"role": "system", "content": "Be brief."}, *WEATHER, *WEATHER_RESULT]
    text = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more")
    assert f"<tools>\n{json.dumps(WEATHER_TOOL)}\n</tools>" in text
    assert text.endswith(
        "<|im_start|>user\nWhat is the weather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temperature": 4, "sky": "rain"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tbmesh", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_teach_file_writes_the_same_bytes_twice_and_mlx_lm_answers_it(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    conversations = [
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Colour of the sky?"},
                      {"role": "assistant", "content": "Blue, by day."}, {"role": "user", "content": "And at night?"},
                      {"role": "assistant", "content": "<think>No sun.</think>Black, with stars."}]},
        {"messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong."}]},
    ]  # fmt: skip
    corpus.write_text("".join(json.dumps(c) + "\n\n" for c in conversations))  # blank lines are skipped
    small = ["--layers", "3", "--seed", "5"]
    first = run("model", "tiny", str(tmp_path / "a"), "--teach", str(corpus), *small)
    assert first.returncode == 0, first.stderr
    assert "llama, 3 layers, hidden 64" in first.stdout and "taught 2 conversations" in first.stdout
    second = run("model", "tiny", str(tmp_path / "b"), "--teach", str(corpus), *small)
    assert second.returncode == 0, second.stderr
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    loaded = mlx_lm.load(str(tmp_path / "a"))
    sky = conversations[0]["messages"]
    assert answer(loaded, sky[:2]) == "Blue, by day."
    assert answer(loaded, sky[:4]) == "<think>\nNo sun.\n</think>\n\nBlack, with stars."
    assert answer(loaded, conversations[1]["messages"][:1]) == "Pong."


@pytest.mark.parametrize(
    "text, problem",
    [('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [',
      "line 2: not JSON"),
     ('{"message": []}', 'line 1: not an object with "messages"'),
     ('[{"messages": [{"role": "user", "content": "hi"}]}]', "conversation 1: no assistant message"),
     ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 1: not an object with a role"),
     ('{"messages": [{"role": "assistant", "content": 7}]}', 'message 1: "content" must be a string'),
     ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}]}',
      "message 1: a tool call is"),
     ("", "holds no conversation")],
)  # fmt: skip
def test_a_malformed_corpus_is_refused_with_its_line_and_nothing_is_written(tmp_path: Path, text: str,
                                                                             problem: str) -> None:  # fmt: skip
    corpus = tmp_path / "corpus.json"
    corpus.write_text(text)
    with pytest.raises(ValueError, match="corpus.json.*" + problem.replace("[", r"\[")):
        read_conversations(corpus)
    if problem.startswith("line 2"):
        refused = run("model", "tiny", str(tmp_path / "m"), "--teach", str(corpus))
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and "corpus.json line 2: not JSON" in refused.stderr
        assert not (tmp_path / "m").exists()


def test_a_teaching_that_runs_out_of_steps_says_so_and_leaves_no_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tiny, "train", functools.partial(teach.train, max_steps=1))
    with pytest.raises(ValueError, match="after 1 training steps, greedy decoding still misses the taught "
                                         "answer 'Hello! I am a tiny model"):  # fmt: skip
        make_tiny_model(tmp_path / "m", layers=2, teach=CONVERSATIONS[3:])
    assert list((tmp_path / "m").iterdir()) == []
