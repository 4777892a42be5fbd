"""A model's size per layer, from its config and the dtype and shape of each tensor.

Pure: the caller reads config.json and the safetensors headers (tbmesh.runtime.modeldir) or
builds the shapes some other way (tbmesh.runtime.presets_table); nothing here touches a file.

Tensor names follow mlx-lm's saved checkpoints: `model.layers.3.self_attn.q_proj.weight`,
`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`, sometimes under
`language_model.` (multimodal wrappers such as kimi_k25), `transformer.` (qwen) and with
`h.N` / `blocks.N` instead of `layers.N` (gpt2-style models).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tbmesh.core.types import ModelSpec


class ModelFormatError(ValueError):
    """A model directory or description that tbmesh cannot size; the message is one line."""


# Bytes per element of the safetensors dtypes (mlx saves uint32 packs for quantized weights).
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_CONFIG_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}

# Wrappers around the text model: the longest matching one is stripped first.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.", "model.", "transformer.", "")
_LAYER = re.compile(r"(?:layers|h|blocks)\.(\d+)\.")
_TOKEN_EMBEDDINGS = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "token_embeddings", "embedding"}
_FINAL_NORMS = {"norm", "ln_f", "final_layernorm", "norm_f", "final_norm"}
_OUTPUT_PROJECTIONS = {"lm_head", "output", "embed_out"}
_TOP_MODULES = _TOKEN_EMBEDDINGS | _FINAL_NORMS | _OUTPUT_PROJECTIONS

# mlx-lm models whose KVCache holds multi-head latent attention's compressed latent
# (kv_lora_rank) plus the shared rope key (qk_rope_head_dim) per token: their attention
# calls cache.update_and_fetch(kv_latent, k_pe) (see mlx_lm/models/deepseek_v3.py).
# Others with kv_lora_rank (deepseek_v2, minicpm3) cache full per-head keys and values.
MLA_LATENT_CACHE = frozenset({
    "deepseek_v3", "kimi_k2", "joyai_llm_flash", "kimi_k25", "kimi_vl", "deepseek_v32",
    "glm_moe_dsa", "glm4_moe_lite", "kimi_linear", "kimi_k3", "longcat_flash",
    "longcat_flash_ngram", "mistral4", "bailing_moe_v3", "bailing_hybrid",
})  # fmt: skip

Tensors = Mapping[str, tuple[str, Sequence[int]]]


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of config.json that describes the language model (kimi_k25 nests it)."""
    nested = config.get("text_config")
    if isinstance(nested, Mapping) and "num_hidden_layers" not in config:
        return nested
    return config


def tensor_bytes(name: str, dtype: str, shape: Sequence[int]) -> int:
    if dtype not in DTYPE_BYTES:
        raise ModelFormatError(f"tensor {name} has unsupported dtype {dtype}")
    return int(math.prod(shape) * DTYPE_BYTES[dtype])


def _text_name(name: str) -> str | None:
    """The name inside the text model ("layers.3.mlp...", "norm.weight"), None for others."""
    for prefix in _TEXT_PREFIXES:
        rest = name[len(prefix) :] if name.startswith(prefix) else ""
        if _LAYER.match(rest) or rest.split(".", 1)[0] in _TOP_MODULES:
            return rest
    return None


def tensor_part(name: str) -> int | str:
    """The part of the model a checkpoint tensor belongs to: the index of its layer (as the
    checkpoint numbers it: model.layers.3.*, language_model.model.layers.3.* -> 3), or
    "embedding" (the token embedding), "norm" (the final norm), "output" (the output
    projection), "other" (the rest: other top modules, a vision tower; the first stage runs them).
    """
    rest = _text_name(name)
    if rest is None:
        return "other"
    if layer := _LAYER.match(rest):
        return int(layer.group(1))
    module = rest.split(".", 1)[0]
    if module in _OUTPUT_PROJECTIONS:
        return "output"
    if module in _FINAL_NORMS:
        return "norm"
    return "embedding" if module in _TOKEN_EMBEDDINGS else "other"


def files_for_layers(weight_map: Mapping[str, str], num_layers: int, start: int, end: int) -> set[str]:
    """The files of a split checkpoint (an index's weight_map: tensor -> file) that a stage of
    layers [start, end) reads: its layers', and the first stage's embedding and other top
    modules, the last stage's final norm and output projection (or, tied, the embedding)."""
    wanted = stage_wants(weight_map, num_layers, start, end)
    return {file for name, file in weight_map.items() if wanted(name)}


