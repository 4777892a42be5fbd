"""What splitting a model over processes costs on this machine, without tbmesh.

The pipe rings of bench/inference.py (N processes, each running tbmesh's Shard on its share of
the layers, joined by OS pipes; no daemon, asyncio, thread or socket) with 1, 2 and 3 stages,
each free to run on any vCPU and pinned all to one vCPU (`taskset -c 0`), measured in
interleaved rounds in rotating order. Greedy decode tokens/s, medians; every ring's tokens are
checked equal to the 1-stage ring's. If the pinned rings keep their speed as stages are added
while the free ones lose it, the cost of a split is the scheduler waking a stage on an idle
vCPU, not the split.

    .venv/bin/python bench/split.py [--rounds 5] [--tokens 48] [--out bench/results/split.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import ROOT, PipeRing, median, model_dir, rotate  # noqa: E402
from provenance import provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/split.json"))
    args = parser.parse_args()

    path = model_dir(args.layers, args.hidden, args.vocab)
    L = args.layers
    rings = {f"{how}_{n}": PipeRing(path, [(i * L // n, (i + 1) * L // n) for i in range(n)],
                                    [] if how == "free" else ["taskset", "-c", "0"])
             for how in ("free", "pinned") for n in (1, 2, 3)}
    prompt = list(range(1, 11))
    try:
        expected, _ = rings["free_1"].generate(prompt, args.tokens)
        rates: dict[str, list[float]] = {name: [] for name in rings}
        for r in range(args.rounds):
            for name in rotate(list(rings), r):
                tokens, times = rings[name].generate(prompt, args.tokens)
                if tokens != expected:
                    raise RuntimeError(f"{name} gave other tokens than the 1-stage ring")
                rates[name].append((len(tokens) - 1) / (times[-1] - times[0]))
            print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                  flush=True)
    finally:
        for ring in rings.values():
            ring.close()
    med = {k: median(v) for k, v in rates.items()}
    result = {
        "python": platform.python_version(), "machine": platform.machine(),
        **provenance(),
        "model": path.name, "tokens": args.tokens, "rounds": args.rounds,
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "ms_per_token": {k: round(1e3 / v, 2) for k, v in med.items()},
        # per round, N stages against 1 stage run the same way (free or pinned)
        "ratio_vs_1_stage": {k: round(median([a / b for a, b in zip(v, rates[k.split("_")[0] + "_1"])]), 3)
                             for k, v in rates.items() if not k.endswith("_1")},
        "runs_tokens_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
    }
    print(f"\n{path.name}, {args.tokens} greedy tokens, medians of {args.rounds} rounds")
    print(f"| {'':<8} | {'tokens/s':>8} | {'ms/token':>8} | {'vs 1 stage':>10} |")
    for k in rings:
        ratio = result["ratio_vs_1_stage"].get(k)
        print(f"| {k:<8} | {med[k]:8.2f} | {1e3 / med[k]:8.2f} | {'' if ratio is None else f'{ratio:.3f}':>10} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
