"""Describe real mlx-lm model directories (small random llamas and a small DeepSeek-V3)."""

from __future__ import annotations

import inspect
import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v3, llama
from mlx_lm.utils import MODEL_REMAPPING

from tbmesh.core.modelspec import MLA_LATENT_CACHE, ModelFormatError, describe_model
from tbmesh.weights.modeldir import describe_model_dir

LAYERS = 4
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 256,
    "tie_word_embeddings": False,
}


def build_llama(tied: bool = False, dtype=mx.float32, bits: int | None = None) -> tuple[dict, dict[str, mx.array]]:
    config = {**LLAMA, "tie_word_embeddings": tied}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
        config["quantization"] = {"group_size": 32, "bits": bits}
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return config, weights


def save(root: Path, config: dict, weights: dict[str, mx.array], files: int = 1) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    if files == 1:
        mx.save_safetensors(str(root / "model.safetensors"), weights)
        return root
    names = sorted(weights)
    weight_map = {}
    for i in range(files):
        part = {n: weights[n] for n in names[i::files]}
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        mx.save_safetensors(str(root / file), part)
        weight_map.update({n: file for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def nbytes(weights: dict[str, mx.array], pattern: str) -> int:
    return sum(a.nbytes for name, a in weights.items() if re.search(pattern, name))


def check_spec(spec, weights: dict[str, mx.array], tied: bool) -> None:
    assert spec.num_layers == LAYERS
    for i in range(LAYERS):
        assert spec.layer_bytes[i] == nbytes(weights, rf"^model\.layers\.{i}\.")
    embed = nbytes(weights, r"^model\.embed_tokens\.")
    assert spec.embed_bytes == embed
    head = nbytes(weights, r"^(model\.norm|lm_head)\.")
    assert spec.head_bytes == head + (embed if tied else 0)
    assert spec.weight_bytes == sum(a.nbytes for a in weights.values()) + (embed if tied else 0)


@pytest.mark.parametrize("tied", [False, True])
def test_single_file_float32(tmp_path, tied):
    config, weights = build_llama(tied=tied)
    assert ("lm_head.weight" in weights) is not tied
    spec = describe_model_dir(save(tmp_path / "tiny", config, weights))
    assert spec.name == "tiny"
    check_spec(spec, weights, tied)
    # keys and values: 2 kv heads x head_dim 16, float32
    assert spec.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4


@pytest.mark.parametrize("tied", [False, True])
def test_split_files_with_index_float16(tmp_path, tied):
    config, weights = build_llama(tied=tied, dtype=mx.float16)
    root = save(tmp_path / "split", config, weights, files=2)
    assert len(list(root.glob("*.safetensors"))) == 2
    spec = describe_model_dir(root, name="custom")
    assert spec.name == "custom"
    check_spec(spec, weights, tied)
    assert spec.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2


def test_index_decides_which_files_count(tmp_path):
    config, weights = build_llama()
    root = save(tmp_path / "split", config, weights, files=2)
    # a stray file the index does not list is not part of the model
    mx.save_safetensors(str(root / "model-extra.safetensors"), {"model.layers.0.extra": mx.zeros((1000,))})
    check_spec(describe_model_dir(root), weights, tied=False)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_4bit(tmp_path, tied):
    config, weights = build_llama(tied=tied, dtype=mx.float16, bits=4)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert "model.embed_tokens.scales" in weights
    spec = describe_model_dir(save(tmp_path / "q4", config, weights))
    check_spec(spec, weights, tied)
    # activations (and the cache) take the dtype of the embedding's scales
    assert spec.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2


def test_deepseek_v3_mla_cache_and_extra_layer_ignored(tmp_path):
    config = {
        "model_type": "deepseek_v3",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
    }
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    # DeepSeek's checkpoints carry a multi-token-prediction layer after the last one
    weights["model.layers.3.embed_tokens.weight"] = mx.zeros((128, 64), dtype=mx.bfloat16)
    mx.eval(weights)
    spec = describe_model_dir(save(tmp_path / "dsv3", config, weights))
    assert spec.num_layers == 3
    for i in range(3):
        assert spec.layer_bytes[i] == nbytes(weights, rf"^model\.layers\.{i}\.")
    assert spec.weight_bytes == sum(a.nbytes for a in weights.values()) - 128 * 64 * 2
    # mlx-lm caches the latent (kv_lora_rank) and the rope key, in bf16
    assert spec.kv_bytes_per_token_per_layer == (32 + 8) * 2


def test_nested_text_config_and_language_model_prefix():
    # kimi_k25-style: the text model under language_model., its config under text_config
    config = {"model_type": "kimi_k25", "text_config": {**LLAMA, "num_hidden_layers": 1}}
    tensors = {
        "language_model.model.embed_tokens.weight": ("BF16", [256, 64]),
        "language_model.model.layers.0.mlp.down_proj.weight": ("BF16", [64, 128]),
        "language_model.model.norm.weight": ("BF16", [64]),
        "language_model.lm_head.weight": ("BF16", [256, 64]),
        "vision_tower.encoder.layers.0.weight": ("BF16", [10]),
    }
    spec = describe_model("k", config, tensors)
    assert spec.layer_bytes == (64 * 128 * 2,)
    assert spec.embed_bytes == 256 * 64 * 2 + 20  # the vision tower runs on the first stage
    assert spec.head_bytes == 64 * 2 + 256 * 64 * 2


def test_mla_latent_cache_models_match_mlx_lm():
    """Every model type we size as caching the MLA latent does so in mlx-lm, and no other."""
    models = Path(inspect.getfile(llama)).parent
    latent = {p.stem for p in models.glob("*.py") if "update_and_fetch(kv_latent" in p.read_text()}
    assert latent <= MLA_LATENT_CACHE
    for model_type in MLA_LATENT_CACHE:
        module = MODEL_REMAPPING.get(model_type, model_type)
        source = (models / f"{module}.py").read_text()
        imported = set(re.findall(r"^from \.(\w+) import", source, re.MULTILINE))
        assert module in latent or imported & latent, model_type
    for full_cache in ("deepseek_v2", "minicpm3"):
        assert full_cache not in MLA_LATENT_CACHE


def one_line_error(root: Path) -> str:
    with pytest.raises(ModelFormatError) as error:
        describe_model_dir(root)
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope")


def test_no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "config.json" in one_line_error(tmp_path)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert "no model*.safetensors" in one_line_error(tmp_path)


def test_index_lists_missing_file(tmp_path):
    config, weights = build_llama()
    root = save(tmp_path / "split", config, weights, files=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in one_line_error(root)


@pytest.mark.parametrize(
    "content",
    [
        b"\x01",  # too short
        struct.pack("<Q", 2**40) + b"{}",  # absurd header length
        struct.pack("<Q", 5) + b"nojso",  # header is not JSON
        struct.pack("<Q", 2) + b"[]",  # header is not an object
        struct.pack("<Q", 30) + b'{"a": {"dtype": "F32"}}'.ljust(30),  # entry without shape
    ],
)
def test_corrupt_header(tmp_path, content):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "model.safetensors").write_bytes(content)
    message = one_line_error(tmp_path)
    assert "model.safetensors" in message and ("corrupt" in message or "too short" in message)


def test_truncated_file(tmp_path):
    config, weights = build_llama()
    root = save(tmp_path / "tiny", config, weights)
    path = root / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in one_line_error(root)


def test_unsupported_layout(tmp_path):
    # T5-style names: no layers.N anywhere
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"encoder.block.0.weight": mx.zeros((4,))})
    assert "no tensors for layer 0" in one_line_error(tmp_path)


def test_config_without_layer_count(tmp_path):
    config, weights = build_llama()
    del config["num_hidden_layers"]
    root = save(tmp_path / "tiny", config, weights)
    assert "num_hidden_layers" in one_line_error(root)


def test_unknown_dtype():
    tensors = {"model.layers.0.w": ("F4_E9", [4])}
    with pytest.raises(ModelFormatError, match="dtype F4_E9"):
        describe_model("m", {**LLAMA, "num_hidden_layers": 1}, tensors)
