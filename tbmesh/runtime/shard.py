"""A pipeline stage's share of an mlx-lm model: layers [start, end), plus the ends it needs.

A node never holds more than its shard. The mlx-lm model class is built from config.json
without evaluating anything (MLX arrays are lazy: the random initial weights never exist),
its layer list is cut to the shard's layers, the embedding is dropped unless this is the
first stage and the final norm and head unless it is the last (with tied embeddings the last
stage keeps the embedding matrix: it is the output projection). The safetensors files are
opened lazily with mx.load, so only the shard's tensors are ever read from disk.

The forward is written out flat, as the supported families' own __call__ does it: embed
(first stage), attention mask, the layers with their caches, norm and head (last stage).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, _takes_global_scale, infer_quant_config

from tbmesh.core.modelspec import ModelFormatError
from tbmesh.runtime.sampling import Sampling, draw, logprobs_of
from tbmesh.weights.modeldir import read_config, weight_files

# mlx-lm model modules (after its MODEL_REMAPPING: mistral, kimi_k2, ... map onto these) whose
# forward is exactly embed -> layers(h, mask, cache) -> norm -> lm_head or tied embedding,
# with no embedding scale or per-layer extra input. The value: whether the model asks
# create_attention_mask for an array (deepseek_v3's MLA needs one) instead of "causal".
FAMILIES: dict[str, bool] = {
    "llama": False,  # also mistral; its sliding-window layers get their own mask
    "qwen2": False,
    "qwen3": False,
    "qwen3_moe": False,
    "deepseek_v3": True,  # also kimi_k2
    "kimi_k25": True,  # deepseek_v3's text model under language_model.
}

# Legacy quantization configs that mlx_lm.load turns into packed layers (the others, such as
# DeepSeek's fp8, are dequantized by the model's sanitize and need nothing from us).
_PACKED_QUANT_METHODS = {"bitnet", "mxfp4", "mxfp8", "compressed-tensors", "modelopt", "awq", "gptq"}


class ShardError(ModelFormatError):
    """A shard that cannot be loaded (unsupported model, bad range, missing tensors); one line."""


class Shard:
    """Layers [start, end) of a model, ready to run one pipeline stage."""

    def __init__(self, model: nn.Module, config: dict[str, Any], start: int, end: int,
                 num_layers: int, array_mask: bool) -> None:
        self.model = model  # mlx-lm's outer Model, cut down to the shard
        self.config = config
        self.start, self.end, self.num_layers = start, end, num_layers
        self.first, self.last = start == 0, end == num_layers
        self._lm, self._inner = _text_model(model)
        self._array_mask = array_mask
        self._window = getattr(self._inner, "sliding_window", None)
        self.weight_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        self.read_layers, self.kept_layers, self.read_bytes = end - start, 0, self.weight_bytes

    def layer(self, index: int) -> nn.Module:
        """The module of layer `index` (numbered as in the whole model)."""
        return self._inner.layers[index - self.start]

    def __repr__(self) -> str:
        return f"Shard([{self.start}, {self.end}) of {self.num_layers}, {self.weight_bytes} bytes)"

    def parts_for(self, start: int, end: int) -> Kept:
        """What a shard of [start, end) can take from this one: our layers in that range and
        the ends it may need. Holding only this (not the shard) lets the rest be freed."""
        last = end == self.num_layers
        ends = {name: module for held_in, name, wanted in (
                    (self._inner, "embed_tokens", start == 0 or last),  # tied heads use it too
                    (self._inner, "norm", last), (self._lm, "lm_head", last))
                if wanted and (module := held_in.get(name)) is not None}
        return Kept({i: self.layer(i) for i in range(max(start, self.start), min(end, self.end))}, ends)

    def checkpoint_arrays(self) -> dict[str, mx.array]:
        """Our parameters under their names in the checkpoint (layers numbered as in the
        whole model), as loaded: after mlx-lm's sanitize, which may have changed some."""
        prefix = ("language_model." if self._lm is not self.model else "") + "model.layers."
        return {_original(name, prefix, self.start): a for name, a in tree_flatten(self.model.parameters())}

    def damaged(self) -> str | None:
        """The first of our parameters (its name in the checkpoint) holding a NaN or an inf, None
        when all are finite: one pass over the weights, when a step computed NaN or inf."""
        return _not_finite(self.checkpoint_arrays().items())

    def make_cache(self) -> list[Any]:
        """A fresh KV cache for this shard's layers (one per request)."""
        return make_prompt_cache(self.model)

    def forward(self, x: mx.array, cache: Sequence[Any]) -> mx.array:
        """Token ids (1, n) on the first stage, else hidden states (1, n, hidden); returns
        hidden states (1, n, hidden), or on the last stage the last position's logits (1, vocab)."""
        h = self._inner.embed_tokens(x) if self.first else x
        masks: dict[int | None, Any] = {}  # one per attention kind, as the families build them
        for layer, c in zip(self._inner.layers, cache):
            window = self._window if getattr(layer, "use_sliding", False) else None
            if window not in masks:
                masks[window] = create_attention_mask(h, c, window_size=window, return_array=self._array_mask)
            h = layer(h, masks[window], cache=c)
        if not self.last:
            return h
        # only the last position is sampled; generate_step's steps that sample have one token
        h = self._inner.norm(h[:, -1:])
        out = self._lm.lm_head(h) if "lm_head" in self._lm else self._inner.embed_tokens.as_linear(h)
        return out[:, -1, :]


