"""Awake while serving: what `pmset` says about sleep and the battery, and a hold on idle sleep.

A Mac that holds a stage must not fall asleep in the middle of an answer. `caffeinate -i`
takes the same IOKit assertion (PreventUserIdleSystemSleep) an app would, and `-w <pid>`
lets it go by itself when the daemon dies, so a crash never leaves a Mac awake for good.
On Linux `systemd-inhibit` takes logind's idle and sleep locks around a child that lives as
long as the daemon (`tail --pid`), for the same reason.

`pmset -g assertions` lists who holds what (tests/fixtures/macos/pmset-g-assertions.*.txt):
the system-wide counters (a name padded to 30 columns, then the value; a longer name pushes
its value out of line), then one `pid N(name): [0x…] HH:MM:SS Type named: "…"` line per
assertion (hours not capped at 99), with tab-indented continuation lines (`Details:`,
`Created for PID:`, `Localized=`, `Timeout will fire…`, `Resources:`). `pmset -g batt` says
where power comes from and, on a laptop, the battery's charge. Neither prints the lid
(clamshell) state, so it is not read here: `ioreg -r -k AppleClamshellState` has it, and no
recorded output of it exists yet.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

# the assertion types that keep a Mac from idle system sleep (not only the display)
PREVENTS_IDLE_SLEEP = ("PreventUserIdleSystemSleep", "PreventSystemSleep", "NoIdleSleepAssertion")
WHO = "tbmesh"
WHY = "a tbmesh daemon serves a stage of a model"
# How long acquire watches the holder start: a tool that cannot take the lock (no logind, a
# refused D-Bus call) exits at once with its reason; one that holds it stays.
SETTLE_S = 0.3


# --- pmset -g assertions --------------------------------------------------------------------


@dataclass(frozen=True)
class Assertion:
    """One assertion of `pmset -g assertions`' "Listed by owning process" section."""

    pid: int
    process: str  # "caffeinate"
    kind: str  # "PreventUserIdleSystemSleep"
    name: str  # "caffeinate command-line tool"
    held_s: int  # how long it has been held
    details: tuple[str, ...] = ()  # the continuation lines, stripped

    @property
    def on_behalf_of(self) -> int | None:
        """The pid it was taken for: caffeinate's "-w" process or "Created for PID"."""
        for line in self.details:
            match = re.search(r"(?:on behalf of Process ID|Created for PID:) (\d+)", line)
            if match:
                return int(match[1])
        return None


@dataclass(frozen=True)
class Assertions:
    """`pmset -g assertions`: the system-wide counters (empty when the output lacks them) and
    the assertions held."""

    counters: dict[str, int]
    held: tuple[Assertion, ...]

    @property
    def idle_sleep_prevented(self) -> bool:
        counter = self.counters.get("PreventUserIdleSystemSleep")
        if counter is not None:
            return counter > 0
        return any(a.kind in PREVENTS_IDLE_SLEEP for a in self.held)

    def preventing_idle_sleep_for(self, pid: int) -> list[Assertion]:
        """The assertions that keep the machine from idle sleep for process `pid` (its own or
        a caffeinate's on its behalf)."""
        return [a for a in self.held if a.kind in PREVENTS_IDLE_SLEEP and pid in (a.pid, a.on_behalf_of)]


_HOLDER = re.compile(r"\s*pid (\d+)\((.*?)\): \[0x[0-9a-fA-F]+\] (\d+):(\d\d):(\d\d) (\S+) named: \"(.*)\"\s*")
_COUNTER = re.compile(r"\s+([A-Za-z]+)\s+(\d+)\s*")


def parse_pmset_assertions(text: str) -> Assertions:
    counters: dict[str, int] = {}
    held: list[Assertion] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("Assertion status system-wide:"):
            section = "counters"
        elif line.startswith("Listed by owning process:"):
            section = "held"
        elif line.startswith(("Kernel Assertions", "No kernel assertions")):
            section = "kernel"
        elif section == "counters" and (counter := _COUNTER.fullmatch(line)):
            counters[counter[1]] = int(counter[2])
        elif section == "held" and (holder := _HOLDER.fullmatch(line)):
            hours, minutes, seconds = int(holder[3]), int(holder[4]), int(holder[5])
            held.append(Assertion(int(holder[1]), holder[2], holder[6], holder[7],
                                  hours * 3600 + minutes * 60 + seconds))  # fmt: skip
        elif section == "held" and held and line[:1] in ("\t", " ") and line.strip():
            last = held[-1]  # a continuation line of the assertion above (a tab; 8 spaces once pasted)
            held[-1] = Assertion(last.pid, last.process, last.kind, last.name, last.held_s,
                                 (*last.details, line.strip()))  # fmt: skip
    return Assertions(counters, tuple(held))


