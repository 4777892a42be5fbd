"""`tbmesh doctor`: checks this Mac and prints each finding with the command that fixes it.

The checks are tbmesh/node/doctor.py's; this is the command around them: its options, asking
the daemon whether it answers, and printing the findings (`--json` for a program). Exit
status 1 when a problem was found, else 0. The checks of the whole cluster, through the
daemon, are not here yet (issue 24).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import typer

from tbmesh.cli.client import DEFAULT_API
from tbmesh.cli.launchd import LABEL
from tbmesh.core.units import parse_size

EXIT_PROBLEM = 1
STATUS_WIDTH = 8  # "problem", "warning", "skipped", "ok" and a space
CHECK_WIDTH = 12  # the longest check name, "wired-limit", and a space


def doctor(
    shard_size: Optional[str] = typer.Option(None, "--shard-size", metavar="SIZE", help="The memory and disk this Mac's layers take (e.g. 120GB), for the wired-memory and disk checks; `tbmesh plan` shows each stage's."),
    rdma: Optional[bool] = typer.Option(None, "--rdma/--no-rdma", show_default="when it is enabled", help="Check what RDMA over Thunderbolt needs."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", show_default="the daemon's", help="Where the daemon keeps the layers (its --state-dir)."),
    api: str = typer.Option(DEFAULT_API, "--api", help="The daemon's API URL."),
    json_output: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:  # fmt: skip
    """Check this Mac for what keeps a cluster from forming, from using RDMA or from loading
    its layers, and print each finding with the command that fixes it; say which checks could
    not run here and why."""
    from tbmesh.node.doctor import PROBLEM, STATUSES, local_findings
    from tbmesh.node.state import default_state_dir

    try:
        shard_bytes = None if shard_size is None else parse_size(shard_size)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--shard-size") from None
    findings = local_findings(
        shard_bytes=shard_bytes,
        wants_rdma=rdma,
        layers_dir=state_dir if state_dir is not None else default_state_dir(),
        daemon_problem=daemon_problem(api),
        api=api,
        service_targets=(f"system/{LABEL}", f"gui/{os.getuid()}/{LABEL}"),
    )
    counts = {status: sum(f.status == status for f in findings) for status in STATUSES}
    if json_output:
        print(json.dumps({"findings": [f.as_json() for f in findings], "counts": counts}, indent=2))
    else:
        for finding in findings:
            print(f"{finding.status:<{STATUS_WIDTH}} {finding.check:<{CHECK_WIDTH}} {finding.message}")
            if finding.fix:
                print(f"{'':<{STATUS_WIDTH + CHECK_WIDTH + 1}} fix: {finding.fix}")
        skipped = [f.check for f in findings if f.status == "skipped"]
        print(f"{_count(counts['problem'], 'problem')}, {_count(counts['warning'], 'warning')}, {counts['ok']} fine"
              + (f"; not checked here: {', '.join(skipped)} (see why above)" if skipped else ""))  # fmt: skip
    if counts[PROBLEM]:
        raise typer.Exit(EXIT_PROBLEM)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def daemon_problem(api: str, timeout: float = 2.0) -> str | None:
    """Why no daemon answers at `api`, in a few words; None when one answers (a refusal for
    want of an API key is an answer)."""
    try:
        with urllib.request.urlopen(api.rstrip("/") + "/status", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
