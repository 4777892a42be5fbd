"""What a tensor group of 2 ranks costs on this machine: MLX's ring backend over loopback.

Two modes, both by default (`--modes workers,daemons`), one after the other in the same run:

workers: one process running the whole model (a Shard and its StageCaches, stage 0's scheduler
making the steps: what a node runs) against a group of 2 worker processes
(tbmesh.serving.tensor_worker, each holding half of every layer, 2 all-reduces a layer),
driven by the same scheduler from this process as their parent. Greedy decode of 1 request,
and of 8 at once (batched); tokens/s over the whole generation, medians of interleaved
rounds; the group's tokens are checked equal to the process's. Also a bare group of 2 ranks
(generate_locally over the tensor shard, no worker, no scheduler): the floor of the split
itself, which the workers' own cost is read against. And the group's idle CPU
(a ring rank waiting in a collective spins a core; the workers wait on sockets). The cost of
one all_sum over the ring is not measured. The JSON's top-level keys, with the commit and
command that made them.

daemons: the same model served by real `tbmesh daemon`s on loopback (bench/inference.py's
Cluster: --interface lo --memory 8GB --no-probe --context C, a cluster name each), all up at
once, in three shapes:

  1 process      1 daemon, the whole model
  pipeline of 2  2 daemons, --parallel pipeline: /status must show 2 stages
  group of 2     2 daemons, --parallel tensor: /status must show 1 stage whose "group" has 2
                 members (each runs its rank's worker, tbmesh.serving.group)

Each is asked, through the openai SDK (bench/serving.py's complete_ids: AsyncOpenAI, streamed
/v1/completions, the prompt as 11 token ids, temperature 0, max_tokens --tokens), 1 request and
8 at once; tokens/s = the completion tokens summed / (first request sent -> last chunk), i.e.
the whole generation over its wall time. Every round sends fresh prompts (no prefix cache hit)
to the shapes in rotating order; figures are medians over --rounds, ratios (group vs 1 process,
group vs pipeline) medians of the rounds' ratios. Every shape's answers to a prompt must be the
same (text and token count); after each round every shape must still serve its plan (a group
that ends is replanned as layers). Before measuring, each shape answers 1 and 8 requests. The
JSON's "daemons" key (a mode not run keeps its keys from the file's last run).

This machine has 2 vCPUs, so 2 ranks have no core to gain: the figure is the overhead of the
split (IPC, all-reduces over TCP loopback), not a speed-up (see tbmesh.core.tensor_cost for
what Macs over Thunderbolt 5 RDMA may expect).

    .venv/bin/python bench/tensor.py [--modes workers,daemons] [--rounds 3] [--tokens 48]
                                     [--out bench/results/tensor.json]
    .venv/bin/python bench/tensor.py --modes daemons --rounds 1 --tokens 16 --out /tmp/t.json  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
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
from provenance import provenance

from tbmesh.core.generation import Sampling
from tbmesh.runtime.tensor import free_ports, ring_environment, ring_hostfile
from tbmesh.serving.messages import Admit
from tbmesh.serving.scheduler import Scheduler
from tbmesh.serving.settings import ServingSettings
from tbmesh.serving.tensor_worker import Worker


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


# --- the modes -----------------------------------------------------------------------------------

WORKER_CASES = {"1 request": [list(range(1, 11))],
                "8 requests": [[1 + i, *range(20 + 7 * i, 30 + 7 * i)] for i in range(8)]}


def run_workers(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The worker-level figures: one process against a group of 2 workers driven from here,
    and a bare group; bench/results/tensor.json's top-level keys."""
    route = (("g", 0, args.layers),)
    cases = WORKER_CASES
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
        "tokens": args.tokens, "rounds": args.rounds,
        "tokens_per_s": med,
        "group_vs_process": {case: med[f"group of 2, {case}"] / med[f"process, {case}"] for case in cases},
        "bare_group_vs_process": med["bare group of 2 (no worker), 1 request"] / med["process, 1 request"],
        "idle_cpu_share_per_rank": idle,
        "runs": rates,
    }
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "group_vs_process", "bare_group_vs_process",
                                             "idle_cpu_share_per_rank")},
                     indent=2))
    return result


# --- daemons: 1 process, a 2-stage pipeline and a group of 2, served --------------------------------

