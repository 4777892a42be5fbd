"""Awake while serving: pmset's assertions and battery parsed on every recorded sample, and the
hold on idle sleep for real (systemd-inhibit where logind answers; stand-in tools otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from recorded import recorded

from tbmesh.node.awake import (
    WHO,
    Assertion,
    Battery,
    KeepAwake,
    idle_sleep_minutes,
    PowerSupply,
    parse_pmset_assertions,
    parse_pmset_batt,
    parse_pmset_settings,
)

# --- pmset -g assertions ----------------------------------------------------------------------


def assertions(n: int):
    return parse_pmset_assertions(recorded(f"pmset-g-assertions.{n}.txt"))


def test_assertions_counters_and_holders_of_a_macbook_with_amphetamine():
    found = assertions(1)
    assert found.counters["PreventUserIdleSystemSleep"] == 1 and found.counters["UserIsActive"] == 1
    assert len(found.counters) == 8 and len(found.held) == 7
    assert found.held[1] == Assertion(101, "powerd", "PreventUserIdleSystemSleep",
                                      "Powerd - Prevent sleep while display is on", 33 * 3600 + 53 * 60 + 14)
    assert found.held[2].details == ("Timeout will fire in 600 secs Action=TimeoutActionRelease",)
    assert found.held[-1].kind == "NoIdleSleepAssertion" and found.idle_sleep_prevented


def test_a_caffeinate_on_behalf_of_a_process_is_found_for_that_process():
    found = assertions(2)
    held = found.preventing_idle_sleep_for(78180)
    assert [(a.pid, a.process, a.kind) for a in held] == [(33794, "caffeinate", "PreventUserIdleSystemSleep")]
    assert held[0].details[:2] == ("Details: caffeinate asserting on behalf of Process ID 78180", "Created for PID: 78180.")
    assert found.held[2].on_behalf_of == 762 and found.held[2].details[-1] == "Resources: audio-out CC-14-BC-3A-19-A6:output"
    assert found.preventing_idle_sleep_for(416)[0].process == "coreaudiod"  # its own assertion
    assert found.preventing_idle_sleep_for(12345) == []


def test_assertions_pasted_with_spaces_for_tabs_and_no_trailing_spaces():
    found = assertions(3)
    caffeinate = found.held[0]
    assert (caffeinate.pid, caffeinate.held_s, caffeinate.on_behalf_of) == (98217, 3, None)
    assert caffeinate.details[0] == "Details: caffeinate asserting for 1600 secs" and len(caffeinate.details) == 3
    assert found.counters["PreventUserIdleDisplaySleep"] == 0


def test_assertions_with_no_user_session_held_by_caffeinate_alone():
    found = assertions(4)
    assert found.counters["UserIsActive"] == 0 and found.counters["SoftwareUpdateTask"] == 0
    assert {a.process for a in found.held} == {"caffeinate"} and found.idle_sleep_prevented


def test_assertions_without_counters_long_holds_and_every_caffeinate():
    found = assertions(5)  # partial: from "Listed by owning process" on
    assert found.counters == {} and found.idle_sleep_prevented  # told by the assertions held
    assert max(a.held_s for a in found.held) == 416 * 3600 + 31 * 60 + 41
    assert [a.kind for a in found.held if a.pid == 58309] == ["PreventUserIdleSystemSleep", "PreventSystemSleep",
                                                              "PreventDiskIdle"]  # fmt: skip
    assert len(found.preventing_idle_sleep_for(7584)) == 2
    assert found.held[-1].name == "app<application.net.whatsapp.WhatsApp...(FinishTask)"


def test_assertions_with_a_counter_name_longer_than_its_column():
    found = assertions(6)
    assert found.counters["PreventSystemSleepSecurityIndicator"] == 0
    assert found.counters["InternalPreventDisplaySleep"] == 1 and len(found.counters) == 11
    assert [a.process for a in found.held] == ["WeChatAppEx", "bluetoothd", "WindowServer", "powerd", "powerd"]


def test_no_assertion_preventing_idle_sleep_reads_as_such():
    text = recorded("pmset-g-assertions.4.txt").replace("PreventUserIdleSystemSleep     1", "PreventUserIdleSystemSleep     0")
    assert not parse_pmset_assertions(text).idle_sleep_prevented  # derived: the counter at 0


# --- pmset -g batt --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, supply", [
    (1, PowerSupply("AC Power", Battery(36, "charging", "13:20"))),
    (2, PowerSupply("Battery Power", Battery(100, "discharging", "6:30"))),
    (3, PowerSupply("AC Power", Battery(80, "AC attached; not charging", None))),
    (4, PowerSupply("AC Power", None)),  # a desktop Mac
    (5, PowerSupply("AC Power", Battery(100, "charged", "0:00"))),
])  # fmt: skip
def test_battery_of_every_recorded_sample(n, supply):
    found = parse_pmset_batt(recorded(f"pmset-g-batt.{n}.txt"))
    assert found == supply and found.on_battery == (n == 2)


def test_battery_without_an_estimate():
    text = recorded("pmset-g-batt.2.txt").replace("6:30 remaining", "(no estimate)")  # as pmset prints it early on
    assert parse_pmset_batt(text).battery == Battery(100, "discharging", None)


def test_battery_output_without_a_source_is_an_error():
    with pytest.raises(ValueError, match="Now drawing from"):
        parse_pmset_batt("pmset: command not found")


# --- pmset -g ----------------------------------------------------------------------------------------


def test_settings_of_a_mac_mini_that_never_sleeps_and_a_laptop_that_does():
    mini = parse_pmset_settings(recorded("pmset-g.1.txt"))
    assert mini["sleep"] == "0 (sleep prevented by powerd, sharingd, bluetoothd)" and mini["Sleep On Power Button"] == "1"
    assert idle_sleep_minutes(mini) == 0 and "hibernatemode" not in mini and len(mini) == 12
    laptop = parse_pmset_settings(recorded("pmset-g.2.txt"))
    assert idle_sleep_minutes(laptop) == 1 and laptop["hibernatefile"] == "/var/vm/sleepimage"
    assert laptop["lowpowermode"] == "0" and len(laptop) == 13
    assert idle_sleep_minutes({}) is None


# --- holding the machine awake --------------------------------------------------------------------


def inhibitors() -> str:
    return subprocess.run(["systemd-inhibit", "--list", "--no-pager"], capture_output=True, text=True, check=False).stdout


def logind_unreachable() -> str:
    if shutil.which("systemd-inhibit") is None:
        return "no systemd-inhibit on this machine"
    done = subprocess.run(["systemd-inhibit", "--list", "--no-pager"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"systemd-inhibit cannot reach logind here: {done.stderr.strip().splitlines()[-1]}"
    return ""


@pytest.mark.skipif(bool(logind_unreachable()), reason=logind_unreachable() or "-")
def test_systemd_inhibit_holds_idle_and_sleep_until_released():
    awake = KeepAwake("linux")
    try:
        assert awake.acquire() and awake.held and awake.why_not == ""
        assert WHO in inhibitors()
        assert awake.acquire()  # again: still the one hold
    finally:
        awake.release()
    assert not awake.held and WHO not in inhibitors()


def write_tool(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_holder_that_cannot_hold_says_why_in_one_line(tmp_path):
    refused = write_tool(tmp_path, "systemd-inhibit",
                         "import sys; print('Failed to connect to bus: No such file or directory', file=sys.stderr); "
                         "sys.exit(1)")  # fmt: skip
    awake = KeepAwake("linux", which=lambda name: refused)
    assert not awake.acquire() and not awake.held
    assert awake.why_not == "systemd-inhibit could not hold this machine awake: Failed to connect to bus: No such file or directory"
    nothing = KeepAwake("linux", which=lambda name: None)
    assert not nothing.acquire() and "no systemd-inhibit" in nothing.why_not


def test_caffeinate_is_held_for_the_daemon_and_let_go(tmp_path):
    record = tmp_path / "args"
    caffeinate = write_tool(tmp_path, "caffeinate", f"import sys, time; open({str(record)!r}, 'w').write(' '.join(sys.argv[1:])); "
                                                    "time.sleep(60)")  # fmt: skip
    awake = KeepAwake("darwin", pid=4242, which=lambda name: caffeinate)
    assert awake.command() == [caffeinate, "-i", "-w", "4242"]
    try:
        assert awake.acquire() and awake.held
        holder = awake._process.pid
        assert record.read_text() == "-i -w 4242"
    finally:
        awake.release()
    assert not awake.held
    with pytest.raises(ProcessLookupError):
        os.kill(holder, 0)  # gone, not left holding the Mac awake
    awake.release()  # again: nothing to do


def test_a_holder_that_died_is_taken_again(tmp_path):
    short = write_tool(tmp_path, "caffeinate", "import time; time.sleep(0.6)")
    awake = KeepAwake("darwin", which=lambda name: short)
    assert awake.acquire()
    awake._process.wait(timeout=5)
    assert not awake.held and awake.acquire() and awake.held
    awake.release()
