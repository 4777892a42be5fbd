"""Real models, so `tbmesh plan --preset kimi-k2-thinking` answers "would it fit on my Macs?".

Each preset embeds the architecture fields of the model's published config.json and the
quantization of the mlx-community checkpoint people run. Per-layer bytes are not written by
hand: `python -m tbmesh.runtime.presets_table` builds each mlx-lm model lazily from these
configs, sums its tensors with tbmesh.core.modelspec exactly as for a model directory, and
writes the sizes to presets.json next to this file. Reading that table keeps the core (and
`tbmesh plan`) free of MLX; tests/test_presets_table.py fails when it is out of date.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbmesh.core.modelspec import tensor_ways, text_config
from tbmesh.core.types import ModelSpec

TABLE_FILE = Path(__file__).with_name("presets.json")  # package data (pyproject.toml)
REGENERATE = "python -m tbmesh.runtime.presets_table"
# Per preset, the table holds a ModelSpec's fields but its name (the key): what the planner
# needs and no more (the tensor shapes behind them would be thousands of lines per preset).
SIZE_FIELDS = ("layer_bytes", "embed_bytes", "head_bytes", "kv_bytes_per_token_per_layer", "read_bytes", "whole_bytes")


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    checkpoint: str  # the mlx-lm checkpoint this preset sizes
    published_bytes: int  # that checkpoint's published size, to check our figure against
    published_source: str
    config: dict[str, Any] = field(hash=False)
    bits: int | None = None  # None: not quantized
    group_size: int = 64
    quantize_only: str | None = None  # quantize only modules whose path contains this
    dtype: str = "bfloat16"


class UnknownPreset(ValueError):
    pass


# moonshotai/Kimi-K2-Thinking config.json (DeepseekV3ForCausalLM, model_type kimi_k2).
_KIMI_K2_THINKING = {
    "model_type": "kimi_k2",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,  # the one dense layer (first_k_dense_replace = 1)
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 64,  # DeepSeek-V3 has 128
    "num_key_value_heads": 64,
    "n_shared_experts": 1,
    "n_routed_experts": 384,  # DeepSeek-V3 has 256
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 262144,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# deepseek-ai/DeepSeek-V3 config.json (the 0324 and V3.1 releases share the architecture).
# Its 62nd layer (num_nextn_predict_layers = 1, multi-token prediction) is dropped by mlx-lm.
_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# meta-llama/Llama-3.1-405B(-Instruct) and Llama-3.1-70B(-Instruct) config.json.
_LLAMA_31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA_31_405B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA_31_ROPE,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_LLAMA_31_70B = {
    **_LLAMA_31_405B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}

# Qwen/Qwen3-235B-A22B config.json (Qwen3MoeForCausalLM).
_QWEN3_235B_A22B = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

GB = 10**9

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="kimi-k2-thinking",
            title="Kimi-K2-Thinking (1T MoE, int4 experts)",
            checkpoint="mlx-community/Kimi-K2-Thinking",
            # Native format: routed experts int4, group 32 (quantization-aware trained); mlx
            # stores them as affine 4-bit with a bf16 scale and bias per group; the rest bf16.
            bits=4,
            group_size=32,
            quantize_only="switch_mlp",
            published_bytes=658 * GB,
            published_source="Hugging Face page size, quoted by simonwillison.net 2025-11-07 and exo's model card",
            config=_KIMI_K2_THINKING,
        ),
        Preset(
            name="deepseek-v3",
            title="DeepSeek-V3 (671B MoE, 4-bit)",
            checkpoint="mlx-community/DeepSeek-V3-0324-4bit",
            bits=4,
            group_size=64,
            published_bytes=378 * GB,
            published_source="exo's model card for mlx-community/DeepSeek-V3.1-4bit (same architecture)",
            config=_DEEPSEEK_V3,
        ),
        Preset(
            name="llama-3.1-405b",
            title="Llama-3.1-405B (dense, 4-bit)",
            checkpoint="mlx-community/Meta-Llama-3.1-405B-Instruct-4bit",
            bits=4,
            group_size=64,
            published_bytes=228 * GB,
            published_source="46 safetensors shards of at most 5 GB; about 228 GB",
            config=_LLAMA_31_405B,
        ),
        Preset(
            name="llama-3.1-70b",
            title="Llama-3.1-70B (dense, 4-bit)",
            checkpoint="mlx-community/Meta-Llama-3.1-70B-Instruct-4bit",
            bits=4,
            group_size=64,
            published_bytes=38769 * 2**20,
            published_source="exo's model card (38769 MiB)",
            config=_LLAMA_31_70B,
        ),
        Preset(
            name="qwen3-235b-a22b",
            title="Qwen3-235B-A22B (MoE, 4-bit)",
            checkpoint="mlx-community/Qwen3-235B-A22B-4bit",
            bits=4,
            group_size=64,
            published_bytes=132 * GB,
            published_source="exo's model card for mlx-community/Qwen3-235B-A22B-Instruct-2507-4bit",
            config=_QWEN3_235B_A22B,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise UnknownPreset(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def preset_spec(name: str) -> ModelSpec:
    """The ModelSpec of a preset, as sized from its mlx-lm model class into presets.json."""
    preset = get_preset(name)
    sizes = read_table().get(preset.name)
    if sizes is None:
        raise RuntimeError(f"preset {preset.name!r} is missing from {TABLE_FILE.name}: regenerate it with {REGENERATE}")
    config = preset.config
    if preset.bits is not None:  # mlx-lm's checkpoint says so in its config.json
        config = {**config, "quantization": {"group_size": preset.group_size, "bits": preset.bits}}
    return ModelSpec(
        name=preset.name,
        layer_bytes=tuple(sizes["layer_bytes"]),
        embed_bytes=sizes["embed_bytes"],
        head_bytes=sizes["head_bytes"],
        kv_bytes_per_token_per_layer=sizes["kv_bytes_per_token_per_layer"],
        tensor_ways=tensor_ways(config),  # from the config, as describe_model does
        hidden_size=text_config(config).get("hidden_size", 0),
        read_bytes=sizes["read_bytes"],
        whole_bytes=sizes["whole_bytes"],
    )


@functools.cache
def read_table() -> dict[str, dict[str, Any]]:
    """{preset name: {size field: value}} from presets.json."""
    return json.loads(TABLE_FILE.read_text())["presets"]
