"""What sampling power once a second costs the daemon, in CPU time (issue 24: under 0.2% of a core).

Takes N samples back to back (the cost of one sample does not depend on the time between
them) and reports the CPU time of this process per sample, and that as a share of one core
at one sample a second:

- rapl: RaplSource over /sys/class/powercap when this process can read it, else over a
  fake tree shaped like a two-socket server (2 packages, 2 dram zones, psys), in a temporary
  directory: the same opens and reads of small files;
- macmon: parsing one recorded `macmon pipe` line (what the daemon does each second on a
  Mac; macmon's own cost is macmon's, not measurable here);
- powermetrics: parsing one recorded plist sample of an M2 Ultra (the largest recorded).

    PYTHONPATH=. python bench/power_cost.py [--samples 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tbmesh.node.power_macos import parse_macmon_line, parse_powermetrics_plist
from tbmesh.node.power_rapl import POWERCAP_ROOT, RaplSource

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures" / "macos"


def fake_powercap(root: Path) -> None:
    zones = {"intel-rapl:0": "package-0", "intel-rapl:0:0": "dram", "intel-rapl:1": "package-1",
             "intel-rapl:1:0": "dram", "intel-rapl:2": "psys"}  # fmt: skip
    for zone, name in zones.items():
        path = root / zone
        path.mkdir()
        (path / "name").write_text(name + "\n")
        (path / "energy_uj").write_text("123456789\n")
        (path / "max_energy_range_uj").write_text("262143328850\n")


def cpu_seconds_per_call(call: Callable[[int], object], samples: int) -> float:
    call(0)  # warm: imports, first opens
    start = time.process_time()
    for i in range(samples):
        call(i + 1)
    return (time.process_time() - start) / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        real = RaplSource(POWERCAP_ROOT)
        if real.zones:
            source, where = real, f"{POWERCAP_ROOT} ({len(real.zones)} zones)"
        else:
            fake_powercap(Path(tmp))
            source, where = RaplSource(Path(tmp)), f"a fake tree of 5 zones ({real.why_not})"
        macmon_line = (FIXTURES / "macmon-pipe.1.txt").read_text()
        plist = (FIXTURES / "powermetrics-plist.1.txt").read_bytes()
        rows = [
            (f"rapl, {where}", cpu_seconds_per_call(lambda i: source.sample(float(i)), args.samples)),
            ("macmon, parse one line", cpu_seconds_per_call(lambda i: parse_macmon_line(macmon_line), args.samples)),
            ("powermetrics, parse one M2 Ultra plist", cpu_seconds_per_call(lambda i: parse_powermetrics_plist(plist),
                                                                           args.samples)),
        ]  # fmt: skip
    print(f"{args.samples} samples each; CPU time of this process per sample, and at one sample a second:")
    for name, seconds in rows:
        print(f"  {name}: {seconds * 1e6:.0f} us per sample = {seconds * 100:.4f}% of a core")


if __name__ == "__main__":
    main()
