"""Describe an mlx-lm model directory without loading its weights.

Reads config.json and the JSON header of each safetensors file (an 8-byte little-endian
length, then that many bytes of JSON giving each tensor's dtype, shape and offsets): a few
kilobytes per file, even for a 600 GB model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbmesh.core.modelspec import (
    ModelFormatError,
    count_layers,
    describe_model,
    files_for_layers,
)
from tbmesh.core.types import ModelSpec

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a larger length means corruption


def describe_model_dir(path: str | Path, name: str | None = None) -> ModelSpec:
    """The ModelSpec of the model in `path`, named after the directory unless `name` is given."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFormatError(f"model directory {root} does not exist")
    config = read_config(root)
    tensors: dict[str, tuple[str, list[int]]] = {}
    for file in weight_files(root):
        tensors.update(read_header(file))
    return describe_model(name or root.name, config, tensors)


def read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{root} has no config.json (not an mlx-lm model directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"{path} is not valid JSON: {_one_line(error)}") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return config


def weight_files(root: Path, layers: tuple[int, int] | None = None) -> list[Path]:
    """The files the index lists when weights are split, else every model*.safetensors.

    With `layers` (start, end) and an index, only the files holding what a stage of those
    layers reads (tbmesh.core.modelspec.files_for_layers): a Mac may hold only those.
    mlx-lm loads `model*.safetensors`, so other safetensors (adapters) are not weights.
    """
    weight_map = read_index(root)
    if weight_map is not None:
        names = set(weight_map.values())
        if layers is not None:
            names = files_for_layers(weight_map, count_layers(read_config(root)), *layers)
        files = [root / n for n in sorted(names)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFormatError(f"{root / INDEX_FILE} lists {missing[0]}, which is not in {root}")
        return files
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise ModelFormatError(f"{root} has no model*.safetensors weights")
    return files


def read_index(root: Path) -> dict[str, str] | None:
    """The weight map (tensor name -> file) of split weights' index; None when there is no index."""
    index = root / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(name): str(file) for name, file in weight_map.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelFormatError(f"{index} is not a safetensors index (no weight_map)") from None


def read_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors header, skipping __metadata__."""
    return {name: (slot.dtype, list(slot.shape)) for name, slot in read_layout(path).items()}


@dataclass(frozen=True)
class Slot:
    """Where a tensor lies in a safetensors file: its bytes are [start, end) of the file."""

    dtype: str  # as safetensors spells it: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    start: int
    end: int


def read_layout(path: Path) -> dict[str, Slot]:
    """{tensor name: Slot} from a safetensors header (file offsets, not the header's relative
    ones), skipping __metadata__."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelFormatError(f"{path.name} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            file_size = path.stat().st_size
            if length > MAX_HEADER_BYTES or 8 + length > file_size:
                raise ModelFormatError(f"{path.name} has a corrupt safetensors header (length {length})")
            header = json.loads(f.read(length))
    except OSError as error:
        raise ModelFormatError(f"cannot read {path}: {_one_line(error)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFormatError(f"{path.name} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path.name} has a corrupt safetensors header (not an object)")
    data_start = 8 + length
    data_size = file_size - data_start
    slots = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, entry, data_size)
        slots[name] = Slot(dtype, tuple(shape), data_start + begin, data_start + end)
    return slots


def _entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[str, list[int], int, int]:
    try:
        dtype, shape, (begin, end) = str(entry["dtype"]), entry["shape"], entry["data_offsets"]
        valid = (all(type(d) is int and d >= 0 for d in shape) and type(begin) is int and type(end) is int
                 and 0 <= begin <= end)
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise ModelFormatError(f"{path.name} has a corrupt safetensors header (entry {name})")
    if end > data_size:
        raise ModelFormatError(f"{path.name} is truncated: {name} ends past the end of the file")
    return dtype, list(shape), begin, end


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_tokenizer(root: Path) -> Any:
    """mlx-lm's tokenizer of the model in `root` with the end ids `mlx_lm.load` gives it: those
    config.json lists (generation_config.json's when it lists any), not only the tokenizer's
    own eos token, or an answer would run past an end id mlx-lm stops at."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as load

    return load(root, eos_token_ids=load_config(root).get("eos_token_id"))
