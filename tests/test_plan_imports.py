"""`tbmesh plan` is the control plane's arithmetic: it must not import MLX, mlx-lm or
transformers (seconds of start-up, and a core that would not run without them)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("mlx", "mlx_lm", "transformers")

# Runs the CLI as `python -m tbmesh` does, then reports which heavy packages got imported.
PROBE = f"""
import json, runpy, sys
sys.argv = ["tbmesh", *json.loads(sys.argv[1])]
code = None
try:
    runpy.run_module("tbmesh", run_name="__main__", alter_sys=True)
except SystemExit as end:
    code = end.code
imported = sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r})
print(json.dumps({{"code": code, "imported": imported}}), file=sys.stderr)
"""

NODES = ("--node", "a:384GB", "--node", "b:384GB")


def plan_imports(*args: str) -> list[str]:
    """The heavy packages that `tbmesh plan ARGS` imports (it must run to a verdict)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(["plan", *args])], capture_output=True, text=True, timeout=60
    )
    *errors, report = result.stderr.splitlines() or [""]
    assert not errors, result.stderr
    outcome = json.loads(report)
    assert outcome["code"] in (0, 3), result.stderr  # fits or does not: the plan was made
    return outcome["imported"]


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--json",),
        ("--preset", "kimi-k2-thinking", *NODES),
        ("--preset", "qwen3-235b-a22b", "--json", *NODES),
        ("--list-presets",),
        ("--list-presets", "--json"),
        ("--layers", "61", "--layer-size", "9.6GB", *NODES),
        ("--layers", "61", "--layer-size", "9.6GB", "--json", *NODES),
    ],
    ids=lambda args: " ".join(args) or "no arguments",
)
def test_plan_imports_no_mlx(args: tuple[str, ...]) -> None:
    assert plan_imports(*args) == []


def write_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A bf16 safetensors file of zeros, written by hand so that making it needs no MLX either."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def test_plan_of_a_model_directory_imports_no_mlx(tmp_path: Path) -> None:
    # --model reads config.json and the safetensors headers (tbmesh.weights.modeldir) only
    hidden, layers, vocab = 64, 2, 256
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 128,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    tensors = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    tensors["lm_head.weight"] = [vocab, hidden]
    for i in range(layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = [hidden]
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = [hidden, hidden]
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    assert plan_imports("--model", str(tmp_path), "--json", *NODES) == []