# name: (daemons, --parallel, members of each stage the plan must have)
SHAPES = {"1 process": (1, "pipeline", [1]), "pipeline of 2": (2, "pipeline", [1, 1]),
          "group of 2": (2, "tensor", [2])}
DAEMON_CASES = {"1 request": 1, "8 requests": 8}
NOTABLE = ("plan epoch", "group", "Traceback", "WARNING", "ERROR")  # daemon log lines shown when a shape fails


def bench_serving() -> Any:
    """bench/serving.py as a module (its helpers: the openai SDK client, the figures). Loaded
    from its file: tests/serving.py, which bench/inference.py puts first on the path, has its name."""
    import importlib.util

    if "bench_serving" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).resolve().parent / "serving.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_serving"] = module  # before running it: its dataclasses look themselves up
        spec.loader.exec_module(module)
    return sys.modules["bench_serving"]


class TokenPrompts:
    """Distinct prompts of 11 token ids, handed out once each (a first token of their own, so that
    no daemon answers one from its prefix cache)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.used = 0

    def take(self, n: int) -> list[list[int]]:
        if self.used + n + 3 > self.vocab:
            raise ValueError(f"more prompts than a vocabulary of {self.vocab} has first tokens: use fewer rounds")
        out = [[3 + k, *(20 + (7 * k + j) % (self.vocab - 20) for j in range(10))]
               for k in range(self.used, self.used + n)]
        self.used += n
        return out


class Shape:
    """One of SHAPES: a cluster of daemons on loopback (bench/inference.py's Cluster)."""

    def __init__(self, name: str, path: Path, work: Path, context: int) -> None:
        from inference import Cluster

        size, parallel, self.want = SHAPES[name]
        self.name = name
        self.parallel = parallel
        self.cluster = Cluster(size, path, work / name.replace(" ", "-"),
                               ["--parallel", parallel, "--context", str(context)])
        self.client: Any = None

    @property
    def daemons(self) -> list[Any]:
        return self.cluster.daemons

    def members(self) -> list[int] | None:
        """Members of each stage of the plan every daemon serves (None while there is none)."""
        from daemons import serving_view

        for daemon in self.daemons:
            if not daemon.alive():
                raise RuntimeError(f"{self.name}: {daemon.name} exited:\n{daemon.log()[-3000:]}\n" + self.notable())
        try:
            view = serving_view(self.daemons)
        except Exception:  # noqa: BLE001  (a daemon busy or not up yet: asked again)
            return None
        if view is None:
            return None
        self.cluster.view = view
        return [len(s.get("group", [s["node"]])) for s in view["plan"]["stages"]]

    def started(self, timeout: float) -> None:
        """Until every daemon answers /status (DaemonProcess.wait_started's 30 s are short for 5
        daemons importing MLX at once on 2 busy cores)."""
        deadline = time.monotonic() + timeout
        for daemon in self.daemons:
            while True:
                if not daemon.alive():
                    raise RuntimeError(f"{self.name}: {daemon.name} exited:\n{daemon.log()[-3000:]}")
                with contextlib.suppress(Exception):  # not up yet
                    if daemon.api_url() and daemon.status():
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {daemon.name} did not start within {timeout:.0f} s")
                time.sleep(0.2)

    def wait(self, timeout: float) -> None:
        """Until every daemon serves a plan of the shape's stages (a group of 2: one stage whose
        "group" has 2 members; a pipeline of 2: 2 stages)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            now = self.members()
            seen = now or seen
            if now == self.want:
                self.cluster.ids = {d.name: d.node_id for d in self.daemons}
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name}: no plan of stages with {self.want} members served within {timeout:.0f} s "
                           f"(the last plan served had {seen}; --parallel {self.parallel})\n" + self.notable())

    def check(self) -> None:
        """The shape still holds (a group that ends is replanned as a pipeline: that would be
        measured as the group otherwise)."""
        self.wait(60)

    def notable(self) -> str:
        lines = [f"  {d.name}: {line}" for d in self.daemons for line in d.log().splitlines()
                 if any(w in line for w in NOTABLE)]
        return "log lines of its daemons:\n" + "\n".join(lines[-40:]) if lines else "(no notable log lines)"

    def group_events(self) -> list[str]:
        """The daemons' log lines about a group that failed, ended or waited."""
        return [f"{d.name}: {line.strip()}" for d in self.daemons for line in d.log().splitlines()
                if "failed to form" in line or "group of layers" in line or "wait for the group" in line]

    def stages(self) -> list[dict[str, Any]]:
        names = {self.cluster.ids[d.name]: d.name for d in self.daemons}
        return [{"layers": f"{s['start']}-{s['end'] - 1}", "node": names.get(s["node"], s["node"]),
                 **({"group": [names.get(m, m) for m in s["group"]]} if s.get("group") else {})}
                for s in self.cluster.view["plan"]["stages"]]

    @property
    def url(self) -> str:
        return self.cluster.entry.api_url() + "/v1"

    def stop(self) -> None:
        self.cluster.stop()


async def burst(shape: Shape, prompts: list[list[int]], tokens: int) -> list[Any]:
    """len(prompts) streamed completions sent at once (bench/serving.py's, through the openai SDK)."""
    import asyncio

    complete = bench_serving().complete_ids
    return list(await asyncio.gather(*(complete(shape.client, shape.cluster.model, p, tokens) for p in prompts)))


async def measure_daemons(shapes: list[Shape], args: argparse.Namespace) -> dict[str, Any]:
    import openai

    serving = bench_serving()
    prompts = TokenPrompts(args.vocab)
    identity = serving.Identity()
    for shape in shapes:
        shape.client = openai.AsyncOpenAI(base_url=shape.url, api_key="none", max_retries=0, timeout=600)
    try:
        for shape in shapes:  # warm-up: a group's first steps are slow (allocations)
            await burst(shape, prompts.take(1), args.tokens)
            await burst(shape, prompts.take(8), args.tokens)
        rates: dict[str, list[float]] = {f"{s.name}, {c}": [] for s in shapes for c in DAEMON_CASES}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in rates}
        short = {s.name: 0 for s in shapes}  # answers that met an end token before --tokens
        for r in range(args.rounds):
            for i, (case, n) in enumerate(DAEMON_CASES.items()):
                sent = prompts.take(n)
                answers: dict[str, list[str]] = {}
                for shape in rotate(shapes, r + i):
                    got = await burst(shape, sent, args.tokens)
                    figures = serving.figures(got)
                    rates[f"{shape.name}, {case}"].append(figures["tokens_per_s"])
                    runs[f"{shape.name}, {case}"].append(figures)
                    answers[shape.name] = [f"[{a.completion_tokens} tokens] {a.text}" for a in got]
                    short[shape.name] += sum(a.completion_tokens != args.tokens for a in got)
                for j in range(n):
                    identity.check(f"{case}, round {r + 1}, prompt {j}", {s: a[j] for s, a in answers.items()})
            for shape in shapes:
                shape.check()
            print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                  flush=True)
    finally:
        for shape in shapes:
            await shape.client.close()
    med = {k: round(median(v), 2) for k, v in rates.items()}

    def ratios(a: str, b: str) -> dict[str, float]:  # medians of the rounds' ratios (both in one round)
        return {case: serving.paired(rates, f"{a}, {case}", f"{b}, {case}") for case in DAEMON_CASES}

    return {
        "tokens": args.tokens, "rounds": args.rounds, "context": args.context,
        "client": f"openai {openai.__version__} AsyncOpenAI: streamed /v1/completions, prompts of 11 token ids, "
                  "temperature 0; tokens/s = usage.completion_tokens summed / (first request sent -> last chunk)",
        "shapes": {s.name: {"daemons": len(s.daemons), "parallel": s.parallel, "stages": s.stages()} for s in shapes},
        "tokens_per_s": med,
        "group_vs_process": ratios("group of 2", "1 process"),
        "group_vs_pipeline": ratios("group of 2", "pipeline of 2"),
        "pipeline_vs_process": ratios("pipeline of 2", "1 process"),
        "answers": identity.result(),
        "answers_shorter_than_asked": short,
        "group_events": [line for s in shapes for line in s.group_events()],
        "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "figures": runs,  # each burst's: TTFT and inter-token latency percentiles, seconds, tokens
    }


