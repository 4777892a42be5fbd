"""Teaching a tiny model a handful of conversations, until greedy decoding repeats them.

A random-weight model answers gibberish: nobody can tell a right answer from a broken one.
Trained here (MLX, a few seconds on a CPU) until every taught answer is what mlx-lm's greedy
decoding gives for its prompt, the model answers the taught questions with readable text, a
think block and a tool call, which tests and the demo can check end to end.

A corpus is a list of conversations in the format of chat fine-tuning data (mlx-lm's, OpenAI's):

    {"messages": [{"role": "user", "content": "What is the weather in Oslo?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                   "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "content": "{\\"temperature\\": 4}"},
                  {"role": "assistant", "content": "It is 4 degrees in Oslo."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", ...}}]}

Roles are system, user, assistant and tool; an assistant message may carry a
"reasoning_content" (or a "<think>...</think>" at the start of its content: its think block)
and "tool_calls"; "tools" is optional. Every assistant message is taught: its turn as the chat
template renders it, after the conversation before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

ROLES = ("system", "user", "assistant", "tool")
LEARNING_RATE = 3e-3
DECAY_STEPS = 50
MAX_STEPS = 200  # the default corpus needs 15 to 20
MARGIN = 1.0  # each taught token leads the next likeliest by this much (logits) before a greedy check

# The demo's question and the paragraph it streams through the pipeline (`tbmesh demo`)
DEMO_QUESTION = "How do the Macs share one model?"
DEMO_ANSWER = (
    "Each Mac holds a few layers of the model, in order. Your question goes into the first Mac, which runs "
    "its layers and sends the numbers over the Thunderbolt cable to the next one. The last Mac picks the next "
    "word and sends it back to the first, so the answer comes out one word at a time. If a Mac is unplugged, "
    "the others take over its layers, and the answer goes on where it stopped."
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# Written for tbmesh: a paragraph, a think block, a tool call and its result, a greeting.
CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": DEMO_QUESTION}, {"role": "assistant", "content": DEMO_ANSWER}]},
    {"messages": [
        {"role": "user", "content": "My model needs 40 GB and each Mac gives 16 GB. How many Macs do I need?"},
        {"role": "assistant",
         "reasoning_content": "40 GB over 16 GB a Mac is 2.5 Macs. Two are not enough, so three.",
         "content": "You need three Macs."},
    ]},
    {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": '{"temperature": 4, "sky": "rain"}'},
        {"role": "assistant", "content": "It is 4 degrees and raining in Oslo."},
    ]},
    {"messages": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! I am a tiny model, taught on this machine by tbmesh. "
                                         "Ask me how the Macs share one model."},
    ]},
]  # fmt: skip


# --- the corpus ---------------------------------------------------------------------------


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """The conversations of a JSON file (an array of them) or a JSONL file (one a line).

    Raises ValueError naming the file, the line or conversation, and what is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if text.lstrip().startswith("["):
        try:
            conversations = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON: {error}") from None
        where = [f"{path}: conversation {i + 1}" for i in range(len(conversations))]
    else:
        conversations, where = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                conversations.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not JSON ({error}); a JSONL file holds one "
                                 "conversation a line, a JSON file an array of them") from None  # fmt: skip
            where.append(f"{path} line {number}")
    if not conversations:
        raise ValueError(f"{path} holds no conversation")
    for conversation, place in zip(conversations, where):
        check_conversation(conversation, place)
    return conversations


def check_conversation(conversation: Any, where: str) -> None:
    """Raises ValueError(`where`: what is wrong) unless `conversation` is one the template renders."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError(f'{where}: not an object with "messages" (an array)')
    tools = conversation.get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError(f'{where}: "tools" must be an array of objects')
    messages = conversation["messages"]
    for i, message in enumerate(messages):
        place = f"{where}, message {i + 1}"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{place}: not an object with a role ({', '.join(ROLES)})")
        calls = message.get("tool_calls") or []
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and calls):
            raise ValueError(f'{place}: "content" must be a string')
        if not isinstance(message.get("reasoning_content", ""), str):
            raise ValueError(f'{place}: "reasoning_content" must be a string')
        if calls and message["role"] != "assistant" or not isinstance(calls, list):
            raise ValueError(f'{place}: "tool_calls" must be an array, in an assistant message')
        for call in calls:
            function = call.get("function", call) if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), (dict, str))):  # fmt: skip
                raise ValueError(f'{place}: a tool call is {{"function": {{"name": ..., "arguments": {{...}}}}}}')
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: no assistant message to teach")


def corpus_texts(conversations: list[dict[str, Any]]) -> list[str]:
    """The texts of the conversations, for the tokenizer to learn their words."""
    texts = []
    for conversation in conversations:
        texts += [json.dumps(tool) for tool in conversation.get("tools", [])]
        for message in conversation["messages"]:
            texts += [message.get("content") or "", message.get("reasoning_content", "")]
            texts += [json.dumps(call.get("function", call)) for call in message.get("tool_calls") or []]
    return [text for text in texts if text]


# --- the answers to teach -----------------------------------------------------------------


@dataclass
class Answer:
    """One assistant turn as mlx-lm generates it: the prompt's tokens, then the answer's."""

    prompt: list[int]
    tokens: list[int]  # up to and with the end of the turn, <|im_end|>
    text: str  # the answer's, for messages


def taught_answers(tokenizer: TokenizerWrapper, conversations: list[dict[str, Any]]) -> list[Answer]:
    """Every assistant turn: the chat template's text after the conversation before it."""
    answers = []
    for conversation in conversations:
        messages, tools = conversation["messages"], conversation.get("tools") or None
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True,
                                                   tokenize=False)  # fmt: skip
            turn = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
            end = tokenizer.eos_token  # the end of a turn, <|im_end|>
            if not turn.startswith(prompt) or end not in turn[len(prompt) :]:
                raise ValueError(f"the chat template renders message {i + 1} of a conversation in an "
                                 "unexpected way")  # fmt: skip
            answer = turn[len(prompt) :].split(end)[0] + end
            answers.append(Answer(_encode(tokenizer, prompt), _encode(tokenizer, answer), answer))
    return answers


