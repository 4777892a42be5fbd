"""A Mac's power: `macmon pipe` (no root), `powermetrics` (root), and the IOReport channel rules.

What each tool prints, and why the parsers read it so (tests/fixtures/macos/ holds the
recorded samples; the facts come from macmon's and exo's sources, see SOURCES.md there):

- `macmon pipe --interval 1000` prints one JSON object a line, in watts: cpu_power,
  gpu_power, ane_power (IOReport's "Energy Model" channels), ram_power (from v0.4.2) and
  sys_power, the SMC's "PSTR" system power reported as max(PSTR, cpu + gpu + ane), so with
  PSTR unreadable it is only all_power. Counters that never move read exactly 0.0: for the
  CPU that is the macOS 27 beta fault (macmon#76), for DRAM a chip with no DRAM channel.
  Neither is idle, so both are None; the ANE is power-gated when idle, its 0 is real.
- `powermetrics --samplers cpu_power,gpu_power -f plist` (root) prints one plist per sample,
  NUL-separated, with processor.cpu_power, gpu_power, ane_power in mW. It has no system
  and, since macOS 13, no DRAM figure. The text form is read too (`parse_powermetrics_text`):
  macOS 12-13 printed `DRAM Power` and `Package Power`, later ones `Combined Power`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

from tbmesh.core.power import PowerReading

MACMON_ARGS = ["pipe", "--interval", "1000"]  # one sample a second, as exo runs it
POWERMETRICS_ARGS = ["powermetrics", "--samplers", "cpu_power,gpu_power", "--format", "plist",
                     "--sample-rate", "1000"]  # fmt: skip
# A stream that has said nothing for this long is stuck: its last reading is no longer now.
STALE_AFTER_S = 5.0
EXIT_WAIT_S = 0.5  # a tool whose output ended is reaped within this, to say its exit status
STREAM_READ_BYTES = 1 << 16  # one read; a plist sample is ~60 KB on an Ultra


# --- macmon --------------------------------------------------------------------------------


def parse_macmon_line(line: str | bytes) -> PowerReading:
    """One line of `macmon pipe` (any version from v0.4.2; keys in any order)."""
    try:
        sample = json.loads(line)
        cpu, gpu, ane = float(sample["cpu_power"]), float(sample["gpu_power"]), float(sample["ane_power"])
        system, chip = float(sample["sys_power"]), float(sample["all_power"])
        dram = sample.get("ram_power")
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a macmon sample (missing {error})") from None
    return PowerReading(
        "macmon",
        system=system if system > chip else None,  # max(PSTR, all_power): PSTR was not read
        cpu=cpu or None,  # a CPU never draws exactly 0: the counter is stuck
        gpu=gpu,
        ane=ane,
        dram=(float(dram) or None) if dram is not None else None,  # 0.0: no DRAM channel
    )


def macmon_source(program: str = "macmon") -> StreamSource:
    return StreamSource("macmon", [program, *MACMON_ARGS], b"\n", parse_macmon_line)


# --- powermetrics ----------------------------------------------------------------------------


# the processor dict's keys, each once in a sample (clusters and the gpu dict have none)
_PLIST_POWER = re.compile(r"<key>(cpu|gpu|ane)_power</key>\s*<(?:real|integer)>([^<]+)</(?:real|integer)>")


def parse_powermetrics_plist(data: bytes) -> PowerReading:
    """One plist sample of `powermetrics -f plist` (a stream separates them with NUL).

    The three keys are found with a pattern rather than plistlib: an M2 Ultra's sample is
    2,500 lines, and parsing all of it once a second cost 1.5% of a core here (bench/power_cost.py),
    the pattern about 0.01%. A test checks both agree on every recorded sample."""
    found = {name: float(value) for name, value in _PLIST_POWER.findall(data.decode("utf-8", "replace"))}
    if "cpu" not in found:
        raise ValueError("not a powermetrics plist sample (no processor cpu_power)")
    return _from_milliwatts(found.get("cpu"), found.get("gpu"), found.get("ane"), None)


_TEXT_POWER = re.compile(r"^(CPU|GPU|ANE|DRAM) Power: (\d+(?:\.\d+)?) mW$", re.MULTILINE)


def parse_powermetrics_text(text: str) -> PowerReading:
    """The `… Power: N mW` lines of `powermetrics` text output (the GPU section repeats GPU
    Power; the last of each wins). `Package Power`/`Combined Power` are CPU + GPU + ANE
    (+ DRAM), not the machine, so they are not `system`."""
    found = {name: float(value) for name, value in _TEXT_POWER.findall(text)}
    if not found:
        raise ValueError("no `CPU Power: N mW` line in the powermetrics output")
    return _from_milliwatts(found.get("CPU"), found.get("GPU"), found.get("ANE"), found.get("DRAM"))


def _from_milliwatts(cpu: Any, gpu: Any, ane: Any, dram: Any) -> PowerReading:
    def watts(mw: Any) -> float | None:
        return None if mw is None else float(mw) / 1000

    cpu_w = watts(cpu)
    return PowerReading("powermetrics", cpu=cpu_w or None,  # 0 mW: the stuck counter of macOS 27 betas
                        gpu=watts(gpu), ane=watts(ane), dram=watts(dram) or None)  # fmt: skip


def powermetrics_source() -> StreamSource:
    return StreamSource("powermetrics", POWERMETRICS_ARGS, b"\0", parse_powermetrics_plist)


# --- IOReport's energy channels, as macmon matches them -------------------------------------------

ENERGY_GROUP = "Energy Model"
JOULES_PER_UNIT = {"mJ": 1e-3, "uJ": 1e-6, "nJ": 1e-9}


def ioreport_domain(group: str, channel: str) -> str | None:
    """The domain an IOReport channel counts into, or None for one not summed: "GPU Energy"
    (gpu); "CPU Energy", "DIE_0_CPU Energy"... (cpu); "ANE", "ANE0", "ANE0_1"... (ane);
    "DRAM", "DRAM0_0"... (dram). Per-block channels ("GPU0_0", "GPU SRAM0_0", "ISP"...) are
    parts of those or of nothing we show."""
    if group != ENERGY_GROUP:
        return None
    if channel == "GPU Energy":
        return "gpu"
    if channel.endswith("CPU Energy"):
        return "cpu"
    for prefix, domain in (("ANE", "ane"), ("DRAM", "dram")):
        if channel.startswith(prefix):
            return domain
    return None


def ioreport_reading(deltas: Iterable[tuple[str, str, str, float]], seconds: float) -> PowerReading:
    """Watts from IOReport counter differences over `seconds`: (group, channel, unit, delta)
    a channel, units mJ, uJ or nJ. A domain with no channel is None; IOReport has no system
    figure (the SMC has)."""
    joules: dict[str, float] = {}
    for group, channel, unit, delta in deltas:
        domain = ioreport_domain(group, channel)
        if domain is None:
            continue
        if unit not in JOULES_PER_UNIT:
            raise ValueError(f"IOReport channel {channel!r} counts in {unit!r}, not mJ, uJ or nJ")
        joules[domain] = joules.get(domain, 0.0) + delta * JOULES_PER_UNIT[unit]
    return PowerReading("ioreport", **{domain: j / seconds for domain, j in joules.items()})


# --- a tool that keeps printing samples -------------------------------------------------------


class StreamSource:
    """A tool that prints a sample every interval for as long as it runs: started once and
    read without blocking at each sample, so the daemon pays for one process, not one a
    second. The last whole record is the reading; one that is older than STALE_AFTER_S, or a
    tool that ended (started again at the next sample), is no reading."""

    def __init__(self, name: str, args: list[str], separator: bytes,
                 parse: Callable[[bytes], PowerReading]) -> None:  # fmt: skip
        self.name = name
        self.args = args
        self.separator = separator
        self.parse = parse
        self.why_not = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._pending = b""
        self._last: PowerReading | None = None
        self._last_at: float | None = None

    def sample(self, now: float) -> PowerReading | None:
        if self._process is None and not self._start():
            return None
        assert self._process is not None and self._process.stdout is not None
        while True:  # everything printed since the last sample: the newest record is the reading
            try:
                chunk = os.read(self._process.stdout.fileno(), STREAM_READ_BYTES)
            except BlockingIOError:
                break
            if not chunk:  # the tool ended (or closed its output): started again at the next sample
                try:
                    code: int | None = self._process.wait(timeout=EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    code = None  # it closed its output but runs on: close() ends it
                self.why_not = f"{self.args[0]} stopped" + (f" (exit status {code})" if code is not None else "")
                self.close()
                return None
            self._take(chunk, now)
        if self._last_at is None or now - self._last_at > STALE_AFTER_S:
            return None
        return self._last

    def _take(self, chunk: bytes, now: float) -> None:
        *records, self._pending = (self._pending + chunk).split(self.separator)
        for record in reversed(records):  # the newest whole record
            if record.strip(b"\0 \t\r\n"):
                try:
                    self._last, self._last_at = self.parse(record), now
                    self.why_not = ""
                except ValueError as error:
                    self.why_not = f"{self.name}: {error}"
                return

    def _start(self) -> bool:
        try:
            self._process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL)  # fmt: skip
        except OSError as error:
            self.why_not = f"{self.args[0]}: {error}"
            return False
        assert self._process.stdout is not None
        os.set_blocking(self._process.stdout.fileno(), False)
        self._pending = b""
        return True

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
