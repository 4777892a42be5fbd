"""The README's figures are the results files' (bench/readme_tables.py renders them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import readme_tables  # noqa: E402


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_every_block_of_the_readme_is_what_its_results_files_render():
    text = readme()
    assert readme_tables.render(text, readme_tables.Results()) == text, \
        "README figures differ from bench/results: run .venv/bin/python bench/readme_tables.py"


def test_every_renderer_has_its_block_in_the_readme_once():
    names = readme_tables.blocks(readme())
    assert sorted(names) == sorted(readme_tables.RENDERERS)


def test_a_figure_typed_over_in_the_readme_is_caught():
    text = readme()
    assert "| 4 × 61 | 0.57 ms |" in text
    typed = text.replace("| 4 × 61 | 0.57 ms |", "| 4 × 61 | 0.50 ms |")
    assert readme_tables.render(typed, readme_tables.Results()) == text


def test_a_results_file_changed_changes_its_block(tmp_path: Path):
    shutil.copytree(ROOT / "bench" / "results", tmp_path, dirs_exist_ok=True)
    daemon = json.loads((tmp_path / "daemon-idle.json").read_text())
    daemon["processes"]["daemon a"]["cpu_percent"] = 0.91
    (tmp_path / "daemon-idle.json").write_text(json.dumps(daemon))
    rendered = readme_tables.render(readme(), readme_tables.Results(tmp_path))
    assert "| idle daemon (one peer), CPU | 0.91 % |" in rendered
    assert "0.65 %" not in rendered


def test_a_block_names_its_file_and_commit_and_says_when_the_run_is_stale(tmp_path: Path):
    results = readme_tables.Results()
    assert "`bench/results/serving.json`: commit 181ce66." in readme_tables.serving(results)
    assert "commit not recorded" in readme_tables.planner(results)
    assert "to be measured again" in readme_tables.reassign(results)
    shutil.copytree(ROOT / "bench" / "results", tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / "reassign.json").read_text())
    data["source"] = {"commit": "0123456789abcdef0123456789abcdef01234567", "uncommitted": []}
    (tmp_path / "reassign.json").write_text(json.dumps(data))
    again = readme_tables.reassign(readme_tables.Results(tmp_path))
    assert "commit 0123456." in again and "to be measured again" not in again


def test_an_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="no-such-table"):
        readme_tables.render("<!-- figures: no-such-table -->\nx\n<!-- /figures -->\n", readme_tables.Results())


def test_an_inline_block_stays_on_its_line():
    text = "a manifest (<!-- figures: manifest -->old<!-- /figures -->) here\n"
    rendered = readme_tables.render(text, readme_tables.Results())
    assert rendered.startswith("a manifest (<!-- figures: manifest -->") and rendered.count("\n") == 1
    assert "GB took" in rendered and "old" not in rendered


def test_check_exits_non_zero_on_drift(tmp_path: Path):
    drifted = tmp_path / "README.md"
    drifted.write_text(readme().replace("| 4 × 61 | 0.57 ms |", "| 4 × 61 | 0.50 ms |"))
    script = ROOT / "bench" / "readme_tables.py"
    run = subprocess.run([sys.executable, str(script), "--check", "--readme", str(drifted)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1 and "-| 4 × 61 | 0.50 ms |" in run.stdout
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_api_fuzz_breakdown_is_rendered_once_its_run_writes_one(tmp_path: Path):
    results = readme_tables.Results()
    assert "generated answers" not in readme_tables.fuzz_api(results)  # the runs in the files have none
    shutil.copytree(ROOT / "bench" / "results", tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / "fuzz_api-positive.json").read_text())
    ollama = {"requests": 869, "by_status": {"200": 806, "400": 63}, "generated": 500, "streamed": 154,
              "error_codes": {"context_length_exceeded": 63}}
    data["breakdown"] = {"requests": 869, "by_status": {"200": 806, "400": 63}, "generated": 500, "streamed": 154,
                         "error_codes": {"context_length_exceeded": 63}, "by_api": {"ollama": ollama}}
    (tmp_path / "fuzz_api-positive.json").write_text(json.dumps(data))
    rendered = readme_tables.fuzz_api(readme_tables.Results(tmp_path))
    assert "(500 generated answers, 154 of them streamed; the 400s' codes: 63 `context_length_exceeded`; " \
           "Ollama: 869 requests, 806 × 200, 63 × 400, 500 generated answers (154 streamed))" in rendered
