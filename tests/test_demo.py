"""`tbmesh demo --no-ui`: the README's main command, run as a user would, end to end."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil

from tbmesh.testbed.teach import DEMO_ANSWER


def test_the_demo_runs_a_cluster_survives_a_kill_and_leaves_nothing_behind(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tbmesh", "demo", "--no-ui"],
                            capture_output=True, text=True, timeout=240,
                            env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    cluster = re.search(r"cluster '(demo-\w+)'", out).group(1)
    assert "the cluster formed" in out and "kill -9 mac-" in out
    assert re.search(r"the cluster re-formed without mac-\d: plan epoch \d+", out)
    before, after = map(int, re.search(r"(\d+) pieces before the kill, (\d+) after", out).groups())
    assert before > 0 and after > 0
    assert "event: resumed" in out
    assert "the answer is the taught one, word for word" in out
    assert " ".join(out.split("pieces):\n", 1)[1].split()) == DEMO_ANSWER  # printed whole (wrapped)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if cluster in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"daemons left running: {left}"
    assert len(list((tmp_path / "tbmesh").glob("demo-taught-*/model.safetensors"))) == 1  # the model is cached


def test_the_demo_refuses_a_single_node():
    result = subprocess.run([sys.executable, "-m", "tbmesh", "demo", "--no-ui", "--nodes", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: --nodes must be 2")
