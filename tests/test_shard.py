"""Shards of real (small, random) mlx-lm models: what they hold, and that chaining them gives
exactly mlx-lm's tokens."""

from __future__ import annotations

import contextlib
import gc
import io
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes, load_model, quantize_model

from tbmesh.core.planner import stage_bytes
from tbmesh.runtime.sampling import Sampling, make_sampler
from tbmesh.runtime.shard import FAMILIES, Shard, ShardError, generate_locally, load_shard
from tbmesh.weights.modeldir import describe_model_dir

LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 256,
    "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 10000.0,
}
DEEPSEEK_V3 = {
    "model_type": "kimi_k2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16, "v_head_dim": 16,
}
CONFIGS = {
    "llama": LLAMA,
    "llama_tied": {**LLAMA, "tie_word_embeddings": True},
    "mistral_sliding": {**LLAMA, "model_type": "mistral", "sliding_window": 4,
                        "layer_types": ["sliding_attention", "full_attention"] * 3},
    "qwen2": {**LLAMA, "model_type": "qwen2", "num_hidden_layers": 4, "tie_word_embeddings": True},
    "qwen3": {**LLAMA, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": True},
    "qwen3_moe": {**LLAMA, "model_type": "qwen3_moe", "num_hidden_layers": 4, "head_dim": 16,
                  "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": [0], "norm_topk_prob": True},
    "deepseek_v3": DEEPSEEK_V3,  # as Kimi-K2 names itself
    "kimi_k25": {"model_type": "kimi_k25", "text_config": {**DEEPSEEK_V3, "model_type": "kimi_k2"}},
}  # fmt: skip
PROMPTS = ([7], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9])


def make_model(root: Path, name: str, bits: int | None = None, files: int = 1, seed: int = 0,
               extra: dict[str, mx.array] | None = None, **overrides) -> Path:
    """A random model in mlx-lm's directory format (as mlx_lm.convert would write it)."""
    config = {**CONFIGS[name], **overrides}
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if bits is not None:  # with the model's own predicate (qwen3_moe: 8-bit router gates)
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, 32, bits)
    weights = {**dict(tree_flatten(model.parameters())), **(extra or {})}
    mx.eval(weights)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    if files == 1:
        mx.save_safetensors(str(root / "model.safetensors"), weights)
    else:
        weight_map = {}
        for i in range(files):
            file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            mx.save_safetensors(str(root / file), {n: weights[n] for n in names[i::files]})
            weight_map.update({n: file for n in names[i::files]})
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {name: make_model(root / name, name) for name in CONFIGS}
    made["llama_q4"] = make_model(root / "llama_q4", "llama", bits=4)
    made["llama_tied_q4"] = make_model(root / "llama_tied_q4", "llama_tied", bits=4)
    made["qwen3_moe_q8"] = make_model(root / "qwen3_moe_q8", "qwen3_moe", bits=8)
    made["llama_split"] = make_model(root / "llama_split", "llama", files=3)
    return made


def splits(num_layers: int, parts: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_layers / parts) for i in range(parts + 1)]
    return list(zip(cuts, cuts[1:]))


def shards_of(path: Path, parts: int) -> list[Shard]:
    n = describe_model_dir(path).num_layers
    return [load_shard(path, a, b) for a, b in splits(n, parts)]


def reference(path: Path, prompt: list[int], max_tokens: int, sampler=None, prefill_step_size=2048) -> list[int]:
    model, _ = load_model(path)
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler,
                          prefill_step_size=prefill_step_size)
    return [token for token, _ in steps]


# ----- exactness ---------------------------------------------------------------------------

MODELS = [*CONFIGS, "llama_q4", "llama_tied_q4", "qwen3_moe_q8"]


# llama and qwen3_moe run in ./dev test --quick too; the other families are slow
@pytest.mark.parametrize("name", [n if n in ("llama", "qwen3_moe_q8") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MODELS])
def test_chained_shards_give_mlx_lm_tokens(models, name):
    """Greedy: 2 and 3 shards give generate_step's tokens, in chunks of 4 and of 2048."""
    split = {parts: shards_of(models[name], parts) for parts in (2, 3)}
    for prompt in PROMPTS:
        for step_size in (4, 2048):
            want = reference(models[name], prompt, 32, prefill_step_size=step_size)
            for parts, shards in split.items():
                got = generate_locally(shards, prompt, 32, Sampling(), prefill_step_size=step_size)
                assert got == want, (prompt, step_size, parts)


@pytest.mark.parametrize("name", ["llama_tied", "qwen3_moe", "deepseek_v3"])
def test_chained_logits_are_bitwise_mlx_lm_logits(models, name):
    """One step of the full model vs. the shards: the same floats, not merely the same argmax."""
    model, _ = load_model(models[name])
    cache = model.make_cache() if hasattr(model, "make_cache") else None
    from mlx_lm.models.cache import make_prompt_cache

    cache = cache or make_prompt_cache(model)
    shards = shards_of(models[name], 3)
    caches = [s.make_cache() for s in shards]
    for tokens in ([1, 2, 3, 4, 5], [6], [7]):  # a prefill chunk, then two decode steps
        want = model(mx.array([tokens]), cache=cache)[:, -1, :]
        x = mx.array([tokens])
        for shard, c in zip(shards, caches):
            x = shard.forward(x, c)
        assert x.shape == (1, want.shape[-1])
        assert mx.array_equal(x, want).item()


