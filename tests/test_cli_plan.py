"""`tbmesh plan`, run as the real console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from tbmesh.core.presets import PRESETS, preset_spec
from tbmesh.weights.modeldir import describe_model_dir

TBMESH = Path(sys.executable).parent / "tbmesh"
GB = 10**9


def run(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tbmesh", *args] if module else [str(TBMESH), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def plan_json(*args: str) -> tuple[int, dict]:
    result = run("plan", "--json", *args)
    assert result.stderr == ""
    return result.returncode, json.loads(result.stdout)  # exactly one JSON document


def check_stages(plan: dict, num_layers: int) -> None:
    """Contiguous ranges, end exclusive, covering every layer once."""
    starts = [s["start"] for s in plan["stages"]]
    ends = [s["end"] for s in plan["stages"]]
    assert starts[0] == 0 and ends[-1] == num_layers
    assert starts[1:] == ends[:-1]
    assert all(s["end"] > s["start"] for s in plan["stages"])


def test_builtin_example_json():
    code, plan = plan_json()
    assert code == 0
    assert set(plan) == {"fits", "reason", "stages", "left_out", "why"}
    assert plan["fits"] is True and plan["reason"] is None
    assert plan["why"].startswith("pipeline (") and "RDMA" in plan["why"]  # auto: no RDMA in the example
    check_stages(plan, 61)
    studios = {f"studio{i}" for i in range(1, 5)}
    assert {s["node"] for s in plan["stages"]} | set(plan["left_out"]) == studios
    assert sum(s["bytes"] for s in plan["stages"]) == preset_spec("kimi-k2-thinking").weight_bytes
    assert set(plan["stages"][0]) == {"node", "start", "end", "bytes"}


def test_builtin_example_takes_the_context():
    # a hundred million tokens of Kimi's KV cache (7 TB) fit nowhere
    code, plan = plan_json("--context", "100000000")
    assert code == 3 and plan["fits"] is False


def test_builtin_example_human():
    result = run("plan")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Built-in example" in out and "Kimi-K2-Thinking" in out
    for i in range(1, 5):
        assert f"studio{i}" in out
    assert "80.0 Gb/s" in out  # the hops along the Thunderbolt ring
    assert "fits" in out


def test_layers_fit_json_and_respect_memory():
    code, plan = plan_json("--layers", "10", "--layer-size", "10GB", "--node", "a:60GB", "--node", "b:60GB")
    assert code == 0 and plan["fits"] is True
    check_stages(plan, 10)
    assert sum(s["bytes"] for s in plan["stages"]) == 100 * GB
    assert all(s["bytes"] <= 60 * GB for s in plan["stages"])
    assert {s["node"] for s in plan["stages"]} == {"a", "b"}


def test_layers_human_output_shows_the_stages():
    result = run("plan", "--layers", "10", "--layer-size", "10GB", "--node", "alpha:60GB", "--node", "beta:60GB")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if "alpha" in line or "beta" in line]
    assert len(rows) == 2
    for row in rows:
        assert "GB" in row and "%" in row
        assert any(f"{s}-{e - 1}" in row for s in range(10) for e in range(s + 1, 11))
    bar = next(line for line in lines if line.startswith("|") and line.endswith("|"))
    assert set(bar.strip("|")) == {"A", "B"} and len(bar) == 62


def test_does_not_fit_exit_3_with_reason():
    args = ("--layers", "10", "--layer-size", "10GB", "--node", "a:40GB", "--node", "b:40GB")
    code, plan = plan_json(*args)
    assert code == 3
    assert plan["fits"] is False and isinstance(plan["reason"], str) and plan["reason"]
    result = run("plan", *args)
    assert result.returncode == 3
    assert "does not fit" in result.stdout and plan["reason"][:30] in " ".join(result.stdout.split())


def save_tiny_llama(root: Path) -> Path:
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 256}  # fmt: skip
    model = llama.Model(llama.ModelArgs.from_dict(config))
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(root / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return root


def test_model_directory(tmp_path):
    root = save_tiny_llama(tmp_path / "tiny")
    spec = describe_model_dir(root)
    code, plan = plan_json("--model", str(root), "--node", "a:100MB", "--node", "b:100MB")
    assert code == 0 and plan["fits"] is True
    check_stages(plan, 4)
    assert sum(s["bytes"] for s in plan["stages"]) == spec.weight_bytes


def test_preset_on_given_nodes():
    code, plan = plan_json("--preset", "llama-3.1-70b", "--node", "m1:64GB")
    assert code == 0
    assert plan["stages"] == [
        {"node": "m1", "start": 0, "end": 80, "bytes": preset_spec("llama-3.1-70b").weight_bytes}
    ]


def test_context_leaves_room_for_the_kv_cache():
    # 3 x 240 GB holds Kimi's 658 GB of weights, but not also a million tokens of KV cache (70 GB)
    nodes = ("--node", "a:240GB", "--node", "b:240GB", "--node", "c:240GB")
    assert plan_json("--preset", "kimi-k2-thinking", "--context", "0", *nodes)[0] == 0
    code, plan = plan_json("--preset", "kimi-k2-thinking", "--context", "1000000", *nodes)
    assert code == 3 and plan["fits"] is False


def test_list_presets():
    result = run("plan", "--list-presets")
    assert result.returncode == 0
    for name in PRESETS:
        assert name in result.stdout
    listed = json.loads(run("plan", "--list-presets", "--json").stdout)
    assert [p["name"] for p in listed] == list(PRESETS)


def test_python_dash_m():
    result = run("plan", "--json", "--layers", "2", "--layer-size", "1GB", "--node", "a:4GB", module=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stages"] == [{"node": "a", "start": 0, "end": 2, "bytes": 2 * GB}]


LAYERS = ("--layers", "4", "--layer-size", "1GB")


@pytest.mark.parametrize(
    "args, words",
    [
        ((*LAYERS, "--node", "a:12XB"), "12XB"),
        (("--preset", "gpt-7", "--node", "a:1TB"), "unknown preset"),
        ((*LAYERS, "--node", "a:8GB", "--node", "a:8GB"), "twice"),
        (("--model", "/nonexistent/model", "--node", "a:8GB"), "does not exist"),
        ((*LAYERS, "--node", "a:8GB", "--node", "b:8GB", "--link", "a-c:80Gbps"), "a-c"),
        ((*LAYERS, "--node", "a:8GB", "--node", "b:8GB", "--link", "a-b:fast"), "fast"),
        ((*LAYERS, "--model", "/tmp", "--node", "a:8GB"), "--model and --layers"),
        (("--layers", "4", "--node", "a:8GB"), "--layer-size"),
        (("--node", "a:8GB"), "which model"),
        ((*LAYERS,), "which nodes"),
        ((*LAYERS, "--node", "nocolon"), "NAME:MEMORY"),
        ((*LAYERS, "--node", "a:8GB", "--context", "-1"), "--context"),
        (("--layers", "0", "--layer-size", "1GB", "--node", "a:8GB"), "at least 1"),
        (("--layers", "four", "--layer-size", "1GB", "--node", "a:8GB"), "--layers"),
        (("--nodes", "a:8GB"), "--nodes"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, words):
    result = run("plan", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert words in result.stderr


def test_bad_model_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run("plan", "--model", str(tmp_path), "--node", "a:8GB")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_parallel_auto_shows_a_group_and_why():
    studios = [f"--node=studio{i}:384GiB" for i in range(1, 5)]
    cables = [f"--link=studio{a}-studio{b}:80Gbps:rdma" for a, b in ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))]
    code, plan = plan_json("--preset", "kimi-k2-thinking", *studios, *cables, "--parallel", "auto")
    assert code == 0
    assert [(s["start"], s["end"], s["group"]) for s in plan["stages"]] == [
        (0, 61, ["studio1", "studio2", "studio3", "studio4"])]
    assert 0 < plan["stages"][0]["member_bytes"] < 384 * 2**30
    assert plan["why"].startswith("tensor group of 4 (RDMA, 53 µs all-reduce): 2.48x the pipeline's expected decode")
    human = run("plan", "--preset", "kimi-k2-thinking", *studios, *cables, "--parallel", "auto")
    assert human.returncode == 0 and "why: tensor group of 4 (RDMA" in " ".join(human.stdout.split())
    assert "fits on 4 of 4 nodes" in human.stdout
    # auto is the default; pipeline makes no group and says no why
    assert plan_json("--preset", "kimi-k2-thinking", *studios, *cables)[1] == plan
    code, plan = plan_json("--preset", "kimi-k2-thinking", *studios, *cables, "--parallel", "pipeline")
    assert code == 0 and "why" not in plan and all("group" not in s for s in plan["stages"])


def test_parallel_tensor_where_no_group_can_be_made_plans_layers_and_says_why():
    result = run("plan", "--layers", "8", "--layer-size", "10GB", "--node", "a:50GB", "--node", "b:50GB",
                 "--parallel", "tensor")
    assert result.returncode == 0
    assert "no tensor group possible: 8 layers cannot be split across Macs" in " ".join(result.stdout.split())
    bad = run("plan", "--layers", "8", "--layer-size", "10GB", "--node", "a:50GB", "--parallel", "both")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: bad --parallel 'both': use auto, pipeline, tensor"
