"""Running the platform's own tools (networksetup, ifconfig, sysctl, ioreg on macOS).

Every Mac-only command goes through `run_command`, so the parsing around it can be tested
on recorded outputs without ever running the command here.
"""

from __future__ import annotations

import subprocess


class CommandError(RuntimeError):
    """A system command could not run or failed; the message is one line."""


def run_command(args: list[str], timeout: float = 10.0) -> str:
    """Run `args` and return its standard output; raise CommandError on any failure."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommandError(f"{args[0]}: {error}") from None
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()
        reason = detail[-1] if detail else f"exit status {done.returncode}"
        raise CommandError(f"{' '.join(args)}: {reason}")
    return done.stdout