def run_daemons(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Daemons on loopback, all up at once: 1, a 2-stage pipeline and a group of 2 (--parallel
    tensor), measured in interleaved rounds in rotating order; the "daemons" key of the JSON."""
    import asyncio
    import shutil
    import signal

    work = Path(tempfile.mkdtemp(prefix="tbmesh-bench-tensor-"))
    shapes = [Shape(name, path, work, args.context) for name in SHAPES]

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    began = time.perf_counter()
    try:
        for daemon in (d for s in shapes for d in s.daemons):  # each spends seconds importing MLX
            daemon.launch()
        for shape in shapes:
            shape.started(args.form_timeout)
        for shape in shapes:
            shape.wait(args.form_timeout)
        print(f"daemons serving after {time.perf_counter() - began:.0f} s: " + "; ".join(
            f"{s.name}: " + ", ".join(f"layers {st['layers']} on " + ("+".join(st["group"]) if "group" in st
                                                                       else st["node"]) for st in s.stages())
            for s in shapes), flush=True)
        print(f"daemons: {args.tokens} tokens a request, 1 and 8 at once, {args.rounds} round(s)", flush=True)
        result = asyncio.run(measure_daemons(shapes, args))
    except BaseException:
        print(f"logs of the daemons in {work}", file=sys.stderr)
        raise
    finally:
        for shape in shapes:
            shape.stop()
        signal.signal(signal.SIGTERM, previous)
    shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - began, 1)
    report_daemons(result)
    return result


def report_daemons(d: dict[str, Any]) -> None:
    print(f"\nserved by daemons on loopback: {d['tokens']} tokens a request, tokens/s over the whole generation, "
          f"medians of {d['rounds']} round(s)")
    print(f"| {'shape':<14} | {'1 request':>9} | {'8 requests':>10} |")
    for name in SHAPES:
        print(f"| {name:<14} | {d['tokens_per_s'][f'{name}, 1 request']:9.1f} | "
              f"{d['tokens_per_s'][f'{name}, 8 requests']:10.1f} |")
    for key, what in (("group_vs_process", "group of 2 vs 1 process"),
                      ("group_vs_pipeline", "group of 2 vs pipeline of 2"),
                      ("pipeline_vs_process", "pipeline of 2 vs 1 process")):
        print(f"{what:<28} " + "  ".join(f"{case} {x:.3f}x" for case, x in d[key].items()))
    print("(ratios: medians of the rounds' ratios, both shapes measured in the same round)")
    a = d["answers"]
    if a["all_identical"]:
        print(f"answers: all {a['compared']} comparisons identical across the shapes at temperature 0")
    else:
        print(f"WARNING: {a['differing']} of {a['compared']} comparisons of answers differ across the shapes "
              "at temperature 0 (examples in the JSON)")
    if any(d["answers_shorter_than_asked"].values()):
        print(f"note: answers that met an end token before {d['tokens']} tokens (counted in tokens/s as they are): "
              + ", ".join(f"{k} {v}" for k, v in d["answers_shorter_than_asked"].items()))
    for line in d["group_events"]:
        print(f"group event: {line}")


def main() -> None:
    if sys.argv[1:2] == ["--bare"]:
        path, layers, tokens, out = sys.argv[2:6]
        bare_rank(Path(path), int(layers), int(tokens), out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="workers,daemons",
                        help="workers: a group of worker processes driven from here; daemons: served by daemons")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=4096, help="the daemons' --context (KV room planned)")
    parser.add_argument("--form-timeout", type=float, default=300, help="seconds for the daemons' plans to serve")
    parser.add_argument("--out", default=str(ROOT / "bench/results/tensor.json"))
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or set(modes) - {"workers", "daemons"}:
        parser.error(f"bad --modes {args.modes!r}: workers, daemons or both")
    if args.hidden % 256:  # the model's heads are hidden / 64, its KV heads half of them: both must split in 2
        parser.error(f"--hidden {args.hidden}: a multiple of 256, so that the heads and KV heads split in 2")

    path = model_dir(args.layers, args.hidden, args.vocab)
    out = Path(args.out)
    try:  # a mode not run keeps its figures from the last run
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {}
    result.update({"python": platform.python_version(), "machine": platform.machine(), "model": path.name})
    for mode in modes:
        if mode == "workers":  # the top-level keys, with what made them
            result.update({**run_workers(args, path), **provenance()})
        else:
            result["daemons"] = {**run_daemons(args, path), **provenance()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", flush=True)
    if "daemons" in modes and not result["daemons"]["answers"]["all_identical"]:
        sys.exit("the shapes' answers differ at temperature 0")


if __name__ == "__main__":
    main()