def _read_finite(module: nn.Module, model: str, layer: int | None) -> None:
    """Read a module's weights; raises ShardError when one holds a NaN or an inf (a damaged
    copy: bits rotted on disk, or fetched from a damaged one). A pass over the bytes just
    read, not another read of the disk."""
    mx.eval(module.parameters())
    bad = _not_finite(tree_flatten(module.parameters()))
    if bad is not None:
        where = f"layer {layer}" if layer is not None else "the model's ends"
        raise ShardError(f"{model}: {bad} of {where} holds values that are not finite (NaN or inf): "
                         "this copy of the model is damaged")


def _not_finite(arrays: Iterable[tuple[str, mx.array]]) -> str | None:
    """The name of the first floating-point array holding a NaN or an inf, else None. One array
    at a time, fused: the check holds no array of its size (peak memory stays the weights')."""
    return next((name for name, a in arrays if mx.issubdtype(a.dtype, mx.floating) and not _finite(a).item()),
                None)


_finite = mx.compile(lambda a: mx.isfinite(a).all())


class LoadAbandoned(Exception):
    """`on_layer` asked to stop: the plan no longer wants this shard."""


@dataclass(frozen=True)
class Kept:
    """Modules of a held shard that a new one reuses: layers by index, ends by name."""

    layers: dict[int, nn.Module]
    ends: dict[str, nn.Module]


