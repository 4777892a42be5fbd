"""The serving engine through real daemons on loopback, with the official `openai` SDK as the
client: batches of streams, the prefix cache, the KV room, token for token against mlx-lm."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import openai
import pytest

from daemons import DaemonProcess, wait_for
from serving import PROMPTS, serving
from tbmesh.net import peers, wire
from tbmesh.runtime.sampling import Sampling
from tbmesh.serving.messages import Admit


def client(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url() + "/v1", api_key="none", max_retries=0, timeout=120)


def stream_text(daemon: DaemonProcess, prompt: str, max_tokens: int, **sampling) -> tuple[str, int]:
    """A streamed completion's text and its token count, as the SDK hands them over."""
    pieces, usage = [], None
    for chunk in client(daemon).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                   stream_options={"include_usage": True}, **sampling):
        pieces += [choice.text for choice in chunk.choices]
        usage = chunk.usage or usage
    return "".join(pieces), usage.completion_tokens


def stage_0(daemons: list[DaemonProcess], view: dict) -> DaemonProcess:
    """The daemon of the plan's first stage: it schedules the route."""
    first = view["plan"]["stages"][0]["node"]
    return next(d for d in daemons if d.status()["node"]["id"] == first)


def idle(daemons: list[DaemonProcess]) -> None:
    """No request left anywhere, and no KV cache but the prefix cache's."""
    def done() -> bool:
        return all(d.status()["runtime"]["requests"] == 0 and d.status()["runtime"]["stage_requests"] == 0
                   for d in daemons)
    wait_for(done, 10, "every request and its caches gone")