def _encode(tokenizer: TokenizerWrapper, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)  # the template wrote the BOS token


def training_rows(answers: list[Answer]) -> list[tuple[mx.array, mx.array]]:
    """Token rows, each with a mask of the positions whose next token is taught.

    The turns of one conversation share a row when each turn's prompt starts with the row so
    far (then the row is the last turn's prompt and answer): the conversation is computed
    once, not once a turn. Rows are not padded to one length: the prompts of a corpus differ
    a lot (a tool's description), and on a CPU every padding token costs as much as a real one.
    """
    rows: list[tuple[list[int], set[int]]] = []
    for answer in answers:
        if rows and answer.prompt[: len(rows[-1][0])] == rows[-1][0]:
            taught = rows.pop()[1]
        else:
            taught = set()
        start = len(answer.prompt)
        rows.append((answer.prompt + answer.tokens, taught | set(range(start, start + len(answer.tokens)))))
    # the logits at position p predict token p + 1
    return [(mx.array(tokens), mx.array([p + 1 in taught for p in range(len(tokens) - 1)])) for tokens, taught in rows]


# --- training -----------------------------------------------------------------------------


def train(model: nn.Module, answers: list[Answer], max_steps: int = MAX_STEPS) -> int:
    """Train `model` (float32) until greedy decoding gives every answer; returns the steps taken.

    Full-batch Adam from the model's weights: no sampling, so the same weights and answers
    always give the same result. Raises ValueError when `max_steps` are not enough.
    """
    rows = training_rows(answers)
    taught = sum(mask.sum() for _, mask in rows)
    # a tenth of the rate after DECAY_STEPS: late steps fix the last tokens without undoing others
    schedule = optim.cosine_decay(LEARNING_RATE, DECAY_STEPS, LEARNING_RATE / 10)
    optimizer = optim.Adam(learning_rate=schedule)

    def loss_and_margin(model: nn.Module) -> tuple[mx.array, mx.array]:
        losses, margins = [], []
        for tokens, mask in rows:
            logits = model(tokens[None, :-1])[0]
            targets = tokens[1:]
            losses.append((nn.losses.cross_entropy(logits, targets) * mask).sum())
            # how far each taught token leads the likeliest other one: > 0 where greedy picks it
            is_target = mx.arange(logits.shape[-1]) == targets[:, None]
            lead = (logits * is_target).sum(-1) - mx.where(is_target, -mx.inf, logits).max(-1)
            margins.append(mx.where(mask, lead, mx.inf).min())
        return sum(losses) / taught, mx.min(mx.stack(margins))

    step_fn = nn.value_and_grad(model, loss_and_margin)
    for step in range(1, max_steps + 1):
        (_, margin), grads = step_fn(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, margin)
        # the margin is of the weights before this step: the greedy check is of the new ones
        if margin.item() >= MARGIN and first_wrong(model, answers) is None:
            return step
    wrong = first_wrong(model, answers)
    if wrong is None:
        return max_steps
    raise ValueError(f"after {max_steps} training steps, greedy decoding still misses the taught answer "
                     f"{answers[wrong].text[:40]!r}: teach fewer or shorter conversations, or a bigger model")


def first_wrong(model: nn.Module, answers: list[Answer]) -> int | None:
    """The index of the first answer that mlx-lm's greedy decoding does not give, or None."""
    for index, answer in enumerate(answers):
        steps = generate_step(mx.array(answer.prompt), model, max_tokens=len(answer.tokens))
        for expected, (token, _) in zip(answer.tokens, steps):
            if int(token) != expected:
                steps.close()
                return index
    return None
