"""The tensors an mlx-lm checkpoint would hold, from its config alone.

Builds the mlx-lm model class without evaluating anything: MLX arrays are lazy, so a
trillion-parameter model costs a few thousand graph nodes and no memory, while every
parameter already has its final shape and dtype. Casting and quantizing are done the way
`mlx_lm.convert` does them, so the packed uint32 weights, scales and biases come out as
in a converted checkpoint.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes, quantize_model  # _get_classes applies MODEL_REMAPPING

from tbmesh.core.modelspec import ModelFormatError

_SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
    mx.float32: "F32", mx.uint64: "U64", mx.int64: "I64",
}  # fmt: skip


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint is quantized (mlx affine: packed bits, a scale and a bias per group)."""

    bits: int
    group_size: int
    only: str | None = None  # quantize only modules whose path contains this, e.g. "switch_mlp"


def model_tensors(
    config: Mapping[str, Any], dtype: str = "bfloat16", quantization: Quantization | None = None
) -> dict[str, tuple[str, list[int]]]:
    """{name: (safetensors dtype, shape)} of the checkpoint mlx-lm would save for `config`."""
    try:
        model_class, args_class = _get_classes(dict(config))
        model = model_class(args_class.from_dict(dict(config)))
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFormatError(f"mlx-lm cannot build {config.get('model_type')!r}: {error}") from None
    _cast(model, getattr(mx, dtype))
    if quantization is not None:
        _quantize(model, config, quantization)
    return {name: (_SAFETENSORS_DTYPES[a.dtype], list(a.shape)) for name, a in tree_flatten(model.parameters())}


def _cast(model: Any, dtype: mx.Dtype) -> None:
    # as mlx_lm.convert does: floating parameters, except those the model keeps (router biases)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path: str, value: mx.array) -> mx.array:
        return value.astype(dtype) if keep(path) and mx.issubdtype(value.dtype, mx.floating) else value

    model.update(tree_map_with_path(cast, model.parameters()))


def _quantize(model: Any, config: Mapping[str, Any], quantization: Quantization) -> None:
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: Any) -> bool | dict:
        if quantization.only is not None and quantization.only not in path:
            return False
        return own(path, module) if own else True

    # quantize_model prints the bits per weight it reached; keep our stdout clean (--json)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_model(model, dict(config), quantization.group_size, quantization.bits, quant_predicate=predicate)
