"""Cost of sharding itself: one decode step of the full model vs. the same step through shards.

In one process, for a random llama (float32, 8 layers) of two widths, after a 64-token
prefill, it times decode steps of:
  full      mlx-lm's own model (mlx_lm.utils.load_model): model(token, cache), eval logits
  shards-N  the model split into N shards (load_shard): each shard's forward evaluated on
            its own, as a pipeline stage does; the figure is the sum of the N stage times
  shards-3-one-eval  the 3 shards' forwards chained lazily and evaluated once (what the
            shard code costs without a stage's synchronisation point)
and, as a baseline for the noise of this machine, full-again: the full model timed a second
time in the same rounds. The variants' steps are interleaved one by one, in rotating order,
so that drift (this machine's cores are shared) hits them alike; figures are medians over
all steps. Each variant's tokens are checked to be mlx-lm's.

    python bench/shard.py [--out bench/results/shard.json] [--steps 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from tbmesh.runtime.shard import Shard, load_shard

PROMPT = 64


def make_llama(root: Path, hidden: int, layers: int = 8) -> Path:
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 2,
              "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": hidden // 128, "rms_norm_eps": 1e-5, "vocab_size": 1024,
              "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 10000.0}
    mx.random.seed(0)
    weights = dict(tree_flatten(llama.Model(llama.ModelArgs.from_dict(config)).parameters()))
    mx.eval(weights)
    root.mkdir(parents=True)
    mx.save_safetensors(str(root / "model.safetensors"), weights)
    (root / "config.json").write_text(json.dumps(config))
    return root


def full_stepper(path: Path) -> Callable[[int], tuple[int, float]]:
    model, _ = load_model(path)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, PROMPT + 1))]), cache=cache))

    def step(token: int) -> tuple[int, float]:
        start = time.perf_counter()
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
        mx.eval(logits)
        elapsed = time.perf_counter() - start
        return mx.argmax(logits, axis=-1).item(), elapsed
    return step


def shard_stepper(shards: list[Shard], eval_each: bool = True) -> Callable[[int], tuple[int, float]]:
    caches = [s.make_cache() for s in shards]
    x = mx.array([list(range(1, PROMPT + 1))])
    for shard, cache in zip(shards, caches):
        x = shard.forward(x, cache)
        mx.eval(x)

    def step(token: int) -> tuple[int, float]:
        x, total = mx.array([[token]]), 0.0
        start = time.perf_counter()
        for shard, cache in zip(shards, caches):
            x = shard.forward(x, cache)
            if eval_each:
                mx.eval(x)  # a stage evaluates its output before sending it on
                total += time.perf_counter() - start
                start = time.perf_counter()
        if not eval_each:
            mx.eval(x)
            total = time.perf_counter() - start
        return mx.argmax(x, axis=-1).item(), total
    return step


def case(path: Path, steps: int, rounds: int) -> dict[str, Any]:
    n = 8
    variants: dict[str, Callable[[], Callable[[int], tuple[int, float]]]] = {
        "full": lambda: full_stepper(path),
        "shards_2": lambda: shard_stepper([load_shard(path, 0, 4), load_shard(path, 4, n)]),
        "shards_3": lambda: shard_stepper([load_shard(path, 0, 3), load_shard(path, 3, 6), load_shard(path, 6, n)]),
        "shards_3_one_eval": lambda: shard_stepper(
            [load_shard(path, 0, 3), load_shard(path, 3, 6), load_shard(path, 6, n)], eval_each=False),
        "full_again": lambda: full_stepper(path),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        steppers = {name: make() for name, make in variants.items()}
        tokens = {name: PROMPT + 1 for name in variants}
        for name, stepper in steppers.items():
            stepper(tokens[name])  # warm-up (and a step of the same position for all)
        for i in range(steps):
            names = list(steppers)[i % len(steppers):] + list(steppers)[:i % len(steppers)]
            for name in names:  # interleaved step by step, in rotating order: drift hits all alike
                tokens[name], elapsed = steppers[name](tokens[name])
                times[name].append(elapsed)
            assert len(set(tokens.values())) == 1, tokens  # the same token everywhere
        del steppers
        mx.clear_cache()
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "model_bytes": (path / "model.safetensors").stat().st_size,
        "steps": steps * rounds,
        **{f"{name}_ms": round(v, 4) for name, v in ms.items()},
        "shards_2_vs_full": round(ms["shards_2"] / ms["full"], 4),
        "shards_3_vs_full": round(ms["shards_3"] / ms["full"], 4),
        "shards_3_one_eval_vs_full": round(ms["shards_3_one_eval"] / ms["full"], 4),
        "baseline_full_again_vs_full": round(ms["full_again"] / ms["full"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/shard.json")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                               "mlx": mx.__version__, "device": str(mx.default_device())}
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in (256, 512):
            name = f"llama_8x{hidden}_f32"
            r = results[name] = case(make_llama(Path(tmp) / name, hidden), args.steps, args.rounds)
            print(f"{name:18} {r['model_bytes'] / 1e6:6.1f} MB  full {r['full_ms']:7.3f} ms  "
                  f"2 shards {r['shards_2_ms']:7.3f} ms ({r['shards_2_vs_full']:.3f}x)  "
                  f"3 shards {r['shards_3_ms']:7.3f} ms ({r['shards_3_vs_full']:.3f}x)  "
                  f"3 shards, one eval {r['shards_3_one_eval_ms']:7.3f} ms ({r['shards_3_one_eval_vs_full']:.3f}x)  "
                  f"full again {r['full_again_ms']:7.3f} ms ({r['baseline_full_again_vs_full']:.3f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
