"""Presets: real models sized from their configs, checked against published checkpoints.

The sizes come from tbmesh/core/presets.json; tests/test_presets_table.py checks that the
table is what mlx-lm's model classes give for these configs.
"""

from __future__ import annotations

import pytest

from tbmesh.core.presets import PRESETS, UnknownPreset, get_preset, preset_spec, read_table

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


def test_the_table_holds_exactly_the_presets():
    assert list(read_table()) == list(PRESETS)


def test_unknown_preset():
    with pytest.raises(UnknownPreset) as error:
        get_preset("gpt-5")
    assert isinstance(error.value, ValueError)
    assert "kimi-k2-thinking" in str(error.value) and "\n" not in str(error.value)


def test_names_are_case_insensitive():
    assert get_preset("Kimi-K2-Thinking") is PRESETS["kimi-k2-thinking"]
