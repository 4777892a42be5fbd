"""What the stages' check for values that are not finite costs a decode step (serving/stage.py).

The test model (12 x 256, float32) through 1 and 3 stages of StageCaches in one process, one
token at a time; each step runs once with the check and once with it replaced by a constant
(`finite_rows`), alternately, on caches of their own, so drift of a shared machine falls on
both alike. CPU time of this process (its MLX threads included), not wall time: on a busy
2-vCPU machine the wall clock mostly measures the neighbours.

    python bench/finite_check.py            # writes bench/results/finite_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from provenance import provenance  # bench/ is sys.path[0]
from tbmesh.core.generation import Sampling
from tbmesh.runtime.shard import load_shard
from tbmesh.serving import stage
from tbmesh.serving.messages import Member, Origin, Step
from tbmesh.testbed.tiny import make_tiny_model

CHECKED = stage.finite_rows


def unchecked(x: mx.array) -> mx.array:
    return mx.ones((x.shape[0],), dtype=mx.bool_)


def route_of(model: Path, splits: list[tuple[int, int]], rows: int):
    shards = [load_shard(model, s, e) for s, e in splits]
    route = tuple((f"n{i}", s, e) for i, (s, e) in enumerate(splits))
    caches = [stage.StageCaches(f"n{i}", f"n{i}") for i in range(len(splits))]
    members = tuple(Member(f"r{j}.0", "e", 0, 0, Sampling(), Origin()) for j in range(rows))
    return shards, route, caches, members


def decode_step(shards, route, caches, members, position: int) -> float:
    """CPU seconds of one decode step through every stage."""
    x = mx.array([[5 + j] for j in range(len(members))], dtype=mx.int32)
    step_members = tuple(Member(m.attempt, m.entry, position, position, m.sampling,
                                m.origin if position == 0 else None) for m in members)
    began = time.process_time()
    for i, shard in enumerate(shards):
        x = caches[i].run(shard, Step(route, i, "decode", "L", step_members), x).out
    return time.process_time() - began


def measure(model: Path, stages: int, rows: int, rounds: int, steps: int = 300, warm: int = 20) -> dict:
    layers = 12 // stages
    splits = [(i * layers, (i + 1) * layers) for i in range(stages)]
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for _ in range(rounds):
        routes = {mode: route_of(model, splits, rows) for mode in times}
        for position in range(steps):
            for mode in ("checked", "unchecked") if position % 2 else ("unchecked", "checked"):
                stage.finite_rows = CHECKED if mode == "checked" else unchecked
                spent = decode_step(*routes[mode], position)
                if position >= warm:
                    times[mode].append(spent)
    stage.finite_rows = CHECKED
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    means = {mode: statistics.mean(ts) for mode, ts in times.items()}
    return {"stages": stages, "rows": rows, "steps": len(times["checked"]),
            "median_ms": {m: round(v * 1e3, 3) for m, v in medians.items()},
            "median_cost": round(medians["checked"] / medians["unchecked"] - 1, 4),
            "mean_cost": round(means["checked"] / means["unchecked"] - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finite_check.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny", layers=12, hidden=256, vocab=512)
        results = [measure(model, stages, rows, args.rounds) for stages, rows in ((1, 1), (3, 1), (3, 4))]
    for r in results:
        print(f"{r['stages']} stage(s), {r['rows']} row(s), {r['steps']} steps each: "
              f"{r['median_ms']['unchecked']:.2f} -> {r['median_ms']['checked']:.2f} ms CPU a step "
              f"(median {100 * r['median_cost']:+.2f}%, mean {100 * r['mean_cost']:+.2f}%)")
    args.out.write_text(json.dumps({**provenance(), "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
