"""One rank of a tensor group, run by tests/test_tensor.py as a process of its own (an
mx.distributed group cannot be made twice in a process): joins the ring group its MLX_RANK
and MLX_HOSTFILE describe, and writes what it computed as JSON.

    python tests/tensor_rank.py MODEL_DIR OUT_JSON CASE

CASE "whole": all the layers on the group: greedy tokens of generate_locally for each
prompt, and the last-position logits of a teacher-forced sequence, step by step.
CASE "half": layers [0, half) on the group, chained with a plain Shard of the rest.
CASE "unfit": the ShardError of loading the whole model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

from tbmesh.runtime.sampling import Sampling
from tbmesh.runtime.shard import ShardError, generate_locally, load_shard
from tbmesh.runtime.tensor import load_tensor_shard

PROMPTS = ([7], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9])
TOKENS = 32


def main() -> None:
    model_dir, out, case = sys.argv[1:4]
    group = mx.distributed.init(backend="ring", strict=True)
    layers = json.loads(Path(model_dir, "config.json").read_text())["num_hidden_layers"]
    if case == "unfit":
        try:
            load_tensor_shard(model_dir, 0, layers, group)
        except ShardError as error:
            result = {"error": str(error)}
        with open(out, "w") as f:
            json.dump(result, f)
        return
    if case == "whole":
        shards = [load_tensor_shard(model_dir, 0, layers, group)]
    else:
        shards = [load_tensor_shard(model_dir, 0, layers // 2, group), load_shard(model_dir, layers // 2, layers)]
    result = {"rank": group.rank(), "size": group.size(), "weight_bytes": shards[0].weight_bytes,
              "tokens": [generate_locally(shards, p, TOKENS, Sampling()) for p in PROMPTS]}
    if case == "whole":
        sequence = json.loads(sys.argv[4])
        cache = shards[0].make_cache()
        logits = [shards[0].forward(mx.array([sequence[:5]]), cache)]
        logits += [shards[0].forward(mx.array([[t]]), cache) for t in sequence[5:]]
        result["logits"] = [row[0].tolist() for row in logits]
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
