"""What a tensor group of 2 ranks costs on this machine: MLX's ring backend over loopback.

One process running the whole model (a Shard and its StageCaches, stage 0's scheduler making
the steps: what a node runs) against a group of 2 worker processes
(tbmesh.runtime.tensor_worker, each holding half of every layer, 2 all-reduces a layer),
driven by the same scheduler from this process as their parent. Greedy decode of 1 request,
and of 8 at once (batched); tokens/s over the whole generation, medians of interleaved
rounds; the group's tokens are checked equal to the process's. Also a bare group of 2 ranks
(generate_locally over the tensor shard, no worker, no scheduler): the floor of the split
itself, which the workers' own cost is read against. And the group's idle CPU
(a ring rank waiting in a collective spins a core; the workers wait on sockets) and what a
bare all_sum costs over the ring.

This machine has 2 vCPUs, so 2 ranks have no core to gain: the figure is the overhead of the
split (IPC, all-reduces over TCP loopback), not a speed-up (see tbmesh.core.tensor_cost for
what Macs over Thunderbolt 5 RDMA may expect).

    .venv/bin/python bench/tensor.py [--rounds 3] [--tokens 48] [--out bench/results/tensor.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import ROOT, median, model_dir, rotate

from tbmesh.generation import Sampling
from tbmesh.runtime.tensor import free_ports, ring_environment, ring_hostfile
from tbmesh.runtime.tensor_worker import Worker
from tbmesh.serving.messages import Admit
from tbmesh.serving.scheduler import Scheduler
from tbmesh.serving.settings import ServingSettings


def generate(run: Callable[[Any, np.ndarray], Any], route: tuple, prompts: list[list[int]],
             max_tokens: int) -> tuple[dict[str, list[int]], float]:
    """Stage 0's scheduler over one stage, `run(step, x)` running each step; (tokens, seconds)."""
    ids = itertools.count()
    scheduler = Scheduler(ServingSettings(), lambda: f"x{next(ids)}")
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        scheduler.admit(Admit(f"r{i}", route, "entry", tuple(prompt), 0, max_tokens, Sampling(), ()))
    while (found := scheduler.next_step()) is not None:
        step, tokens = found
        shape = (len(step.members), 1) if step.kind == "decode" else (1, len(tokens))
        outcome = run(step, np.array(tokens, np.int32).reshape(shape) if tokens else np.zeros((0,), np.int32))
        if step.kind == "decode":
            sampled = {m.attempt: (m.step, outcome.tokens[m.attempt]) for m in outcome.ran}
            scheduler.on_tokens(step.lane, sampled)
            for attempt, (_, token) in sampled.items():
                out[attempt].append(token)
    return out, time.perf_counter() - start


class Local:
    """The whole model in this process, as one node runs a stage."""

    def __init__(self, path: Path, layers: int) -> None:
        from tbmesh.runtime.shard import load_shard

        self.shard = load_shard(path, 0, layers)
        self.reset()

    def reset(self) -> None:
        from tbmesh.serving.stage import StageCaches

        self.caches = StageCaches("g", "local")

    def run(self, step: Any, x: np.ndarray) -> Any:
        import mlx.core as mx

        return self.caches.run(self.shard, step, mx.array(x) if x.size else None)


class Group:
    def __init__(self, worker: Worker) -> None:
        self.run = worker.run
        self.reset = lambda: worker.drop(lambda route: False)


def start_group(path: Path, layers: int, work: Path) -> list[Worker]:
    ports = free_ports(3)
    hostfile = work / "hosts.json"
    hostfile.write_text(ring_hostfile([f"127.0.0.1:{p}" for p in ports[:2]]))
    env = {"PYTHONPATH": str(ROOT)}
    workers = [Worker.start(path, 0, layers, {**env, **ring_environment(r, str(hostfile))}, f"127.0.0.1:{ports[2]}",
                            node="g") for r in range(2)]
    for w in workers:
        w.ready(timeout=300)
    return sorted(workers, key=lambda w: w.rank)


