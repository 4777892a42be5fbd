"""A throw-away network namespace for tests that create interfaces (root and iproute2).

Working inside our own namespace means other tests and engineers on this machine can
neither disturb the test (their interfaces changing) nor be disturbed by it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

_counter = itertools.count()


@contextmanager
def netns() -> Iterator[str]:
    """Yield the name of a fresh namespace (skip the test if one cannot be made); always deleted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2)")
    name = f"tbtest{os.getpid()}-{next(_counter)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ip(ns: str, *args: str, stdin: str | None = None) -> None:
    """Run `ip -n ns ...` (`-batch -` with stdin)."""
    subprocess.run(["ip", "-n", ns, *args], input=stdin, check=True, capture_output=True, text=True)


def exec_in(ns: str, *args: str) -> list[str]:
    """The command line that runs `args` inside the namespace."""
    return ["ip", "netns", "exec", ns, *args]
