"""Presets: real models sized from their configs, checked against published checkpoints."""

from __future__ import annotations

import mlx.core as mx
import pytest

from tbmesh.core.presets import PRESETS, UnknownPreset, get_preset, preset_spec
from tbmesh.runtime.shapes import Quantization, model_tensors

GB = 10**9


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_published_checkpoint_size(name):
    preset = PRESETS[name]
    spec = preset_spec(name)
    assert spec.name == name
    assert spec.num_layers == preset.config["num_hidden_layers"]
    # within 3% of the published size of the checkpoint people actually download
    assert spec.weight_bytes == pytest.approx(preset.published_bytes, rel=0.03)


def test_kimi_k2_thinking_figures():
    spec = preset_spec("kimi-k2-thinking")
    assert spec.num_layers == 61
    assert 640 * GB < spec.weight_bytes < 670 * GB
    # layer 0 is the one dense layer; every other layer holds 384 int4 experts
    expert = 3 * 7168 * 2048  # gate, up, down
    int4_with_scales = expert * 384 * (4 + 16 * 2 / 32) / 8  # 4 bits + bf16 scale and bias per 32
    assert spec.layer_bytes[1] == pytest.approx(int4_with_scales, rel=0.03)
    assert spec.layer_bytes[0] < spec.layer_bytes[1] / 10
    assert len(set(spec.layer_bytes[1:])) == 1
    # untied: the bf16 embedding and the bf16 output projection, 163840 x 7168 each
    assert spec.embed_bytes == 163840 * 7168 * 2
    assert spec.head_bytes == 163840 * 7168 * 2 + 7168 * 2
    # MLA: mlx-lm caches the 512-wide latent and the 64-wide rope key per token, in bf16
    assert spec.kv_bytes_per_token_per_layer == (512 + 64) * 2


def test_dense_llama_kv_cache():
    # 8 kv heads x 128 head_dim, keys and values, bf16
    assert preset_spec("llama-3.1-70b").kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert preset_spec("qwen3-235b-a22b").kv_bytes_per_token_per_layer == 2 * 4 * 128 * 2


def test_quantization_only_touches_what_it_names():
    config = PRESETS["kimi-k2-thinking"].config
    tensors = model_tensors(config, "bfloat16", Quantization(bits=4, group_size=32, only="switch_mlp"))
    assert tensors["model.layers.1.mlp.switch_mlp.gate_proj.weight"] == ("U32", [384, 2048, 7168 * 4 // 32])
    assert tensors["model.layers.1.mlp.switch_mlp.gate_proj.scales"] == ("BF16", [384, 2048, 7168 // 32])
    assert tensors["model.layers.1.self_attn.o_proj.weight"] == ("BF16", [7168, 64 * 128])
    assert "model.layers.1.self_attn.o_proj.scales" not in tensors


def test_sizing_allocates_no_memory():
    preset_spec.cache_clear()
    before = mx.get_active_memory()
    spec = preset_spec("kimi-k2-thinking")
    assert spec.weight_bytes > 600 * GB
    assert mx.get_active_memory() - before < 1 * 2**20


def test_unknown_preset():
    with pytest.raises(UnknownPreset) as error:
        get_preset("gpt-5")
    assert isinstance(error.value, ValueError)
    assert "kimi-k2-thinking" in str(error.value) and "\n" not in str(error.value)


def test_names_are_case_insensitive():
    assert get_preset("Kimi-K2-Thinking") is PRESETS["kimi-k2-thinking"]
