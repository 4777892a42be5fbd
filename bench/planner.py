"""Time the layer planner on clusters of 4, 64 and 256 Macs and models of 61 and 1000 layers.

Inputs per case: uniform layers (a 600 GB model, 4096 tokens of KV room), Macs of varied
memory (64 to 512 GB, 75% usable), cables in a chain (Thunderbolt 5 and 4 speeds), and a
previous plan made with one more Mac at the end of the chain, which has just left: the
minimal-movement path runs.

Reported (medians of --repeat runs, same process, same inputs):
  planner_ms      plan_layers with links and the previous plan
  fresh_ms        the same without a previous plan (the baseline: ratio = planner / fresh)
  even_split_ms   mlx-lm's even split, for scale; `even_overloaded` counts the Macs it
                  would overfill
  moved_gb        bytes to load after the leave, with the previous plan / from scratch

    python bench/planner.py [--repeat 7] [--out bench/results/planner.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

from provenance import provenance  # bench/ is sys.path[0]
from tbmesh.core.planner import bytes_to_load, plan_layers
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Stage

GB = 10**9
MODEL_BYTES = 600 * GB
CONTEXT = 4096
MAC_MEMORY_GB = (64, 128, 192, 256, 512)
TB5, TB4 = 7.5e9, 3.5e9  # measured bytes/s, roughly


def case(n: int, layers: int) -> dict:
    """n Macs in a shuffled chain, plus one more at the end that leaves."""
    rnd = random.Random(n * 7919 + layers)
    model = ModelSpec(
        f"uniform-{layers}", (MODEL_BYTES // layers,) * layers,
        embed_bytes=2 * GB, head_bytes=2 * GB, kv_bytes_per_token_per_layer=1152,
    )
    ids = [f"mac{i:03d}" for i in range(n + 1)]
    memory = [rnd.choice(MAC_MEMORY_GB) for _ in ids]
    if n == 4:
        memory = [512, 512, 256, 192, 256]  # four Macs must hold 600 GB
    nodes = [NodeInfo(x, x, memory_total=m * GB, memory_usable=m * GB * 3 // 4)
             for x, m in zip(ids, memory)]
    chain = ids[:]
    rnd.shuffle(chain)
    links = [LinkInfo(a, b, rnd.choice((TB5, TB4))) for a, b in zip(chain, chain[1:])]
    before = plan_layers(model, nodes, links, CONTEXT)
    assert before.fits, before.reason
    gone = chain[-1]
    return {
        "model": model,
        "nodes": [x for x in nodes if x.id != gone],
        "links": [x for x in links if gone not in (x.a, x.b)],
        "previous": before.stages,
    }


def even_split(model: ModelSpec, nodes: list[NodeInfo]) -> list[Stage]:
    """What mlx-lm's pipeline does: the same number of layers everywhere."""
    n, L = len(nodes), model.num_layers
    n = min(n, L)
    bounds = [i * L // n for i in range(n + 1)]
    return [Stage(x.id, s, e, sum(model.layer_bytes[s:e]))
            for x, s, e in zip(nodes, bounds, bounds[1:])]


def overloaded(model: ModelSpec, stages: list[Stage], nodes: list[NodeInfo]) -> int:
    cap = {x.id: x.memory_usable for x in nodes}
    kv = model.kv_bytes_per_token_per_layer * CONTEXT
    last = len(stages) - 1
    return sum(
        s.bytes + kv * s.num_layers + (model.embed_bytes if i == 0 else 0)
        + (model.head_bytes if i == last else 0) > cap[s.node]
        for i, s in enumerate(stages)
    )


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run(n: int, layers: int, repeat: int) -> dict:
    c = case(n, layers)
    model, nodes, links, previous = c["model"], c["nodes"], c["links"], c["previous"]
    plan = plan_layers(model, nodes, links, CONTEXT, previous)
    fresh = plan_layers(model, nodes, links, CONTEXT)
    assert plan.fits and fresh.fits
    row = {
        "nodes": n,
        "layers": layers,
        "planner_ms": median_ms(
            lambda: plan_layers(model, nodes, links, CONTEXT, previous), repeat),
        "fresh_ms": median_ms(lambda: plan_layers(model, nodes, links, CONTEXT), repeat),
        "even_split_ms": median_ms(lambda: even_split(model, nodes), repeat),
        "stages": len(plan.stages),
        "moved_gb": sum(bytes_to_load(model, plan.stages, previous).values()) / GB,
        "moved_gb_from_scratch": sum(bytes_to_load(model, fresh.stages, previous).values()) / GB,
        "even_overloaded": overloaded(model, even_split(model, nodes), nodes),
    }
    row["ratio"] = row["planner_ms"] / row["fresh_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default="bench/results/planner.json")
    args = parser.parse_args()
    rows = []
    print(f"{'nodes':>5} {'layers':>6} {'planner ms':>10} {'fresh ms':>9} {'ratio':>6} "
          f"{'even ms':>8} {'stages':>6} {'moved GB':>9} {'scratch GB':>10} {'even overfull':>13}")
    for n in (4, 64, 256):
        for layers in (61, 1000):
            r = run(n, layers, args.repeat)
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
            print(f"{n:5d} {layers:6d} {r['planner_ms']:10.2f} {r['fresh_ms']:9.2f} "
                  f"{r['ratio']:6.2f} "
                  f"{r['even_split_ms']:8.3f} {r['stages']:6d} {r['moved_gb']:9.1f} "
                  f"{r['moved_gb_from_scratch']:10.1f} {r['even_overloaded']:13d}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**provenance(), "repeat": args.repeat, "context": CONTEXT, "python": platform.python_version(),
              "baseline": "fresh_ms: the same inputs without a previous plan; "
                          "ratio = planner_ms / fresh_ms",
              "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
