"""A model's size per layer, from its config and the dtype and shape of each tensor.

Pure: the caller reads config.json and the safetensors headers (tbmesh.weights.modeldir) or
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
    unread = whole = 0  # bytes of the layers a token does not read / a tensor group keeps whole
    cfg = text_config(config)
    experts = _first_int(cfg, "n_routed_experts", "num_experts") or 0
    active = _first_int(cfg, "num_experts_per_tok") or experts
    has_output = False
    for tensor, (dtype, shape) in tensors.items():
        size = tensor_bytes(tensor, dtype, shape)
        part = tensor_part(tensor)
        if isinstance(part, int):
            if part < num_layers:
                layers[part] += size
                if experts and _EXPERT.search(tensor):
                    unread += size * (experts - active) // experts
                elif _WHOLE.search(tensor):
                    whole += size
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
        tensor_ways=tensor_ways(config),
        hidden_size=_first_int(cfg, "hidden_size") or 0,
        read_bytes=sum(layers) - unread,
        whole_bytes=whole,
    )


# A layer's tensors that are the routed experts (a token reads num_experts_per_tok of them), and
# those mlx-lm's `shard` leaves whole on every rank of a group: norms, the MoE router, MLA's
# down-projections (q_a_proj, kv_a_proj_with_mqa).
_EXPERT = re.compile(r"\.(switch_mlp|experts\.\d+)\.")
_WHOLE = re.compile(r"norm\.|\.mlp\.gate\.|\.gate\.e_score|q_a_proj\.|kv_a_proj_with_mqa\.")


# --- tensor parallelism: whether mlx-lm's `Model.shard(group)` can split a model n ways -----------

# mlx-lm modules whose model class has `shard(group)` (all of tbmesh.runtime.shard's families in
# mlx-lm 0.32; tests/test_tensor.py checks each against mlx-lm). Others are split by layers only.
TENSOR_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3", "kimi_k25"})
# model_type -> the mlx-lm module it is built with, where they differ (mlx_lm.utils.MODEL_REMAPPING)
_REMAPPED = {"mistral": "llama", "kimi_k2": "deepseek_v3", "joyai_llm_flash": "deepseek_v3",
             "iquestcoder": "llama", "xverse": "llama"}
MAX_GROUP = 8  # largest tensor group the planner considers (jaccl: every pair of Macs cabled)


def model_family(config: Mapping[str, Any]) -> str | None:
    """The mlx-lm module of a config.json's model type, without importing mlx-lm."""
    model_type = config.get("model_type")
    return None if model_type is None else _REMAPPED.get(model_type, model_type)


def tensor_unfit(config: Mapping[str, Any], size: int, family: str | None = None) -> str | None:
    """Why a model cannot be split over `size` ranks (one line), or None when it can.

    mlx-lm splits heads, key-value heads and hidden units in equal parts (mx.split), and a
    quantized weight along its input only in whole quantization groups. `family`: the
    mlx-lm module (default: from the model type)."""
    name = family if family is not None else model_family(config)
    if name not in TENSOR_FAMILIES:
        return f"model type {config.get('model_type')!r} cannot be split across Macs (supported: " \
               f"{', '.join(sorted(TENSOR_FAMILIES))})"
    cfg = text_config(config)
    heads = cfg.get("num_attention_heads", 0)
    head_dim = cfg.get("head_dim") or cfg.get("v_head_dim") or cfg.get("hidden_size", 0) // max(heads, 1)
    counts = {"attention heads": heads, "hidden units of the MLP": cfg.get("intermediate_size", 0),
              "hidden units of each expert": cfg.get("moe_intermediate_size", 0)}
    if name != "deepseek_v3" and name != "kimi_k25":  # MLA keeps one latent key-value for all heads
        counts["key-value heads"] = cfg.get("num_key_value_heads", heads)
    for what, count in counts.items():
        if count and count % size:
            return f"its {count} {what} do not split into {size} equal parts"
    group = (config.get("quantization") or {}).get("group_size")
    if group:
        inputs = {"attention output": heads * head_dim, "MLP output": cfg.get("intermediate_size", 0),
                  "expert output": cfg.get("moe_intermediate_size", 0)}
        for what, width in inputs.items():
            if width and (width // size) % group:
                return f"a {size}-way share of the {what} ({width // size}) is not whole quantization groups of {group}"
    return None


def tensor_ways(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The group sizes 2..MAX_GROUP a model splits into."""
    return tuple(n for n in range(2, MAX_GROUP + 1) if tensor_unfit(config, n) is None)


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
