"""Linux power from the RAPL energy counters of the powercap class.

Each zone /sys/class/powercap/intel-rapl:N[:M] has a `name` and a cumulative `energy_uj`
that wraps to 0 after `max_energy_range_uj` (Documentation/power/powercap/powercap.rst);
watts are the difference of two reads over the time between them. AMD's zones are listed
under the same names by the intel_rapl driver.

Zones and the domain each stands for:
- "psys": the whole platform (client Intel chips from Skylake) -> system.
- "package-N": a processor package, summed -> cpu. On client chips the package includes
  the integrated GPU, which is also read on its own as "uncore".
- "uncore": the integrated GPU -> gpu.
- "dram": the memory controllers' DIMMs -> dram.
- "core" (a package's cores) is left out: the package already counts it.
With no psys zone `system` is None: a package is not the machine.

Since CVE-2020-8694 (Platypus) `energy_uj` is readable by root only; a daemon that cannot
read any zone says so rather than reporting 0 W.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tbmesh.core.power import PowerReading

POWERCAP_ROOT = Path("/sys/class/powercap")
ZONE_GLOB = "intel-rapl:*"
DOMAIN_OF_ZONE = {"psys": "system", "uncore": "gpu", "dram": "dram"}  # and "package-N" -> cpu


@dataclass(frozen=True)
class RaplZone:
    path: Path
    domain: str  # one of power.DOMAINS
    max_range_uj: int  # energy_uj wraps to 0 past this


def domain_of(zone_name: str) -> str | None:
    if zone_name.startswith("package-"):
        return "cpu"
    return DOMAIN_OF_ZONE.get(zone_name)


def energy_delta_uj(before: int, after: int, max_range_uj: int) -> int:
    """Microjoules between two reads of a counter that wraps to 0 past `max_range_uj`."""
    return after - before if after >= before else max_range_uj - before + after


def find_zones(root: os.PathLike[str] | str = POWERCAP_ROOT) -> tuple[list[RaplZone], str]:
    """The zones whose energy this process can read, and why none when there are none."""
    zones: list[RaplZone] = []
    unreadable = 0
    # sysfs lists every zone flat at the top (subzones too, as symlinks); one level is enough
    for path in sorted(Path(root).glob(ZONE_GLOB)):
        try:
            domain = domain_of((path / "name").read_text().strip())
            if domain is None:
                continue
            max_range = int((path / "max_energy_range_uj").read_text())
            int((path / "energy_uj").read_text())
        except PermissionError:
            unreadable += 1
            continue
        except (OSError, ValueError):
            continue
        zones.append(RaplZone(path, domain, max_range))
    if zones:
        return zones, ""
    if unreadable:
        return [], ("power is not readable here: the RAPL counters (/sys/class/powercap) are root's only "
                    "since CVE-2020-8694; run the daemon as root")  # fmt: skip
    return [], f"power is not readable here: this kernel has no RAPL counters ({root}/{ZONE_GLOB})"


class RaplSource:
    """Watts from the difference of two reads of every zone; the first sample has no interval
    yet, so it is None."""

    name = "rapl"

    def __init__(self, root: os.PathLike[str] | str = POWERCAP_ROOT) -> None:
        self.zones, self.why_not = find_zones(root)
        self._before: tuple[float, list[int | None]] | None = None

    def sample(self, now: float) -> PowerReading | None:
        counters = [_read_uj(zone.path) for zone in self.zones]
        before, self._before = self._before, (now, counters)
        if before is None or now <= before[0]:
            return None
        seconds = now - before[0]
        watts: dict[str, float] = {}
        missed = set()  # a domain with a zone unread this time: a part of it is no figure
        for zone, old, new in zip(self.zones, before[1], counters, strict=True):
            if old is None or new is None:
                missed.add(zone.domain)
                continue
            joules = energy_delta_uj(old, new, zone.max_range_uj) / 1e6
            watts[zone.domain] = watts.get(zone.domain, 0.0) + joules / seconds
        watts = {domain: w for domain, w in watts.items() if domain not in missed}
        return PowerReading("rapl", **watts) if watts else None

    def close(self) -> None:
        pass


def _read_uj(path: Path) -> int | None:
    try:
        return int((path / "energy_uj").read_text())
    except (OSError, ValueError):
        return None
