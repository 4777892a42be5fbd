"""Tensor-parallel shards: 2 real processes joined by MLX's ring backend on loopback, against
single-process mlx-lm. (Two ranks only: a ring rank spins a core in recv, and this machine
has two.)

Exactness: a group sums each output projection's partial products across ranks (all_sum), in
another order than one process's matmul does, so the logits differ in their last bits: they
are compared within a tolerance, and the greedy tokens exactly (these models' top two logits
are never that close over these prompts)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model
from test_shard import CONFIGS, make_model

from tbmesh.runtime.shard import FAMILIES, load_shard
from tbmesh.runtime.tensor import (
    TENSOR_FAMILIES,
    family,
    free_ports,
    ring_environment,
    ring_hostfile,
    tensor_unfit,
)
from tbmesh.testbed.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
RANK = Path(__file__).with_name("tensor_rank.py")
PROMPTS = ([7], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9])
TOKENS = 32
# Relative to the step's largest logit. Measured: at most 8.9e-7 over the 41 steps of each
# family here (none bitwise equal); a wrong split is off by O(1).
LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tensor")
    made = {arch: make_tiny_model(root / arch, arch=arch, layers=8) for arch in ("llama", "qwen3", "qwen3_moe")}
    made["deepseek_v3"] = make_model(root / "deepseek_v3", "deepseek_v3")  # Kimi-K2's family
    return made


def run_group(model: Path, case: str, tmp_path: Path, *extra: str, size: int = 2) -> list[dict]:
    """Run tests/tensor_rank.py as `size` ranks of a ring group on loopback; their results."""
    hostfile = tmp_path / f"hosts-{case}.json"
    hostfile.write_text(ring_hostfile([f"127.0.0.1:{p}" for p in free_ports(size)]))
    outs = [tmp_path / f"{case}-{r}.json" for r in range(size)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(RANK), str(model), str(out), case, *extra],
                              env={**env, **ring_environment(r, str(hostfile))},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, out in enumerate(outs)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * size, errors
    return [json.loads(out.read_text()) for out in outs]


def reference_tokens(model: Path, prompt: list[int]) -> list[int]:
    model, _ = load_model(model)
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=TOKENS)]


def reference_logits(model: Path, sequence: list[int]) -> list[mx.array]:
    model, _ = load_model(model)
    cache = make_prompt_cache(model)
    rows = [model(mx.array([sequence[:5]]), cache=cache)[0, -1]]
    rows += [model(mx.array([[t]]), cache=cache)[0, -1] for t in sequence[5:]]
    return rows


# llama runs in ./dev test --quick too; the other families and the chained stage are slow
@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen3", marks=pytest.mark.slow),
                                  pytest.param("qwen3_moe", marks=pytest.mark.slow),
                                  pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_a_group_of_two_gives_mlx_lms_tokens_and_logits(tiny, tmp_path, arch):
    model = tiny[arch]
    want = [reference_tokens(model, p) for p in PROMPTS]
    sequence = PROMPTS[2] + want[2]  # teacher-forced: the same inputs on both sides
    ranks = run_group(model, "whole", tmp_path, json.dumps(sequence))
    whole = load_shard(model, 0, json.loads((model / "config.json").read_text())["num_hidden_layers"])
    for rank in ranks:
        assert rank["size"] == 2
        assert rank["tokens"] == want, rank["rank"]
        assert rank["weight_bytes"] < 0.8 * whole.weight_bytes  # its share, not the model
    for got, expected in zip(ranks[0]["logits"], reference_logits(model, sequence)):
        got = mx.array(got)
        scale = mx.abs(expected).max().item()
        assert mx.abs(got - expected).max().item() <= LOGIT_TOLERANCE * scale
    assert ranks[0]["logits"] == ranks[1]["logits"]  # all_sum leaves every rank the same floats


@pytest.mark.slow  # CI's time budget (test_tensor_worker.py chains a worker group the same way, also slow)
def test_a_group_stage_chained_with_a_plain_shard(tiny, tmp_path):
    """Layers [0, 4) of 8 on the group, [4, 8) a plain Shard in the same process."""
    model = tiny["llama"]
    want = [reference_tokens(model, p) for p in PROMPTS]
    for rank in run_group(model, "half", tmp_path):
        assert rank["tokens"] == want


def test_tensor_families_are_the_families_whose_mlx_lm_model_can_shard():
    for name in FAMILIES:
        has_shard = hasattr(importlib.import_module(f"mlx_lm.models.{name}").Model, "shard")
        assert (name in TENSOR_FAMILIES) == has_shard, name


def test_family_of_a_config():
    assert family(CONFIGS["mistral_sliding"]) == "llama"
    assert family(CONFIGS["deepseek_v3"]) == "deepseek_v3"  # model_type kimi_k2
    assert family({"model_type": "no_such_model"}) is None


def test_what_cannot_be_split_says_why():
    llama = CONFIGS["llama"]  # 4 heads, 2 key-value heads, 128 hidden units
    assert tensor_unfit(llama, 2) is None
    assert "2 key-value heads do not split into 4" in tensor_unfit(llama, 4)
    assert "4 attention heads do not split into 3" in tensor_unfit(llama, 3)
    assert tensor_unfit(CONFIGS["deepseek_v3"], 4) is None  # MLA: one latent for all heads
    assert "hidden units of each expert" in tensor_unfit({**CONFIGS["qwen3_moe"], "moe_intermediate_size": 33}, 2)
    quantized = {**llama, "quantization": {"group_size": 64, "bits": 4}}
    assert "quantization groups of 64" in tensor_unfit(quantized, 2)  # 64 / 2 = 32 MLP inputs a rank
    assert "cannot be split" in tensor_unfit({"model_type": "gemma3_text"}, 2)


@pytest.mark.slow  # CI's time budget (test_what_cannot_be_split_says_why covers the reasons)
def test_a_model_that_cannot_be_split_is_refused_before_loading(tmp_path):
    model = make_model(tmp_path / "three_heads", "qwen3", num_attention_heads=3, num_key_value_heads=1)
    for rank in run_group(model, "unfit", tmp_path):
        assert rank["error"] == "three_heads: its 3 attention heads do not split into 2 equal parts"


def test_a_split_shard_takes_nothing_from_another():
    with pytest.raises(ValueError, match="cannot take layers"):
        load_shard("unused", 0, 1, keep=[object()], split=lambda model: None)
