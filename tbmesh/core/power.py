"""What a machine draws, in watts by domain: the vocabulary of the power sources
(tbmesh/node/power.py) and of whoever shows or sums their readings."""

from __future__ import annotations

from dataclasses import dataclass, fields

DOMAINS = ("system", "cpu", "gpu", "ane", "dram")


@dataclass(frozen=True)
class PowerReading:
    """Watts by domain over the last interval; None where the source cannot tell (an unknown
    watt is not an idle one, so it is never 0)."""

    source: str  # "macmon", "powermetrics", "rapl"
    system: float | None = None  # the whole machine (a Mac's SMC; RAPL's psys zone)
    cpu: float | None = None
    gpu: float | None = None
    ane: float | None = None  # Apple's Neural Engine
    dram: float | None = None

    def watts(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in DOMAINS}
