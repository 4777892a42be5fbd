"""Tensor-group workers (tbmesh.serving.tensor_worker): 2 real worker processes joined by MLX's
ring backend on loopback, this test as the parent of both, stage 0's real scheduler making
the steps. Tokens against mlx-lm; workers that lose their parent or a peer end at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import mlx.core as mx
import psutil
import pytest
from mlx_lm import load
from test_serving_batch import PROMPTS, Harness, reference

from tbmesh.core.generation import Sampling
from tbmesh.runtime.tensor import free_ports, ring_environment, ring_hostfile
from tbmesh.serving.messages import Member, Origin, Step
from tbmesh.serving.settings import ServingSettings
from tbmesh.serving.tensor_worker import GroupFailed, Worker
from tbmesh.testbed.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=8)  # 4 heads, 2 key-value heads


@pytest.fixture(scope="module")
def mlx_lm_model(model_dir):
    return load(str(model_dir))


def start_group(model_dir: Path, tmp_path: Path, start: int = 0, end: int = 8, size: int = 2,
                step_timeout: float = 60.0) -> list[Worker]:
    ports = free_ports(size + 1)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(ring_hostfile([f"127.0.0.1:{p}" for p in ports[:size]]))
    workers = [Worker.start(model_dir, start, end, {**ENV, **ring_environment(r, str(hostfile))},
                            f"127.0.0.1:{ports[-1]}", node="g", name="group", step_timeout=step_timeout)
               for r in range(size)]
    try:
        for worker in workers:
            worker.ready(timeout=120)
    except BaseException:
        stop(workers)
        raise
    assert sorted(w.rank for w in workers) == list(range(size))
    return sorted(workers, key=lambda w: w.rank)


def stop(workers: list[Worker]) -> list[int]:
    return [w.stop() for w in workers]


class GroupCaches:
    """The group in the place of a stage's StageCaches (the harness calls run(shard, step, x))."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def run(self, shard, step, x):
        return self.worker.run(step, x)


def group_harness(model_dir: Path, workers: list[Worker], splits: list[tuple[int, int]]) -> Harness:
    harness = Harness(model_dir, splits, ServingSettings(prefill_chunk=16))
    harness.route = (("g", *splits[0]), *harness.route[1:])
    harness.caches[0] = GroupCaches(workers[0])
    return harness


@pytest.mark.slow  # CI's time budget: test_tensor_serving.py runs 8 concurrent requests through daemons' groups
def test_four_concurrent_requests_give_mlx_lm_tokens(model_dir, mlx_lm_model, tmp_path):
    workers = start_group(model_dir, tmp_path)
    try:
        assert all(w.size == 2 for w in workers)
        harness = group_harness(model_dir, workers, [(0, 8)])
        budgets = [20, 32, 12, 28]
        harness.run({2 * i: [(f"r{i}.0", PROMPTS[i], budgets[i])] for i in range(4)})
        for i in range(4):
            assert harness.out[f"r{i}"] == reference(mlx_lm_model, PROMPTS[i], budgets[i]), i
        decodes = [s for s in harness.steps if s.kind == "decode"]
        assert max(len(s.members) for s in decodes) == 4  # they ran batched
        # the finished requests' caches stay as prefix-cache entries, in the workers
        assert workers[0].figures()["prefix_entries"] == 4 and workers[0].held.routes
        workers[0].drop(lambda route: False)
        assert workers[0].figures()["prefix_entries"] == 0 and not workers[0].held.routes
        assert workers[0].figures()["kv_bytes"] == 0
    finally:
        assert stop(workers) == [0, 0]


@pytest.mark.slow  # CI's time budget
def test_a_group_stage_chained_with_a_plain_shard(model_dir, mlx_lm_model, tmp_path):
    """Layers [0, 4) on the group, [4, 8) a plain Shard in this process: hidden states
    come out of the group and go on."""
    workers = start_group(model_dir, tmp_path, 0, 4)
    try:
        harness = group_harness(model_dir, workers, [(0, 4), (4, 8)])
        harness.run({i: [(f"r{i}.0", PROMPTS[i], 16)] for i in range(3)})
        for i in range(3):
            assert harness.out[f"r{i}"] == reference(mlx_lm_model, PROMPTS[i], 16), i
    finally:
        assert stop(workers) == [0, 0]


