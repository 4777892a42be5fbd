"""Power per machine, in watts by domain (core/power.py's PowerReading), sampled about once a
second without sudo where the platform allows it.

Sources, the first that can read this machine wins (`power_source`):

- macOS: `macmon pipe` (IOReport's energy channels and the SMC's system power, no root; see
  power_macos.py), else `powermetrics` when the daemon runs as root. Reading IOReport
  ourselves would need a ctypes binding of a private framework plus CoreFoundation's
  dictionaries, none of it runnable here; the channel rules such a binding would apply are
  in power_macos.py (`ioreport_reading`), tested on the channel names macmon matches, so
  one can be added later behind the same interface.
- Linux: the RAPL powercap counters (power_rapl.py), where the kernel has them and lets us
  read them.

Where nothing is readable a figure is None, never 0, and the source says why in one line.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tbmesh.core.power import PowerReading
from tbmesh.node.power_macos import macmon_source, powermetrics_source
from tbmesh.node.power_rapl import POWERCAP_ROOT, RaplSource


class PowerSource(Protocol):
    """Something that tells this machine's power; `sample` is cheap and never blocks."""

    name: str
    why_not: str  # one line, "" while it reads

    def sample(self, now: float) -> PowerReading | None: ...

    def close(self) -> None: ...


@dataclass
class NoPower:
    """No source can read this machine: every figure is absent, and `why_not` says why."""

    why_not: str
    name: str = "none"

    def sample(self, now: float) -> PowerReading | None:
        return None

    def close(self) -> None:
        pass


def power_source(platform: str = sys.platform, euid: int | None = None,
                 which: Callable[[str], str | None] = shutil.which,
                 powercap_root: os.PathLike[str] | str = POWERCAP_ROOT) -> PowerSource:  # fmt: skip
    """The best source this machine has, or NoPower saying why there is none."""
    if platform == "darwin":
        macmon = which("macmon")
        if macmon:
            return macmon_source(macmon)
        if (os.geteuid() if euid is None else euid) == 0:
            return powermetrics_source()
        return NoPower("power is not readable here: install macmon (`brew install macmon`), "
                       "or run the daemon as root for powermetrics")  # fmt: skip
    if platform.startswith("linux"):
        rapl = RaplSource(powercap_root)
        return rapl if not rapl.why_not else NoPower(rapl.why_not)
    return NoPower(f"power is not readable on {platform}")
