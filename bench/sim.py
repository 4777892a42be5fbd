"""Simulated recovery from a leader crash, in virtual time and heartbeat intervals.

For each cluster size and crash kind it forms a cluster in the deterministic simulator,
kills the leader, and measures (virtual time from the crash):
  detected  - every survivor has declared the leader dead
  leader    - every survivor follows one new leader
  plan      - every survivor runs one new plan without the dead node
The baseline in the same run is `detected`: `plan / detected` is what election and
re-planning add on top of failure detection. Medians over several seeds.

    python bench/sim.py [--seeds 5] [--out bench/results/sim.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from provenance import provenance  # bench/ is sys.path[0]
from tbmesh.core.cluster import CoreConfig
from tbmesh.core.presets import preset_spec
from tbmesh.testbed.sim import GB, Simulator, make_info


def topology(n: int) -> list[tuple[int, int]]:
    """Full mesh up to 8 Macs (a Thunderbolt Bridge); beyond, a ring with chords
    (each Mac has at most 4 cables, as Thunderbolt ports allow)."""
    if n <= 8:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    step = max(2, int(n**0.5))
    edges = {tuple(sorted((i, (i + 1) % n))) for i in range(n)}
    edges |= {tuple(sorted((i, (i + step) % n))) for i in range(n)}
    return sorted(edges)


def run_once(n: int, seed: int, reset: bool, config: CoreConfig) -> dict[str, float]:
    sim = Simulator(seed=seed, config=config, keep_events=False)
    ids = [f"mac{i:03d}" for i in range(n)]
    memory = max(64 * GB, 2 * config.model.weight_bytes // n)  # the model fits with room
    for node in ids:
        sim.add_node(make_info(node, memory))
    for i, j in topology(n):
        sim.cable(ids[i], ids[j])
    formed = sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 60, step=0.05)
    assert formed is not None, "cluster did not form"
    sim.run_for(1.0)
    old = sim.nodes[ids[0]].leader
    sim.crash(old, reset=reset)
    t0 = sim.now
    survivors = list(sim.nodes.values())

    def detected() -> bool:
        return all(old not in node.members() for node in survivors)

    def led() -> bool:
        leaders = {node.leader for node in survivors}
        return len(leaders) == 1 and None not in leaders and old not in leaders

    def planned() -> bool:
        plans = {node.plan for node in survivors}
        return len(plans) == 1 and None not in plans and old not in next(iter(plans)).considered

    marks = {}
    for name, cond in (("detected", detected), ("leader", led), ("plan", planned)):
        at = sim.run_until_true(cond, 30, step=0.005)
        assert at is not None, f"{name} not reached"
        marks[name] = at - t0
    marks["messages"] = sim.stats.messages
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", default="4,256")
    parser.add_argument("--out", default="bench/results/sim.json")
    args = parser.parse_args()
    config = CoreConfig(model=preset_spec("kimi-k2-thinking"), context=4096)
    hb = config.timing.heartbeat_interval
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for reset in (True, False):
            started = time.perf_counter()
            runs = [run_once(n, seed, reset, config) for seed in range(args.seeds)]
            wall = (time.perf_counter() - started) / args.seeds
            row = {"nodes": n, "crash": "kill -9 (reset)" if reset else "silent (power cut)",
                   "seeds": args.seeds, "wall_s_per_run": round(wall, 2)}
            for key in ("detected", "leader", "plan"):
                median = statistics.median(r[key] for r in runs)
                row[f"{key}_s"] = round(median, 3)
                row[f"{key}_heartbeats"] = round(median / hb, 1)
            row["plan_over_detected"] = round(row["plan_s"] / row["detected_s"], 2)
            rows.append(row)
            print(f"{n:4d} nodes  {row['crash']:20s}  detected {row['detected_s']:.3f}s "
                  f"({row['detected_heartbeats']} hb)  leader {row['leader_s']:.3f}s "
                  f"({row['leader_heartbeats']} hb)  plan {row['plan_s']:.3f}s "
                  f"({row['plan_heartbeats']} hb)  plan/detected {row['plan_over_detected']}x  "
                  f"[{wall:.1f}s wall per run]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**provenance(), "heartbeat_interval_s": hb, "timing": config.timing.__dict__, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
