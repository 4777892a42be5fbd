"""bench/chaos.py's short campaign: three Macs in network namespaces, one fault of each kind
(kill -9, restart as itself, SIGSTOP, a cable pulled, a partition, a flapping cable, memory
shrinking) while clients stream into every node; every answer is checked against mlx-lm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_root


def test_the_quick_chaos_campaign_loses_nothing_and_every_answer_is_mlx_lms(tmp_path):
    out = tmp_path / "chaos.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "bench/chaos.py"), "campaign", "--quick", "--seed", "11",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())["campaign_quick"]
    assert set(result["by_fault"]) == {"kill", "restart", "stop", "cable", "partition", "flap", "memory"}
    assert result["not_converged"] == 0 and not result["crashed"] and not result["findings"]
    requests = result["requests"]
    assert requests.get("wrong", 0) == 0 and requests.get("lost", 0) == 0 and requests["exact"] >= 10


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_the_quick_hostile_campaign_lets_no_stranger_in_and_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "bench/chaos.py"), "campaign", "--quick", "--hostile",
                          "--seed", "11", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())["campaign_hostile_quick"]
    assert {"relay", "stranger", "stray"} <= set(result["by_fault"]) and result["secret"]
    assert result["by_fault"]["relay"]["relayed_connections"] >= 1  # the members did dial the stranger
    assert not result["hostile_breaches"] and not result["findings"] and not result["crashed"]
    requests = result["requests"]
    assert requests.get("wrong", 0) == 0 and requests.get("lost", 0) == 0 and requests["exact"] >= 10
