"""The serving engine (serving/engine.py) in one process: a fake Host stands in for the daemon
(the cluster view, and a data plane that hands each message to the engine it is for, on the
next turn of the loop, as a connection would), while the engines load a tiny model, run
their steps in MLX and answer token for token as single-process mlx-lm. No subprocess, no
socket: test_serving*.py and test_chaos.py drive the same engine through real daemons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from tbmesh.core.generation import Sampling, Unavailable
from tbmesh.core.messages import DiskState, ShardState
from tbmesh.core.types import Plan, Stage
from tbmesh.runtime.sampling import make_sampler
from tbmesh.serving.engine import Engine
from tbmesh.serving.settings import ServingSettings
from tbmesh.serving.view import ClusterView
from tbmesh.testbed.tiny import make_tiny_model

PROMPT = [5, 17, 42, 99, 3, 250]
MAX_TOKENS = 12
GREEDY = Sampling(temperature=0.0, top_p=1.0, seed=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=4, hidden=128, vocab=512)


@pytest.fixture(scope="module")
def expected(tiny):
    """Single-process mlx-lm's greedy answer to PROMPT."""
    model, tokenizer = load(str(tiny))
    tokens = []
    for token, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS, sampler=make_sampler(Sampling())):
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    return tokens


@dataclass
class Cluster:
    """What the daemons would agree on: the plans, the shards each node publishes, who answers."""

    loop: asyncio.AbstractEventLoop
    plan: Plan | None = None
    engines: dict[str, Engine] = field(default_factory=dict)
    shards: dict[str, ShardState] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)  # nodes that stopped answering
    events: list[tuple[str, str]] = field(default_factory=list)

    def engine(self, node: str, model_dir: Path, **settings) -> Engine:
        self.engines[node] = Engine(FakeHost(self, node), model_dir, ServingSettings(**settings))
        return self.engines[node]

    def commit(self, plan: Plan | None) -> None:
        """A plan runs: every engine follows it (as the daemon calls on_view)."""
        self.plan = plan
        for node, engine in self.engines.items():
            if node not in self.down:
                engine.on_view(plan, None)

    def changed(self) -> None:
        """Something in the view changed (the daemon's carry_out tells every engine)."""
        for node, engine in self.engines.items():
            if node not in self.down:
                engine.on_cluster_change()


class FakeHost:
    """The daemon, as the engine sees it (tbmesh.serving.host.Host), for one node of a Cluster."""

    def __init__(self, cluster: Cluster, me: str) -> None:
        self.cluster, self.me, self.name, self.loop = cluster, me, me, cluster.loop

    def view(self) -> ClusterView:
        c = self.cluster
        members = c.plan.members if c.plan is not None else ()
        return ClusterView(self.me, c.plan, None, "", "leader" if c.plan else None, dict(c.shards),
                           {n: n for n in c.engines}, {m: m in c.down for m in members}, context=4096)

    def send(self, node: str, message: object) -> bool:
        if node not in self.cluster.engines or {node, self.me} & self.cluster.down:
            return False
        self.loop.call_soon(self.cluster.engines[node].receive, message)
        return True

    def shard_changed(self, state: ShardState | None) -> None:
        if state is None:
            self.cluster.shards.pop(self.me, None)
        else:
            self.cluster.shards[self.me] = state
        self.cluster.changed()

    def record(self, kind: str, node: str | None, detail: str) -> None:
        self.cluster.events.append((kind, detail))

    def disk_changed(self, state: DiskState | None) -> None:
        pass

    def group_addresses(self, members: Sequence[str]) -> list[str]:
        raise ConnectionError("no tensor groups here")

    def bulk_connect(self, node: str):
        raise OSError("no bulk connections here")


def plan(epoch: int, model: Path, *stages: tuple[str, int, int]) -> Plan:
    return Plan(1, epoch, model.name, tuple(Stage(node, start, end, 0) for node, start, end in stages))


async def answer(engine: Engine, model: Path, sampling: Sampling = GREEDY) -> list[int]:
    return [token async for token in engine.generate(model.name, PROMPT, MAX_TOKENS, sampling)]


async def closed(cluster: Cluster) -> None:
    for engine in cluster.engines.values():
        await engine.close()


def test_a_two_stage_pipeline_answers_as_mlx_lm_once_its_stages_serve(tiny, expected):
    async def run() -> None:
        cluster = Cluster(asyncio.get_running_loop())
        a, _ = cluster.engine("a", tiny), cluster.engine("b", tiny)
        cluster.commit(plan(1, tiny, ("a", 0, 2), ("b", 2, 4)))
        try:  # asked at once: it waits for both stages to load, woken by their shards changing
            assert await asyncio.wait_for(answer(a, tiny), 60) == expected
            assert cluster.shards["a"].serving == cluster.shards["b"].serving == 1
            assert a.counters.tokens == len(expected) and cluster.engines["b"].counters.steps > 0
        finally:
            await closed(cluster)

    asyncio.run(run())


