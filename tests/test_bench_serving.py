"""bench/serving.py's smoke run: mlx_lm.server and tbmesh clusters of 1 and 3 stages on a small
model, through the openai SDK; it must finish and write every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a smoke run of a benchmark: minutes


def test_the_serving_benchmark_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "serving.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "bench/serving.py"), "--quick", "--layers", "4", "--hidden", "64",
                          "--out", str(out)], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"]
    assert result["settings"]["levels"] == [1, 4] and result["settings"]["tokens"] == 8
    servers = {"mlx_lm", "tbmesh_1", "tbmesh_3"}
    assert set(result["one_request"]["servers"]) == servers
    assert set(result["one_request"]["ratios"]) == {"tbmesh_1/mlx_lm", "tbmesh_3/mlx_lm"}
    concurrency = result["concurrency"]
    assert set(concurrency["servers"]) == servers | {"mlx_lm_batch"}  # mlx-lm's BatchGenerator, no server
    for by_level in concurrency["servers"].values():
        assert set(by_level) == {"1", "4"}
        for figures in by_level.values():
            assert figures["tokens_per_s"] > 0
            assert {"ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95", "runs"} <= set(figures)
    assert set(concurrency["ratios"]) == {"tbmesh_1/mlx_lm", "tbmesh_3/mlx_lm", "tbmesh_3/tbmesh_1", "mlx_lm/mlx_lm_batch",
                                          "tbmesh_1/mlx_lm_batch", "tbmesh_3/mlx_lm_batch"}
    chat = result["chat"]
    assert set(chat["servers"]) == servers
    assert all(v["turn1_ttft_ms"] > 0 and v["turn2_ttft_ms"] > 0 and v["again_ttft_ms"] > 0 and "turn2/turn1" in v
               for v in chat["servers"].values())
    assert set(chat["ratios"]) == {"tbmesh_1/mlx_lm", "tbmesh_3/mlx_lm"}
    exact = result["exact_chat"]["servers"]
    assert set(exact) == {"tbmesh_1", "tbmesh_3"} and all(v["turn2_ttft_ms"] > 0 for v in exact.values())
    nodes = result["memory"]["nodes"]
    assert [n["server"] for n in nodes] == ["tbmesh_1"] + ["tbmesh_3"] * 3
    assert all(n["planned_bytes"] == n["plan_bytes"] + n["kv_room_bytes"] > 0 and n["rss_peak"] for n in nodes)
    assert result["identity"]["compared"] > 0 and "all_identical" in result["identity"]