# --- pmset -g batt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Battery:
    percent: int
    state: str  # "charging", "discharging", "charged", "AC attached; not charging"
    remaining: str | None  # "6:30"; None when pmset gives no estimate


@dataclass(frozen=True)
class PowerSupply:
    """`pmset -g batt`: where power comes from, and the battery if there is one."""

    source: str  # "AC Power", "Battery Power", "UPS Power"
    battery: Battery | None  # None on a desktop Mac

    @property
    def on_battery(self) -> bool:
        return self.source == "Battery Power"


_SOURCE = re.compile(r"Now drawing from '([^']+)'")
# " -InternalBattery-0 (id=22610019)\t36%; charging; 13:20 remaining present: true"; the
# estimate may be "(no estimate)" or missing ("80%; AC attached; not charging present: true")
_BATTERY = re.compile(r"\s*-InternalBattery-\d+ \(id=\d+\)\s+(\d+)%; (.*?)(?: present: \w+)?\s*")
_ESTIMATE = re.compile(r"(\d+:\d\d) remaining|\(no estimate\)")


def parse_pmset_batt(text: str) -> PowerSupply:
    source = _SOURCE.search(text)
    if source is None:
        raise ValueError(f"pmset -g batt printed {text.strip()[:60]!r}, no 'Now drawing from' line")
    battery = None
    for line in text.splitlines():
        match = _BATTERY.fullmatch(line)
        if match:
            parts = match[2].split("; ")
            estimate = _ESTIMATE.fullmatch(parts[-1])
            if estimate:
                parts.pop()
            battery = Battery(int(match[1]), "; ".join(parts), estimate[1] if estimate else None)
            break
    return PowerSupply(source[1], battery)


# --- pmset -g ---------------------------------------------------------------------------------


def parse_pmset_settings(text: str) -> dict[str, str]:
    """`pmset -g`'s settings in use: {"sleep": "0 (sleep prevented by powerd, sharingd)", ...}.
    A name may hold spaces ("Sleep On Power Button 1"): the value is the first field that
    starts with a digit or a slash."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        match = re.fullmatch(r" (\S.*?)\s+([\d/].*)", line)
        if match:
            settings[match[1]] = match[2].strip()
    return settings


def idle_sleep_minutes(settings: dict[str, str]) -> int | None:
    """Minutes of idleness before the system sleeps (0: never); None when pmset does not say."""
    match = re.match(r"\d+", settings.get("sleep", ""))
    return int(match[0]) if match else None


# --- holding the machine awake ---------------------------------------------------------------


class KeepAwake:
    """Keeps this machine from idle sleep while held: `caffeinate -i -w <pid>` on a Mac,
    `systemd-inhibit --what=idle:sleep` on Linux. `acquire` and `release` may be called any
    number of times; `acquire` waits SETTLE_S to see the holder stay, so call it off the
    event loop. `why_not` says in one line why nothing holds it."""

    def __init__(self, platform: str = sys.platform, pid: int | None = None,
                 which: Callable[[str], str | None] = shutil.which) -> None:  # fmt: skip
        self.platform = platform
        self.pid = os.getpid() if pid is None else pid
        self.which = which
        self.why_not = ""
        self._process: subprocess.Popen[str] | None = None

    def command(self) -> list[str] | None:
        """What holds the machine awake here; None (and why_not set) when nothing can."""
        if self.platform == "darwin":
            caffeinate = self.which("caffeinate") or "/usr/bin/caffeinate"
            return [caffeinate, "-i", "-w", str(self.pid)]
        inhibit = self.which("systemd-inhibit")
        if inhibit is None:
            self.why_not = "nothing keeps this machine awake while serving: it has no systemd-inhibit"
            return None
        return [inhibit, "--what=idle:sleep", f"--who={WHO}", f"--why={WHY}", "--mode=block",
                "tail", f"--pid={self.pid}", "-f", "/dev/null"]  # fmt: skip

    @property
    def held(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def acquire(self) -> bool:
        """Hold the machine awake; False (why_not says why) when it cannot be held."""
        if self.held:
            return True
        self.release()  # a holder that died by itself
        command = self.command()
        if command is None:
            return False
        try:
            # its own process group: systemd-inhibit's child (tail) goes with it on release
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        except OSError as error:
            self.why_not = f"{command[0]}: {error}"
            return False
        try:
            code = process.wait(timeout=SETTLE_S)
        except subprocess.TimeoutExpired:
            self._process, self.why_not = process, ""
            return True
        lines = (process.stderr.read() if process.stderr else "").strip().splitlines()
        self.why_not = f"{os.path.basename(command[0])} could not hold this machine awake: " + (
            lines[-1] if lines else f"exit status {code}")
        return False

    def release(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _signal_group(process: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, signum)  # the holder started its own group (start_new_session)