def test_a_waiting_request_arms_one_timer_at_its_resume_wait_and_fails_there_saying_why(tiny):
    async def run() -> None:
        cluster = Cluster(asyncio.get_running_loop())
        engine = cluster.engine("a", tiny, resume_wait=0.5)
        started = time.monotonic()
        request = asyncio.ensure_future(answer(engine, tiny))
        await asyncio.sleep(0.1)
        assert not request.done() and engine._timer_at == pytest.approx(started + 0.5, abs=0.1)
        with pytest.raises(Unavailable, match="no plan yet: waiting for a leader"):
            await asyncio.wait_for(request, 5)
        assert 0.5 <= time.monotonic() - started < 2.0
        assert engine._timer is None and not engine.conductor.requests
        await closed(cluster)

    asyncio.run(run())


def test_a_request_whose_stage_stopped_answering_resumes_on_the_next_plan_token_for_token(tiny, expected):
    async def run() -> None:
        cluster = Cluster(asyncio.get_running_loop())
        entry, _ = cluster.engine("a", tiny), cluster.engine("b", tiny)
        cluster.commit(plan(1, tiny, ("b", 0, 4)))  # a enters requests, b runs every layer
        try:
            tokens = []
            stream = entry.generate(tiny.name, PROMPT, MAX_TOKENS, GREEDY)
            tokens.append(await asyncio.wait_for(anext(stream), 60))
            cluster.down.add("b")  # b goes silent mid-answer; then a new plan gives a the layers
            entry.on_node_trouble("b", gone=True)
            cluster.shards.pop("b")
            cluster.commit(plan(2, tiny, ("a", 0, 4)))
            tokens += [token async for token in stream]
            assert tokens == expected  # the resumed attempt prefilled prompt + tokens so far
            assert entry.counters.resumed == 1 and [kind for kind, _ in cluster.events] == ["resumed"]
        finally:
            await closed(cluster)

    asyncio.run(run())


def test_a_route_that_failed_is_tried_again_at_its_back_off_deadline_not_by_a_poll(tiny, expected):
    async def run() -> None:
        cluster = Cluster(asyncio.get_running_loop())
        entry, _ = cluster.engine("a", tiny), cluster.engine("b", tiny)
        cluster.commit(plan(1, tiny, ("b", 0, 4)))
        try:
            await asyncio.wait_for(answer(entry, tiny), 60)  # b serves
            cluster.down.add("a")  # a's messages go nowhere for a moment: its admit finds no route
            request = asyncio.ensure_future(answer(entry, tiny))
            await asyncio.sleep(0)
            (waiting,) = entry.conductor.requests.values()
            assert waiting.failed_route and entry._timer_at == waiting.retry_at  # the back-off's end
            cluster.down.discard("a")
            assert await asyncio.wait_for(request, 60) == expected  # taken again at the deadline
        finally:
            await closed(cluster)

    asyncio.run(run())


def test_weights_that_turned_nan_in_memory_go_are_read_again_and_the_request_resumes_on_them(tiny, expected):
    async def run() -> None:
        cluster = Cluster(asyncio.get_running_loop())
        engine = cluster.engine("a", tiny)
        engine.keeper.retry_s = 0.5  # a failed load is tried again after 10 s; sooner here
        cluster.commit(plan(1, tiny, ("a", 0, 4)))
        try:
            assert await asyncio.wait_for(answer(engine, tiny), 60) == expected
            mlp = engine.held[(0, 4)].layer(1).mlp

            def flip() -> None:  # a bit flipped in memory: one weight is NaN now (in the MLX thread: its stream)
                mlp.down_proj.weight = mlp.down_proj.weight.at[0, 0].add(float("nan"))
                mx.eval(mlp.down_proj.weight)

            flipped = asyncio.get_running_loop().create_future()
            engine.thread.submit(flip, lambda _, error: flipped.set_result(error))
            assert await flipped is None
            assert await asyncio.wait_for(answer(engine, tiny), 60) == expected  # on the layers read again
            assert [kind for kind, _ in cluster.events] == ["damaged", "resumed"]
            assert "model.layers.1.mlp.down_proj.weight of layers 0-3" in cluster.events[0][1]
            assert engine.counters.loads == 2 and engine.counters.refused_nonfinite == 1
        finally:
            await closed(cluster)

    asyncio.run(run())