def test_seeded_sampling_matches_mlx_lm_with_the_same_sampler(models):
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7)
    for name in ("llama", "qwen3_moe"):
        for prompt in PROMPTS:
            want = reference(models[name], prompt, 32, sampler=make_sampler(sampling), prefill_step_size=4)
            assert len(set(want)) > 5  # sampled, not a greedy loop
            for parts in (2, 3):
                got = generate_locally(shards_of(models[name], parts), prompt, 32, sampling, prefill_step_size=4)
                assert got == want, (name, prompt, parts)
    shards = shards_of(models["llama"], 2)
    other = generate_locally(shards, PROMPTS[1], 32, Sampling(0.8, 0.9, seed=8))
    assert other != generate_locally(shards, PROMPTS[1], 32, sampling)


# ----- what a shard holds ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "llama_tied", "llama_q4", "llama_tied_q4", "qwen3_moe_q8",
                                  "deepseek_v3", "kimi_k25"])
def test_weight_bytes_are_the_planners_stage_bytes(models, name):
    spec = describe_model_dir(models[name])
    tied = "tied" in name
    for parts in (1, 2, 3):
        for a, b in splits(spec.num_layers, parts):
            shard = load_shard(models[name], a, b)
            first, last = a == 0, b == spec.num_layers
            assert (shard.first, shard.last, shard.num_layers) == (first, last, spec.num_layers)
            want = stage_bytes(spec, a, b, first, last)
            if tied and first and last:  # the planner counts the one tied matrix at both ends
                want -= spec.embed_bytes
            assert shard.weight_bytes == want, (a, b)


def test_a_shard_holds_only_its_parameters(models):
    names = lambda s: {n for n, _ in tree_flatten(s.model.parameters())}  # noqa: E731
    middle = load_shard(models["llama"], 2, 4)
    assert {n.split(".")[2] for n in names(middle)} == {"0", "1"}
    assert all(n.startswith("model.layers.") for n in names(middle))
    assert len(middle.model.model.layers) == 2
    first = names(load_shard(models["llama"], 0, 2))
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    last = names(load_shard(models["llama"], 4, 6))
    assert {"model.norm.weight", "lm_head.weight"} <= last and "model.embed_tokens.weight" not in last
    tied_last = names(load_shard(models["llama_tied"], 4, 6))
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= tied_last


def test_middle_shard_weights_are_its_layers(models):
    """Renumbered layer i is checkpoint layer start + i, tensor for tensor."""
    full = mx.load(str(models["llama"] / "model.safetensors"))
    shard = load_shard(models["llama"], 3, 5)
    for name, value in tree_flatten(shard.model.parameters()):
        i = int(name.split(".")[2])
        original = name.replace(f"layers.{i}.", f"layers.{i + 3}.", 1)
        assert mx.array_equal(value, full[original]).item(), name


def test_layers_past_the_last_are_ignored(tmp_path):
    # DeepSeek's checkpoints carry a multi-token-prediction layer after the last one
    mtp = {"model.layers.4.embed_tokens.weight": mx.zeros((128, 64))}
    path = make_model(tmp_path / "mtp", "deepseek_v3", extra=mtp)
    shard = load_shard(path, 2, 4)
    assert shard.last and len(shard.model.model.layers) == 2
    assert shard.weight_bytes == stage_bytes(describe_model_dir(path), 2, 4, False, True)


def test_split_checkpoint_loads_the_same(models):
    a = load_shard(models["llama"], 2, 6)
    b = load_shard(models["llama_split"], 2, 6)
    assert a.weight_bytes == b.weight_bytes
    for (na, va), (nb, vb) in zip(tree_flatten(a.model.parameters()), tree_flatten(b.model.parameters())):
        assert na == nb and mx.array_equal(va, vb).item()


def test_caches_are_per_shard_and_fresh(models):
    shard = load_shard(models["mistral_sliding"], 1, 4)
    cache = shard.make_cache()
    assert [type(c).__name__ for c in cache] == ["KVCache", "RotatingKVCache", "KVCache"]
    assert shard.make_cache() is not cache and all(c.offset == 0 for c in shard.make_cache())
    hidden = mx.zeros((1, 3, 64))
    out = shard.forward(hidden, cache)
    assert out.shape == (1, 3, 64) and cache[0].offset == 3
    moe = load_shard(models["deepseek_v3"], 1, 3)
    assert len(moe.make_cache()) == 2


