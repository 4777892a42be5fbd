"""tbmesh/core/presets.json is what mlx-lm's model classes give for the presets' configs.

A changed preset config, mlx-lm version or tensor-summing rule changes the sizes: this test
then fails until the table is regenerated (tbmesh.runtime.presets_table) and committed.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from tbmesh.core.presets import PRESETS, REGENERATE, SIZE_FIELDS, TABLE_FILE, preset_spec
from tbmesh.core.types import ModelSpec
from tbmesh.runtime.presets_table import size_preset, table_text
from tbmesh.runtime.shapes import Quantization, model_tensors

GB = 10**9


@pytest.fixture(scope="module")
def sized() -> dict[str, ModelSpec]:
    return {name: size_preset(preset) for name, preset in PRESETS.items()}


def changes(checked_in: str, regenerated: str) -> list[str]:
    """What differs between two tables, e.g. ["deepseek-v3: layer_bytes", "new-preset: missing"]."""
    old, new = json.loads(checked_in)["presets"], json.loads(regenerated)["presets"]
    found = [f"{name}: missing" for name in new if name not in old]
    found += [f"{name}: no longer a preset" for name in old if name not in new]
    for name in set(new) & set(old):
        found += [f"{name}: {f}" for f in SIZE_FIELDS if old[name].get(f) != new[name].get(f)]
    return found or ["layout only"]


def test_checked_in_table_is_current(sized: dict[str, ModelSpec]) -> None:
    checked_in, regenerated = TABLE_FILE.read_text(), table_text(sized.values())
    assert checked_in == regenerated, (
        f"{TABLE_FILE} is out of date ({'; '.join(changes(checked_in, regenerated))}): "
        f"regenerate it with `{REGENERATE}` and commit it"
    )


def test_core_reads_the_specs_the_models_give(sized: dict[str, ModelSpec]) -> None:
    for name, spec in sized.items():
        assert preset_spec(name) == spec


def test_quantization_only_touches_what_it_names() -> None:
    config = PRESETS["kimi-k2-thinking"].config
    tensors = model_tensors(config, "bfloat16", Quantization(bits=4, group_size=32, only="switch_mlp"))
    assert tensors["model.layers.1.mlp.switch_mlp.gate_proj.weight"] == ("U32", [384, 2048, 7168 * 4 // 32])
    assert tensors["model.layers.1.mlp.switch_mlp.gate_proj.scales"] == ("BF16", [384, 2048, 7168 // 32])
    assert tensors["model.layers.1.self_attn.o_proj.weight"] == ("BF16", [7168, 64 * 128])
    assert "model.layers.1.self_attn.o_proj.scales" not in tensors


def test_sizing_allocates_no_memory() -> None:
    before = mx.get_active_memory()
    spec = size_preset(PRESETS["kimi-k2-thinking"])
    assert spec.weight_bytes > 600 * GB
    assert mx.get_active_memory() - before < 1 * 2**20