def bare_rank(path: Path, layers: int, tokens: int, out: str) -> None:
    """One rank of a bare group (no worker, no scheduler): generate_locally over the tensor
    shard, as tests/tensor_rank.py does; rank 0 writes its decode rate."""
    import mlx.core as mx

    from tbmesh.runtime.sampling import Sampling as Greedy
    from tbmesh.runtime.shard import generate_locally
    from tbmesh.runtime.tensor import load_tensor_shard

    group = mx.distributed.init(backend="ring", strict=True)
    shard = load_tensor_shard(path, 0, layers, group)
    generate_locally([shard], list(range(1, 11)), tokens, Greedy())  # warm-up, as the others have
    start = time.perf_counter()
    got = generate_locally([shard], list(range(1, 11)), tokens, Greedy())
    seconds = time.perf_counter() - start
    if group.rank() == 0:
        Path(out).write_text(json.dumps({"tokens": got, "tokens_per_s": len(got) / seconds}))


def run_bare(path: Path, layers: int, tokens: int, work: Path) -> dict[str, Any]:
    """A bare group of 2 ranks, started for one generation; rank 0's result."""
    import os
    import subprocess

    ports = free_ports(2)
    hostfile = work / "bare-hosts.json"
    hostfile.write_text(ring_hostfile([f"127.0.0.1:{p}" for p in ports]))
    out = work / "bare.json"
    procs = [subprocess.Popen([sys.executable, __file__, "--bare", str(path), str(layers), str(tokens), str(out)],
                              env={**os.environ, "PYTHONPATH": str(ROOT), **ring_environment(r, str(hostfile))},
                              stderr=subprocess.DEVNULL) for r in range(2)]
    for proc in procs:
        if proc.wait(600) != 0:
            raise RuntimeError("a rank of the bare group failed")
    return json.loads(out.read_text())


def idle_cpu(workers: list[Worker], seconds: float = 3.0) -> list[float]:
    import psutil

    procs = [psutil.Process(w.process.pid) for w in workers]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(seconds)
    return [(sum(p.cpu_times()[:2]) - b) / seconds for p, b in zip(procs, before)]


def main() -> None:
    if sys.argv[1:2] == ["--bare"]:
        path, layers, tokens, out = sys.argv[2:6]
        bare_rank(Path(path), int(layers), int(tokens), out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench/results/tensor.json"))
    args = parser.parse_args()

    path = model_dir(args.layers, args.hidden, args.vocab)
    route = (("g", 0, args.layers),)
    cases = {"1 request": [list(range(1, 11))],
             "8 requests": [[1 + i, *range(20 + 7 * i, 30 + 7 * i)] for i in range(8)]}
    with tempfile.TemporaryDirectory() as work:
        workers = start_group(path, args.layers, Path(work))
        try:
            runners = {"process": Local(path, args.layers), "group of 2": Group(workers[0])}
            for runner in runners.values():  # warm-up: the first steps of a group are slow (allocations)
                runner.reset()
                generate(runner.run, route, cases["8 requests"], args.tokens)
            rates: dict[str, list[float]] = {f"{r}, {c}": [] for r in runners for c in cases}
            expected_one: list[int] = []
            for r in range(args.rounds):
                for case, prompts in cases.items():
                    expected = None
                    for name in rotate(list(runners), r):
                        runners[name].reset()
                        out, seconds = generate(runners[name].run, route, prompts, args.tokens)
                        if expected is not None and out != expected:
                            raise RuntimeError(f"{name} gave other tokens ({case})")
                        expected = out
                        expected_one = out["r0"] if case == "1 request" else expected_one
                        rates[f"{name}, {case}"].append(sum(map(len, out.values())) / seconds)
                bare = run_bare(path, args.layers, args.tokens, Path(work))
                if bare["tokens"] != expected_one:
                    raise RuntimeError("the bare group gave other tokens")
                rates.setdefault("bare group of 2 (no worker), 1 request", []).append(bare["tokens_per_s"])
                print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                      flush=True)
            idle = idle_cpu(workers)
        finally:
            for w in workers:
                w.stop()
    med = {k: median(v) for k, v in rates.items()}
    result = {
        "python": platform.python_version(), "machine": platform.machine(), "model": path.name,
        "tokens": args.tokens, "rounds": args.rounds,
        "tokens_per_s": med,
        "group_vs_process": {case: med[f"group of 2, {case}"] / med[f"process, {case}"] for case in cases},
        "bare_group_vs_process": med["bare group of 2 (no worker), 1 request"] / med["process, 1 request"],
        "idle_cpu_share_per_rank": idle,
        "runs": rates,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "group_vs_process", "bare_group_vs_process",
                                             "idle_cpu_share_per_rank")},
                     indent=2))


if __name__ == "__main__":
    main()
