"""What made a results file: the commit measured, the files that differed from it, and the
command. Every bench script records it in the JSON it writes under bench/results/, and
bench/readme_tables.py says it under each figure of the README."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    return run.stdout.rstrip() if run.returncode == 0 else ""  # a status line may begin with a space


def provenance() -> dict[str, Any]:
    """{"source": {"commit", "uncommitted"}, "command"}: the checked-out commit (TBMESH_COMMIT for an
    exported copy with no git), the package and bench files that differ from it, and this
    process's command line, from the repository's root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(ROOT))
    except ValueError:
        script_name = str(script)
    return {"source": {"commit": git("rev-parse", "HEAD") or os.environ.get("TBMESH_COMMIT") or None,
                       "uncommitted": git("status", "--porcelain", "--", "tbmesh", "bench/*.py").splitlines()},
            "command": shlex.join([".venv/bin/python", script_name, *sys.argv[1:]])}