def load_shard(model_dir: str | Path, start: int, end: int, keep: Sequence[Shard | Kept] = (),
               on_layer: Callable[[int, int], bool] | None = None,
               tensors: Callable[[], dict[str, mx.array]] | None = None,
               split: Callable[[nn.Module], None] | None = None) -> Shard:
    """Load layers [start, end) of the mlx-lm model in `model_dir`, and nothing more.

    Layers (and the embedding, norm and head) that a shard in `keep` already holds (or the
    parts of one, see Shard.parts_for) are taken from it as they are, not read again: a node
    whose range moves from [0, 20) to [10, 30) reads only layers 20-29. The rest is read
    layer by layer; after each one `on_layer(done, total)` is called, and when it returns
    False the load stops with LoadAbandoned (a newer plan wants other layers), having read
    at most one more layer. `tensors` gives the checkpoint's tensors (lazily) when they are
    not all in model_dir's weight files: a Mac that fetched its layers from its peers.

    `split(model)` is called on the model cut to the shard before any weight is read: a
    tensor group's rank replaces each layer's weights by its share there (tbmesh.runtime.tensor),
    so it holds only that share (each tensor is read whole, sliced, and let go, one layer at a
    time). Such a shard takes nothing from `keep`.
    """
    if split is not None and keep:
        raise ValueError("a split shard cannot take layers from another shard")
    root = Path(model_dir)
    config = read_config(root)
    model = _build(root, config)
    lm, inner = _text_model(model)
    num_layers = len(inner.layers)
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= num_layers):
        raise ShardError(f"{root.name}: layers [{start}, {end}) are not a range of its {num_layers} layers")

    weights: dict[str, mx.array] = {}
    if tensors is not None:
        weights = tensors()
    else:
        for file in weight_files(root, (start, end)):  # split weights: only the files we need
            weights.update(mx.load(str(file)))  # lazy: nothing is read until evaluated
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)  # on the full, original numbering, as mlx_lm.load

    first, last = start == 0, end == num_layers
    tied = "lm_head" not in lm
    inner.layers = inner.layers[start:end]
    if not first and not (last and tied):
        del inner.embed_tokens
    if not last:
        del inner.norm
        if not tied:
            del lm.lm_head

    prefix = ("language_model." if lm is not model else "") + "model.layers."
    weights = _renumber(weights, prefix, start, end)
    if config.get("quantization") is not None:
        _quantize(model, config["quantization"], weights, prefix, start)
    model.eval()

    wanted = [name for name, _ in tree_flatten(model.parameters())]
    missing = [name for name in wanted if name not in weights]
    if missing:
        raise ShardError(f"{root.name} has no tensor {_original(missing[0], prefix, start)} "
                         f"(needed by layers [{start}, {end}); {len(missing)} missing)")
    try:
        model.load_weights([(name, weights[name]) for name in wanted], strict=True)
    except ValueError as error:  # a shape that does not match the config
        raise ShardError(f"{root.name}: {' '.join(str(error).split())}") from None
    # Still lazy: swap in what we hold already (its lazy replacement is never read), then
    # read the rest one layer at a time, so a load can report progress and be abandoned.
    if split is not None:
        split(model)
    kept = _take_kept(lm, inner, start, end, keep)
    layers = [layer for layer in inner.layers if id(layer) not in kept]
    todo = [m for m in _ends(lm, inner) if id(m) not in kept] + layers
    numbers = {id(layer): start + i for i, layer in enumerate(inner.layers)}
    for done, module in enumerate(todo, 1):
        _read_finite(module, root.name, numbers.get(id(module)))
        if on_layer is not None and not on_layer(done, len(todo)):
            raise LoadAbandoned(f"layers [{start}, {end})")
    shard = Shard(model, config, start, end, num_layers, FAMILIES[_family(model)])
    shard.read_layers, shard.kept_layers = len(layers), end - start - len(layers)
    shard.read_bytes = sum(a.nbytes for m in todo for _, a in tree_flatten(m.parameters()))
    return shard


def _ends(lm: nn.Module, inner: nn.Module) -> list[nn.Module]:
    """The embedding, final norm and head this shard has (whichever it has)."""
    return [m for m in (inner.get("embed_tokens"), inner.get("norm"), lm.get("lm_head")) if m is not None]


def _take_kept(lm: nn.Module, inner: nn.Module, start: int, end: int,
               keep: Sequence[Shard | Kept]) -> set[int]:
    """Put the modules `keep` holds for our layers and ends into our model; their ids."""
    taken: set[int] = set()
    for held in keep:
        parts = held.parts_for(start, end) if isinstance(held, Shard) else held
        for i, layer in parts.layers.items():
            if start <= i < end:
                inner.layers[i - start] = layer
                taken.add(id(layer))
        for held_in, name in ((inner, "embed_tokens"), (inner, "norm"), (lm, "lm_head")):
            ours, theirs = held_in.get(name), parts.ends.get(name)
            if ours is not None and theirs is not None and type(ours) is type(theirs):
                held_in[name] = theirs
                taken.add(id(theirs))
    return taken