@pytest.mark.parametrize("stages", [pytest.param(1, marks=pytest.mark.slow), 3])  # 1 stage: slow (CI budget)
def test_streams_arriving_while_others_decode_each_get_mlx_lm_tokens(cluster, reference, stages):
    daemons = cluster(stages)
    serving(daemons, stages)
    jobs = [(PROMPTS[i % 3] + " and then some more words" * (i // 2), 6 + 3 * i, {"temperature": 0})
            for i in range(7)]
    jobs.append((PROMPTS[1], 20, {"temperature": 0.8, "top_p": 0.9, "seed": 7}))  # a seeded one in the batch
    results: dict[int, tuple[str, int]] = {}

    def run(i: int) -> None:
        time.sleep(0.03 * i)  # they arrive while the first ones decode
        prompt, max_tokens, sampling = jobs[i]
        results[i] = stream_text(daemons[i % stages], prompt, max_tokens, **sampling)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for i, (prompt, max_tokens, sampling) in enumerate(jobs):
        expected = reference(prompt, max_tokens, Sampling(sampling["temperature"], sampling.get("top_p", 1.0),
                                                          sampling.get("seed")))
        assert results[i] == expected, i
    runtime = next(d.status()["runtime"] for d in daemons if d.status()["runtime"]["decode_steps"])
    assert runtime["decoded"] > runtime["decode_steps"]  # steps ran several requests at once
    idle(daemons)


def test_turn_two_of_a_conversation_prefills_only_what_is_new(cluster, reference):
    daemons = cluster(2)
    first_stage = stage_0(daemons, serving(daemons, 2))
    chat = client(daemons[1])
    tokenizer = reference.tokenizer
    system = {"role": "system", "content": "You answer questions about Thunderbolt cables and Macs, briefly. "
                                           "Numbers have units. Say when you do not know."}
    messages = [system, {"role": "user", "content": "How fast is the cable?"}]
    first = chat.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the latency?"}]
    before = first_stage.status()["runtime"]  # stage 0 keeps the prefix cache's index
    second = chat.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    after = first_stage.status()["runtime"]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert (second.choices[0].message.content, second.usage.completion_tokens) == reference(ids, 12)
    assert after["prefix_hits"] == before["prefix_hits"] + 1
    reused = after["prefix_hit_tokens"] - before["prefix_hit_tokens"]
    turn_one = list(tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True))
    assert reused >= len(turn_one)  # at least the whole first turn came from the cache
    assert after["prefilled"] - before["prefilled"] == len(ids) - 1 - reused
    assert all(d.status()["runtime"]["prefix_tokens"] >= len(turn_one) for d in daemons)  # every stage holds it
    idle(daemons)


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_requests_beyond_the_kv_room_wait_and_every_one_completes_exactly(cluster, reference):
    daemons = cluster(2, extra=("--context", "150", "--no-prefix-cache"))
    first_stage = stage_0(daemons, serving(daemons, 2))
    jobs = [(PROMPTS[i % 3] + " is what it says" * i, 40) for i in range(5)]
    results: dict[int, tuple[str, int]] = {}
    peaks = []

    def run(i: int) -> None:
        results[i] = stream_text(daemons[0], jobs[i][0], jobs[i][1], temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        runtime = first_stage.status()["runtime"]
        peaks.append((runtime["kv_tokens"], runtime["decoding"], runtime["queued"]))
        time.sleep(0.05)
    for i, (prompt, max_tokens) in enumerate(jobs):
        assert results[i] == reference(prompt, max_tokens), i
    assert all(tokens <= 150 or decoding <= 1 for tokens, decoding, _ in peaks)  # never past the room
    assert max(queued for _, _, queued in peaks) > 0  # some waited
    idle(daemons)


def test_a_request_that_cannot_fit_the_context_is_refused_at_once(cluster):
    daemons = cluster(1, extra=("--context", "64"))
    serving(daemons, 1)
    with pytest.raises(openai.BadRequestError) as raised:
        client(daemons[0]).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=100)
    # OpenAI's own wording (litellm maps it to ContextWindowExceededError), with the numbers
    assert "maximum context length is 64 tokens. However, you requested 112 tokens (12 in the prompt, " \
           "100 in the completion)" in str(raised.value)
    assert raised.value.body["param"] == "max_tokens" and raised.value.body["code"] == "context_length_exceeded"


def test_stopping_with_requests_in_flight_logs_nothing_at_error_level(cluster):
    daemons = cluster(3)
    serving(daemons, 3)
    streams = [threading.Thread(target=lambda i=i: _ignore(stream_text, daemons[i % 3], f"{PROMPTS[i % 3]} {i}", 400))
               for i in range(4)]
    for thread in streams:
        thread.start()
    connection = daemons[0].connection(10)  # and a client that goes away mid-answer
    connection.request("POST", "/v1/completions", b'{"model": "tiny", "prompt": "Hello", "max_tokens": 400, '
                                                  b'"stream": true}', {"Content-Type": "application/json"})
    connection.getresponse().readline()
    connection.close()
    wait_for(lambda: all(d.status()["runtime"]["stage_requests"] >= 1 for d in daemons), 20, "requests in flight")
    for daemon in daemons:
        assert daemon.terminate() == 0  # SIGTERM: a clean stop
    for thread in streams:
        thread.join(30)
    for daemon in daemons:
        bad = [line for line in daemon.log().splitlines()
               if " ERROR " in line or " CRITICAL " in line or "Traceback" in line or "Task was destroyed" in line]
        assert not bad, f"{daemon.name}: {bad[:5]}"


def _ignore(fn, *args) -> None:
    """Run fn, whatever it raises (a stream cut by its server stopping)."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


def test_a_peer_sending_token_ids_beyond_the_vocabulary_loses_its_connection_and_nothing_else(cluster, reference):
    (daemon,) = cluster(1)
    view = serving([daemon], 1)
    stage = view["plan"]["stages"][0]
    route = ((stage["node"], stage["start"], stage["end"]),)
    admit = Admit("intruder-1", route, "intruder", (5, 10**6), 0, 4, Sampling(), (0,))
    tensor = wire.tensor_from_array(np.array(admit.tokens, dtype=np.int32), admit.attempt, 0, admit.meta())
    me = peers.Me("intruder", 1, "intruder", daemon.status()["cluster"], "m")

    async def send() -> list:
        channel = await peers.dial("127.0.0.1", daemon.control_port, me)
        channel.send(tensor)
        return [m async for m in channel.messages()]  # until the daemon closes it

    asyncio.run(asyncio.wait_for(send(), 20))
    assert "a token id outside the vocabulary (0..511)" in daemon.log()
    assert stream_text(daemon, PROMPTS[0], 6, temperature=0) == reference(PROMPTS[0], 6)
