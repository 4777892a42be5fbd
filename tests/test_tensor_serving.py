"""Tensor groups served by real daemons on loopback (`--parallel tensor`): each member runs its
rank's worker process (tbmesh.serving.group), joined by MLX's ring backend over TCP, and the
answers are single-process mlx-lm's, token for token, asked through the `openai` SDK.

    3 daemons    a group of 2 and 1 Mac, as a pipeline of two stages: 8 concurrent requests
    2 daemons    a group of 2 holding every layer: 8 concurrent requests; a member killed
                 mid-answer (the survivor serves alone, the answer goes on); a third Mac joins
                 mid-answer (the cluster re-forms, a group again, and no answer is lost)

The model has 4 attention heads and 2 key-value heads: it splits into 2 (tbmesh.core.modelspec).
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from daemons import DaemonProcess, start_all, wait_for
from serving import mlx_reference

from tbmesh.testbed.tiny import make_tiny_model

PROMPTS = ["The quick brown fox", "Thunderbolt cables link the Macs", "Hello", "one two three",
           "Macs in a ring", "tensor groups", "a b c d e f", "split every layer"]
LONG = "Thunderbolt cables link the Macs"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=8, hidden=128, vocab=512,
                           heads=4, kv_heads=2, seed=1)  # seed 1: LONG's greedy answer has no end token for 800


@pytest.fixture(scope="module")
def reference(model_dir):
    return mlx_reference(model_dir)


@pytest.fixture
def tensor_cluster(tmp_path, model_dir):
    name = f"t{uuid.uuid4().hex[:8]}"
    started: list[DaemonProcess] = []

    def make(node: str) -> DaemonProcess:
        daemon = DaemonProcess(node, tmp_path / node, ["--interface", "lo", "--memory", "4GB", "--model",
                                                       str(model_dir), "--cluster", name, "--no-probe",
                                                       "--parallel", "tensor"])
        started.append(daemon)
        return daemon

    def start(n: int) -> list[DaemonProcess]:
        return start_all([make(f"n{i}") for i in range(n)])

    start.make = make
    yield start
    for daemon in started:
        daemon.kill()


def client(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url() + "/v1", api_key="none", max_retries=0, timeout=120)


def serving_plan(daemons: list[DaemonProcess], shape: list[int]) -> dict:
    """Wait until every daemon runs one plan whose stages have `shape` members each (in any
    order), every member serving it; returns that plan (as /status gives it)."""
    def ready():
        views = [d.status() for d in daemons]
        plan = views[0]["plan"]
        if plan is None or views[0]["preparing"] is not None or any(v["plan"] != plan for v in views):
            return None
        if sorted(len(s.get("group", [s["node"]])) for s in plan["stages"]) != sorted(shape):
            return None
        members = {m for s in plan["stages"] for m in s.get("group", [s["node"]])}
        serving = {n["id"] for n in views[0]["nodes"] if n["shard"] and n["shard"]["serving"] == plan["epoch"]}
        return plan if members <= serving else None

    return wait_for(ready, 60, f"a plan of stages with {shape} members serving")


def ask(daemon: DaemonProcess, prompt: str, max_tokens: int) -> str:
    answer = client(daemon).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return answer.choices[0].text


class Streamed(threading.Thread):
    """A streamed completion through the openai SDK, read in the background."""

    def __init__(self, daemon: DaemonProcess, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.pieces: list[str] = []
        self.error: BaseException | None = None
        self.stream = client(daemon).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0, stream=True)
        self.start()

    def run(self) -> None:
        try:
            for chunk in self.stream:
                self.pieces.append(chunk.choices[0].text)
        except BaseException as error:  # noqa: BLE001 (the test reads it)
            self.error = error

    def wait_pieces(self, n: int) -> None:
        wait_for(lambda: len(self.pieces) >= n or not self.is_alive(), 60, f"{n} pieces")

    def text(self) -> str:
        self.join(180)
        assert not self.is_alive() and self.error is None, self.error
        return "".join(self.pieces)


def test_a_group_of_two_and_one_mac_answer_eight_concurrent_requests_as_mlx_lm(tensor_cluster, reference):
    daemons = tensor_cluster(3)
    plan = serving_plan(daemons, [2, 1])
    first, second = plan["stages"]
    assert (first["start"], first["end"], second["start"]) == (0, second["start"], first["end"])
    assert second["end"] == 8
    group, single = (first, second) if "group" in first else (second, first)
    assert group["node"] == group["group"][0] and single["node"] not in group["group"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: ask(daemons[PROMPTS.index(p) % 3], p, 24), PROMPTS))
    assert answers == [reference(p, 24)[0] for p in PROMPTS]
    # every member ran its worker; rank 0 (the stage's node) ran the steps, batched
    status = {d.node_id: d.status() for d in daemons}
    first = status[group["node"]]["runtime"]
    assert first["steps"] > 0 and first["weight_bytes"] > 0
    other = status[group["group"][1]]["runtime"]
    assert other["weight_bytes"] > 0 and other["steps"] == 0
    # the prefix cache: the group's caches (in its workers) keep the finished prompts, and a
    # prompt asked again starts from them
    assert first["prefix_entries"] > 0 and first["prefix_tokens"] > 0
    hits = sum(d.status()["runtime"]["prefix_hits"] for d in daemons)
    assert ask(daemons[0], PROMPTS[1], 24) == reference(PROMPTS[1], 24)[0]
    assert sum(d.status()["runtime"]["prefix_hits"] for d in daemons) > hits


@pytest.mark.slow  # the kill and the join take a minute; the group of 2 + 1 above runs in CI
def test_a_member_killed_mid_answer_and_a_join_lose_no_answer(tensor_cluster, reference):
    daemons = tensor_cluster(2)
    plan = serving_plan(daemons, [2])
    group = plan["stages"][0]
    assert (group["start"], group["end"]) == (0, 8)
    by_id = {d.node_id: d for d in daemons}
    rank0, rank1 = (by_id[n] for n in group["group"])
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # the group alone: 8 concurrent requests
        answers = list(pool.map(lambda p: ask(daemons[PROMPTS.index(p) % 2], p, 24), PROMPTS))
    assert answers == [reference(p, 24)[0] for p in PROMPTS]
    expected = reference(LONG, 400)[0]
    # a member killed mid-answer: the survivor serves alone, the answer goes on
    stream = Streamed(rank0, LONG, 400)
    stream.wait_pieces(30)
    rank1.kill()
    assert stream.text() == expected
    serving_plan([rank0], [1])
    # a Mac joins mid-answer: the cluster forms a group again, no answer lost; the Mac that
    # serves alone goes on while the group forms over the same layers, until the commit
    expected, count = reference(LONG, 800)
    assert count == 800
    stream = Streamed(rank0, LONG, 800)
    stream.wait_pieces(30)
    joined = tensor_cluster.make("n2").start()
    streamed_while_forming = []

    def committed() -> bool:
        view = rank0.status()
        if view["preparing"] is not None:
            streamed_while_forming.append(len(stream.pieces))
            return False
        return bool(streamed_while_forming) and "group" in view["plan"]["stages"][0]

    wait_for(committed, 60, "the group's plan committed", step=0.02)
    assert streamed_while_forming[-1] > streamed_while_forming[0] and stream.is_alive()
    assert stream.text() == expected
    serving_plan([rank0, joined], [2])
    assert ask(joined, LONG, 40) == reference(LONG, 40)[0]


@pytest.mark.slow  # the group's own tests run in CI; this adds the weights fetched from a peer
def test_a_mac_with_no_weights_joins_a_group_with_the_tensors_it_fetched(tensor_cluster, reference, tmp_path):
    holder = tensor_cluster(1)[0]
    serving_plan([holder], [1])
    empty = DaemonProcess("empty", tmp_path / "empty", ["--interface", "lo", "--memory", "4GB", "--model", "tiny",
                                                        "--cluster", holder.args[holder.args.index("--cluster") + 1],
                                                        "--no-probe", "--parallel", "tensor"]).start()
    try:
        serving_plan([holder, empty], [2])
        assert not list((tmp_path / "empty").rglob("model*.safetensors"))  # its worker read the store
        assert empty.status()["runtime"]["weight_bytes"] > 0
        assert ask(empty, LONG, 40) == reference(LONG, 40)[0]
    finally:
        empty.kill()