def stage_wants(names: Iterable[str], num_layers: int, start: int, end: int) -> Callable[[str], bool]:
    """Whether a stage of layers [start, end) reads a tensor, by name, of a checkpoint with
    these tensor `names`: its layers', the first stage's embedding and other top modules,
    the last stage's final norm and output projection (or, tied, the embedding)."""
    tied = all(tensor_part(name) != "output" for name in names)
    first, last = start == 0, end == num_layers

    def wanted(name: str) -> bool:
        part = tensor_part(name)
        if isinstance(part, int):
            return start <= part < end
        if part == "embedding":
            return first or (last and tied)
        return last if part in ("norm", "output") else first

    return wanted


def describe_model(name: str, config: Mapping[str, Any], tensors: Tensors) -> ModelSpec:
    """Sum each tensor into its layer, the embedding (first stage) or the head (last stage).

    Layers numbered beyond num_hidden_layers (DeepSeek's multi-token-prediction layer) are
    not loaded by mlx-lm, so they are not counted. Tensors outside the text model (a vision
    tower) go with the embedding: the first stage runs them. With tied embeddings (no output
    projection tensor) the last stage needs the embedding matrix too, so it counts in both.
    """
    num_layers = count_layers(config)
    layers = [0] * num_layers
    embed = head = tied_matrix = 0
    has_output = False
    for tensor, (dtype, shape) in tensors.items():
        size = tensor_bytes(tensor, dtype, shape)
        part = tensor_part(tensor)
        if isinstance(part, int):
            if part < num_layers:
                layers[part] += size
        elif part in ("output", "norm"):
            has_output = has_output or part == "output"
            head += size
        else:
            embed += size
            if part == "embedding":
                tied_matrix += size
    missing = [i for i, size in enumerate(layers) if size == 0]
    if missing:
        raise ModelFormatError(
            f"{name}: no tensors for layer {missing[0]} of {num_layers} "
            f"(unsupported layout? expected names like model.layers.{missing[0]}.*)"
        )
    if not has_output:
        head += tied_matrix
    return ModelSpec(
        name=name,
        layer_bytes=tuple(layers),
        embed_bytes=embed,
        head_bytes=head,
        kv_bytes_per_token_per_layer=kv_bytes_per_token(config, tensors),
    )


def count_layers(config: Mapping[str, Any]) -> int:
    """The number of transformer layers config.json gives (in text_config for multimodal wrappers)."""
    cfg = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    raise ModelFormatError("config.json has no num_hidden_layers")


def _first_int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    return next((cfg[k] for k in keys if isinstance(cfg.get(k), int) and cfg[k] > 0), None)


def activation_bytes(config: Mapping[str, Any], tensors: Tensors) -> int:
    """Bytes per element of the activations, hence of mlx-lm's KV cache.

    mlx-lm computes in the dtype the token embedding returns: its weight's dtype, or its
    scales' dtype when quantized. Failing that, the config's torch_dtype.
    """
    for tensor, (dtype, _) in tensors.items():
        if tensor_part(tensor) != "embedding":
            continue
        if tensor.endswith((".weight", ".scales")) and dtype in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[dtype]
    cfg = text_config(config)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype")
    return _CONFIG_DTYPES.get(str(dtype), 2)


def kv_bytes_per_token(config: Mapping[str, Any], tensors: Tensors) -> int:
    """What mlx-lm's cache stores per token for one layer.

    Standard attention: keys and values, num_key_value_heads x head_dim each. Multi-head
    latent attention in mlx-lm's deepseek_v3 family: the latent (kv_lora_rank) and the rope
    key (qk_rope_head_dim), shared by all heads. This is the full-attention figure: models
    with sliding-window or linear-attention layers store less on those layers.
    """
    cfg = text_config(config)
    element = activation_bytes(config, tensors)
    heads = _first_int(cfg, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        raise ModelFormatError("config.json has no num_attention_heads: cannot size the KV cache")
    if _first_int(cfg, "kv_lora_rank"):
        model_type = str(cfg.get("model_type", config.get("model_type", "")))
        latent = model_type in MLA_LATENT_CACHE or any(".embed_q." in t for t in tensors)
        rope = _first_int(cfg, "qk_rope_head_dim") or 0
        if latent:
            return (cfg["kv_lora_rank"] + rope) * element
        nope = _first_int(cfg, "qk_nope_head_dim") or 0
        value = _first_int(cfg, "v_head_dim") or 0
        return heads * (nope + rope + value) * element
    kv_heads = _first_int(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or heads
    hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model") or 0
    head_dim = _first_int(cfg, "head_dim") or hidden // heads
    if head_dim <= 0:
        raise ModelFormatError("config.json has no hidden_size or head_dim: cannot size the KV cache")
    return 2 * kv_heads * head_dim * element