def test_first_stage_takes_tokens_last_returns_last_position_logits(models):
    first, last = shards_of(models["qwen3"], 2)
    h = first.forward(mx.array([[1, 2, 3]], dtype=mx.int32), first.make_cache())
    assert h.shape == (1, 3, 64)
    logits = last.forward(h, last.make_cache())
    assert logits.shape == (1, 256)


# ----- memory ------------------------------------------------------------------------------

def test_a_middle_shard_costs_its_own_bytes_not_the_models(tmp_path):
    # 8 layers of about 10 MB (hidden 512, float32): big enough to measure
    path = make_model(tmp_path / "big", "llama", hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
    model_bytes = describe_model_dir(path).weight_bytes
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    shard = load_shard(path, 3, 5)
    gc.collect()
    grew, peak = mx.get_active_memory() - before, mx.get_peak_memory() - before
    assert 18e6 < shard.weight_bytes < 24e6 and model_bytes > 75e6
    assert abs(grew - shard.weight_bytes) < 0.05 * shard.weight_bytes
    assert peak < 1.2 * shard.weight_bytes  # no full model, not even for a moment
    del shard
    gc.collect()
    mx.clear_cache()
    assert mx.get_active_memory() - before < 1e6  # dropping a shard frees it


# ----- errors ------------------------------------------------------------------------------

def one_line(path: Path, start: int, end: int) -> str:
    with pytest.raises(ShardError) as error:
        load_shard(path, start, end)
    assert isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("start, end", [(-1, 2), (0, 7), (3, 3), (4, 2), (6, 7)])
def test_range_outside_the_model(models, start, end):
    assert "not a range of its 6 layers" in one_line(models["llama"], start, end)


def test_unsupported_and_unknown_model_types(tmp_path):
    for model_type, extra, words in (
        ("gemma", {}, "cannot shard model type 'gemma'"),
        ("no_such_model", {}, "does not support model type 'no_such_model'"),
        ("llama", {"quantization_config": {"quant_method": "awq"}}, "awq quantization_config is not supported"),
    ):
        root = tmp_path / model_type
        root.mkdir()
        (root / "config.json").write_text(json.dumps({**LLAMA, "model_type": model_type, **extra}))
        mx.save_safetensors(str(root / "model.safetensors"), {"x": mx.zeros(1)})
        assert words in one_line(root, 0, 1)


def test_missing_and_misshapen_tensors(models, tmp_path):
    weights = mx.load(str(models["llama"] / "model.safetensors"))
    for broken, words in (
        ({k: v for k, v in weights.items() if k != "model.layers.4.mlp.up_proj.weight"},
         "no tensor model.layers.4.mlp.up_proj.weight (needed by layers [3, 6)"),
        ({**weights, "model.layers.4.mlp.up_proj.weight": mx.zeros((3, 3))}, "up_proj"),
    ):
        root = tmp_path / str(len(words))
        root.mkdir()
        (root / "config.json").write_text(json.dumps(LLAMA))
        mx.save_safetensors(str(root / "model.safetensors"), broken)
        assert words in one_line(root, 3, 6)
        load_shard(root, 0, 3)  # the other layers are fine: only the shard's tensors matter


def test_weights_that_are_not_finite_are_refused_as_they_are_read(models, tmp_path):
    # a damaged copy (a NaN where bits rotted): the layers that hold it do not load; the others do
    weights = mx.load(str(models["llama"] / "model.safetensors"))
    name = "model.layers.4.mlp.up_proj.weight"
    weights[name] = weights[name].at[0, 0].add(float("nan"))
    root = tmp_path / "rotted"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(LLAMA))
    mx.save_safetensors(str(root / "model.safetensors"), weights)
    assert one_line(root, 3, 6) == ("rotted: mlp.up_proj.weight of layer 4 holds values that are not finite "
                                   "(NaN or inf): this copy of the model is damaged")
    assert load_shard(root, 0, 3).damaged() is None


def test_supported_families_are_the_tested_ones():
    tested = {_get_classes(c)[0].__module__.rsplit(".", 1)[-1] for c in CONFIGS.values()}
    assert tested == set(FAMILIES)


def test_bfloat16_model_with_tokenizer_matches_stream_generate(tmp_path):
    """mlx_lm.load + stream_generate on a tokenizer-carrying bf16 model (tbmesh model tiny's)."""
    tiny = pytest.importorskip("tbmesh.testbed.tiny")
    from mlx_lm import load, stream_generate

    path = tmp_path / "tiny"
    tiny.make_tiny_model(path, arch="llama", layers=4, hidden=128, dtype="bfloat16")
    model, tokenizer = load(str(path))
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    shards = [load_shard(path, 0, 1), load_shard(path, 1, 3), load_shard(path, 3, 4)]
    for sampling in (Sampling(), Sampling(0.8, 0.9, seed=7)):
        want = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24,
                                                 sampler=make_sampler(sampling))]
        got = generate_locally(shards, prompt, 24, sampling)  # does not stop at EOS
        assert got[: len(want)] == want
        assert len(want) == 24 or want[-1] in tokenizer.eos_token_ids