def idle_cpu(workers: list[Worker], seconds: float) -> list[float]:
    procs = [psutil.Process(w.process.pid) for w in workers]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(seconds)
    return [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)]


@pytest.mark.slow  # CI's time budget
def test_an_idle_group_sleeps(model_dir, tmp_path):
    """The ranks wait for work on sockets, not in a collective (where ring spins a core)."""
    workers = start_group(model_dir, tmp_path)
    try:
        assert max(idle_cpu(workers, 2.0)) < 0.2
    finally:
        stop(workers)


def exit_within(worker: Worker, seconds: float) -> float:
    start = time.monotonic()
    worker.process.wait(seconds)
    return time.monotonic() - start


def test_a_worker_whose_parent_goes_away_exits(model_dir, tmp_path):
    workers = start_group(model_dir, tmp_path)
    try:
        workers[1].connection.close()  # rank 1's parent is gone
        assert exit_within(workers[1], 5) < 5 and workers[1].process.returncode == 0
        assert exit_within(workers[0], 5) < 5  # and rank 0 sees rank 1 go
        with pytest.raises(GroupFailed, match="another rank of the group is gone"):
            workers[0].run(prefill_step(), mx.array([[1, 2, 3]], dtype=mx.int32), timeout=5)
    finally:
        stop(workers)


def prefill_step(tokens: int = 3) -> Step:
    member = Member("a", "entry", 0, 0, Sampling(), Origin())
    return Step((("g", 0, 8),), 0, "prefill", members=(member,), start=0, length=tokens)


@pytest.mark.parametrize("busy", [pytest.param(False, marks=pytest.mark.slow), True], ids=["idle", "mid-step"])
def test_a_rank_that_dies_fails_the_group_fast(model_dir, tmp_path, busy):
    workers = start_group(model_dir, tmp_path)
    try:
        failure: list[BaseException] = []
        started = threading.Event()
        if busy:  # a long prefill (seconds here), rank 1 killed in its middle
            prompt = mx.array([[(7 * i) % 500 + 4 for i in range(500)]], dtype=mx.int32)

            def run() -> None:
                started.set()
                try:
                    workers[0].run(prefill_step(500), prompt, timeout=30)
                except GroupFailed as error:
                    failure.append(error)

            thread = threading.Thread(target=run)
            thread.start()
            started.wait()
            time.sleep(0.3)
        killed = time.monotonic()
        os.kill(workers[1].process.pid, signal.SIGKILL)
        workers[0].process.wait(10)
        took = time.monotonic() - killed
        assert took < 2.0, took
        if busy:
            thread.join(10)
            assert failure  # whichever noticed first: the control channel or the ring
        else:
            with pytest.raises(GroupFailed):
                workers[0].run(prefill_step(), mx.array([[1, 2, 3]], dtype=mx.int32), timeout=5)
    finally:
        stop(workers)


@pytest.mark.slow  # CI's time budget
def test_a_hung_step_is_bounded_by_the_step_timeout(model_dir, tmp_path):
    """A peer that vanishes without closing its sockets (SIGSTOP stands in for a Mac switched
    off): rank 0 waits in an all-reduce until its watchdog ends it."""
    workers = start_group(model_dir, tmp_path, step_timeout=2.0)
    try:
        os.kill(workers[1].process.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(GroupFailed, match="more than 2 s"):
            workers[0].run(prefill_step(), mx.array([[1, 2, 3]], dtype=mx.int32), timeout=30)
        assert time.monotonic() - start < 5
    finally:
        os.kill(workers[1].process.pid, signal.SIGKILL)
        stop(workers)