def generate_locally(shards: Sequence[Shard], prompt: Sequence[int], max_tokens: int,
                     sampler: Sampling, prefill_step_size: int = 2048) -> list[int]:
    """Generate with the shards chained in one process, step for step as the pipeline does.

    The prompt is processed as mlx-lm's generate_step does (all but the last token in chunks
    of prefill_step_size, then the last token alone, which gives the first sampled token), so
    the floating-point results, hence the tokens, are mlx-lm's own.
    """
    caches = [s.make_cache() for s in shards]

    def run(tokens: Sequence[int]) -> mx.array:
        x = mx.array([list(tokens)], dtype=mx.int32)
        for shard, cache in zip(shards, caches):
            x = shard.forward(x, cache)
            if not shard.last:
                mx.eval(x)  # a stage hands over an evaluated tensor
        return x

    rest = list(prompt)
    while len(rest) > 1:
        n = min(prefill_step_size, len(rest) - 1)
        run(rest[:n])
        mx.eval([c.state for cache in caches for c in cache])  # the chunk's logits are unused
        rest = rest[n:]
    out: list[int] = []
    for step in range(max_tokens):
        token = draw(logprobs_of(run(rest)), sampler, step).item()
        out.append(token)
        rest = [token]
    return out


def _build(root: Path, config: dict[str, Any]) -> nn.Module:
    """The full mlx-lm model, lazily (nothing evaluated), after checking we support it."""
    name = root.name
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, KeyError):
        raise ShardError(f"{name}: mlx-lm does not support model type {config.get('model_type')!r}") from None
    family = model_class.__module__.rsplit(".", 1)[-1]
    if family not in FAMILIES:
        raise ShardError(f"{name}: tbmesh cannot shard model type {config.get('model_type')!r} yet "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    if config.get("quantization") is None and (method := _packed_quantization(root, config)):
        raise ShardError(f"{name}: {method} quantization_config is not supported (convert it with mlx_lm.convert)")
    if config.get("quantize_activations"):
        raise ShardError(f"{name}: quantize_activations is not supported")
    try:
        return model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ShardError(f"{name}: mlx-lm cannot build it from config.json: {' '.join(str(error).split())}") from None


def _packed_quantization(root: Path, config: dict[str, Any]) -> str | None:
    """The legacy quant_method that mlx_lm.load would turn into packed layers, if any.

    Others (DeepSeek's 128-block fp8) are dequantized by the model's sanitize, as in mlx-lm.
    """
    if (root / "hf_quant_config.json").exists():
        return "modelopt"
    legacy = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not isinstance(legacy, dict):
        return None
    method = legacy.get("quant_method")
    mxfp8 = (method == "fp8" and legacy.get("scale_fmt") == "ue8m0"
             and list(legacy.get("weight_block_size", ())) == [32, 32])
    return method if method in _PACKED_QUANT_METHODS or mxfp8 else None


def _text_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the module holding lm_head, the one holding embed_tokens/layers/norm)."""
    lm = model["language_model"] if "language_model" in model else model
    return lm, lm["model"]


def _family(model: nn.Module) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def _renumber(weights: dict[str, mx.array], prefix: str, start: int, end: int) -> dict[str, mx.array]:
    """The shard's layers as layers 0..end-start-1; other layers' tensors left out."""
    layer = re.compile(re.escape(prefix) + r"(\d+)\.")
    out = {}
    for name, value in weights.items():
        m = layer.match(name)
        if m is None:
            out[name] = value
        elif start <= (i := int(m.group(1))) < end:
            out[f"{prefix}{i - start}.{name[m.end():]}"] = value
    return out


def _original(name: str, prefix: str, start: int) -> str:
    """A shard parameter's name in the checkpoint."""
    m = re.match(re.escape(prefix) + r"(\d+)(\.|$)", name)
    return f"{prefix}{int(m.group(1)) + start}{name[m.end(1):]}" if m else name


def _quantize(model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array],
              prefix: str, start: int) -> None:
    """Quantize the layers the checkpoint holds quantized, with mlx_lm.load's predicate."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        original = _original(path, prefix, start)  # per-layer settings use checkpoint names
        if original in quantization:
            return quantization[original]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = infer_quant_config(path, module, weights)
        if f"{path}.global_scale" in weights and _takes_global_scale(module):
            params["global_scale"] = True
        return params

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)
