"""`tbmesh doctor`'s local checks on recorded outputs of healthy and broken Macs (files named
`…-derived` are real outputs with the smallest edit that breaks them, see SOURCES.md), and
for real on this Linux machine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from recorded import recorded

from tbmesh.net.rdma import parse_ibv_devices, parse_ibv_devinfo
from tbmesh.net.system import CommandError
from tbmesh.net.thunderbolt import parse_thunderbolt_json
from tbmesh.node.doctor import (
    OK,
    PROBLEM,
    SKIPPED,
    WARNING,
    Finding,
    check_battery,
    check_bridge,
    check_disk,
    check_macos,
    check_metal,
    check_rdma,
    check_service,
    check_thunderbolt,
    check_wired_limit,
    local_findings,
    parse_launchctl_print,
)
from tbmesh.node.awake import parse_pmset_batt
from tbmesh.node.measure import GiB, parse_device_info
from tbmesh.node.power import NoPower
from tbmesh.node.power_macos import macmon_source

# --- one check at a time ----------------------------------------------------------------------


def test_macos_older_than_26_2_is_a_problem_only_when_rdma_is_wanted():
    assert check_macos("26.2", wants_rdma=True).status == OK
    assert check_macos("27.0.1", wants_rdma=True).status == OK
    old = check_macos("15.7.5", wants_rdma=True)
    assert old.status == PROBLEM and "older than 26.2" in old.message and "softwareupdate" in old.fix
    assert check_macos("26.1", wants_rdma=False).status == WARNING
    assert check_macos(None, wants_rdma=True).status == SKIPPED


def tb(name: str):
    return parse_thunderbolt_json(recorded(name))


def test_thunderbolt_5_links_to_macs_are_healthy():
    findings = check_thunderbolt(tb("system_profiler-SPThunderboltDataType-json.2.txt"), wants_rdma=True)
    assert [f.status for f in findings] == [OK]  # the drive is not a Mac: not judged
    assert findings[0].message == ("port 2 (thunderboltusb4_bus_1) links to MacBook Pro Mac17,7 at 80 Gb/s, "
                                   "Thunderbolt 5; that Mac has RDMA on")  # fmt: skip


def test_thunderbolt_4_ports_are_a_problem_when_rdma_is_wanted():
    ports = tb("system_profiler-SPThunderboltDataType-json.1.tb4-derived.txt")
    findings = check_thunderbolt(ports, wants_rdma=True)
    assert [f.status for f in findings] == [PROBLEM, PROBLEM]
    assert "no Thunderbolt 5 port on this Mac (40 Gb/s, Up to 40 Gb/s)" in findings[0].message
    assert "links to Mac Studio Mac15,14 at 40 Gb/s: a Thunderbolt 4 or 3 link" in findings[1].message
    assert "Thunderbolt 5 cable" in findings[1].fix
    assert [f.status for f in check_thunderbolt(ports, wants_rdma=False)] == [WARNING]


def test_no_mac_cabled_is_a_warning_with_what_to_do():
    uncabled = [p for p in tb("system_profiler-SPThunderboltDataType-json.1.txt") if not p.connected]
    (finding,) = check_thunderbolt(uncabled, wants_rdma=False)
    assert finding.status == WARNING and "no Mac is cabled" in finding.message and "cable this Mac" in finding.fix
    assert check_thunderbolt(None, True, "system_profiler: not found")[0] == Finding(
        "thunderbolt", SKIPPED, "system_profiler: not found")


def test_rdma_enabled_lists_its_ports_and_which_are_cabled():
    devices = parse_ibv_devinfo(recorded("ibv_devinfo.1.txt"))
    finding = check_rdma(True, devices, is_mac=True, wants_rdma=True)
    assert finding == Finding("rdma", OK, "RDMA is enabled on 3 ports: rdma_en1 (no cable), rdma_en6 (no cable), "
                              "rdma_en2 (no cable)")  # fmt: skip
    listed = check_rdma(True, parse_ibv_devices(recorded("ibv_devices.1.txt")), is_mac=True, wants_rdma=True)
    assert listed.message.endswith("6 ports: rdma_en2, rdma_en3, rdma_en4, rdma_en5, rdma_en6, rdma_en7")


def test_rdma_off_or_impossible_says_the_fix():
    from tbmesh.net.rdma import parse_rdma_ctl_status

    off = parse_rdma_ctl_status(recorded("rdma_ctl-status.1.disabled-derived.txt"))
    finding = check_rdma(off, [], is_mac=True, wants_rdma=True)
    assert finding.status == PROBLEM and finding.fix.startswith("rdma_ctl enable") and "recoveryOS" in finding.fix
    assert check_rdma(off, [], is_mac=True, wants_rdma=False).status == WARNING
    tb4 = check_rdma(True, parse_ibv_devices(recorded("ibv_devices.4.txt")), is_mac=True, wants_rdma=True)
    assert tb4.status == PROBLEM and "no RDMA device" in tb4.message  # a Thunderbolt 4 Mac
    assert "26.2" in check_rdma(None, [], is_mac=True, wants_rdma=True).message
    assert check_rdma(None, [], is_mac=False, wants_rdma=True).status == SKIPPED


def bridge_members(name: str) -> list[str]:
    from tbmesh.net.interfaces import parse_ifconfig

    return parse_ifconfig(recorded(name))["bridge0"].members


def test_ports_inside_the_bridge_are_a_problem_when_rdma_is_wanted():
    members = bridge_members("ifconfig-bridge0.1.txt")
    rdma_ports = [d.interface for d in parse_ibv_devices(recorded("ibv_devices.1.txt"))]
    finding = check_bridge(members, rdma_ports, wants_rdma=True)
    assert finding.status == PROBLEM and finding.message.startswith("en2, en3, en4 are inside the Thunderbolt Bridge")
    assert finding.fix == ("sudo ifconfig bridge0 deletem en2; sudo ifconfig bridge0 deletem en3; "
                           "sudo ifconfig bridge0 deletem en4; "
                           'sudo networksetup -setnetworkserviceenabled "Thunderbolt Bridge" off')  # fmt: skip
    assert check_bridge(members, ["en6"], wants_rdma=True).status == OK  # members without RDMA devices
    assert check_bridge(members, rdma_ports, wants_rdma=False).status == OK
    emptied = check_bridge(bridge_members("ifconfig-bridge0.1.no-members-derived.txt"), rdma_ports, wants_rdma=True)
    assert emptied.status == OK and "empty" in emptied.message
    assert check_bridge(None, rdma_ports, wants_rdma=True).status == OK  # no bridge at all


def test_the_wired_limit_against_the_shard():
    m1_max = 32 * GiB  # the recorded M1 Max (sysctl-w-iogpu.wired_limit_mb.1.txt)
    too_big = check_wired_limit(25 * GiB, m1_max, None, 0, is_mac=True)
    assert too_big.status == PROBLEM and "more than the 25.8 GB the GPU may wire" in too_big.message
    assert too_big.fix.startswith("sudo sysctl iogpu.wired_limit_mb=25600 ")
    raised = check_wired_limit(25 * GiB, m1_max, None, 26000, is_mac=True)  # what its owner set
    assert raised.status == OK and "iogpu.wired_limit_mb=26000" in raised.message
    cannot = check_wired_limit(30 * GiB, m1_max, None, 0, is_mac=True)
    assert cannot.status == PROBLEM and "does not fit this Mac" in cannot.message and "add a Mac" in cannot.fix
    m4_pro = parse_device_info(recorded("mlx-metal-device_info.2.txt"))  # 48 GB, Metal recommends 78%
    assert check_wired_limit(35 * GiB, m4_pro["memory_size"], m4_pro, None, is_mac=True).status == OK
    assert check_wired_limit(None, m1_max, None, 0, is_mac=True).status == SKIPPED
    assert check_wired_limit(1, m1_max, None, 0, is_mac=False).status == SKIPPED


def test_disk_free_for_the_layers(tmp_path):
    assert check_disk(100 * GiB, 60 * GiB, tmp_path).status == OK
    short = check_disk(10 * GiB, 60 * GiB, tmp_path)
    assert short.status == PROBLEM and short.fix.startswith("free 53.7 GB there")
    assert check_disk(10 * GiB, None, tmp_path).status == SKIPPED


def test_metal_device_of_mlx():
    for n in (1, 2, 3, 4):
        assert check_metal(parse_device_info(recorded(f"mlx-metal-device_info.{n}.txt")), is_mac=True).status == OK
    m5 = check_metal(parse_device_info(recorded("mlx-metal-device_info.3.txt")), is_mac=True)
    assert m5.message.startswith("MLX uses Apple M5 Max, recommended working set")
    missing = check_metal(None, is_mac=True, why_not="ModuleNotFoundError: No module named 'mlx'")
    assert missing.status == PROBLEM and "arm64" in missing.fix and "No module named" in missing.message
    assert check_metal(None, is_mac=False).status == SKIPPED


def test_the_launchd_service_state():
    stopped = parse_launchctl_print(recorded("launchctl-print.1.txt"))
    assert stopped["state"] == "not running" and stopped["last exit code"] == "(never exited)"
    assert "PATH" not in stopped and stopped["domain"] == "system"  # nested blocks are not the service's
    target = "system/com.tbmesh.daemon"
    finding = check_service(stopped, target, is_mac=True)
    assert finding.status == PROBLEM and finding.fix.startswith(f"sudo launchctl kickstart -k {target}")
    running = parse_launchctl_print(recorded("launchctl-print.1.running-derived.txt"))
    assert check_service(running, target, is_mac=True) == Finding("service", OK, f"the service {target} is running (pid 4242)")
    assert check_service(None, target, is_mac=True).status == WARNING
    assert check_service(None, target, is_mac=False).status == SKIPPED


@pytest.mark.parametrize("n, status, message", [
    (1, OK, "on AC Power (battery 36%, charging)"),
    (2, WARNING, "on battery (battery 100%, discharging, 6:30 left): macOS may slow this Mac"),
    (3, OK, "on AC Power (battery 80%, AC attached; not charging)"),
    (4, OK, "on AC Power (no battery)"),
    (5, OK, "on AC Power (battery 100%, charged)"),
])  # fmt: skip
def test_battery_of_every_recorded_mac(n, status, message):
    finding = check_battery(parse_pmset_batt(recorded(f"pmset-g-batt.{n}.txt")), is_mac=True)
    assert finding.status == status and finding.message.startswith(message)
    assert bool(finding.fix) == (status == WARNING)


# --- all of them, on a recorded Mac ---------------------------------------------------------------


def no_macmon(platform: str) -> NoPower:
    return NoPower("power is not readable here: install macmon (`brew install macmon`), or run the daemon as root")


def fake_mac(outputs: dict[tuple[str, ...], str]):
    def run(args: list[str]) -> str:
        if tuple(args) not in outputs:
            raise CommandError(f"{' '.join(args)}: not recorded")
        return outputs[tuple(args)]

    return run


HEALTHY = {  # an M5 Max MacBook Pro with RDMA on (the osaurus pair's peer), bridge emptied
    ("rdma_ctl", "status"): recorded("rdma_ctl-status.1.txt"),
    ("ibv_devinfo",): recorded("ibv_devinfo.1.txt"),
    ("system_profiler", "-json", "SPThunderboltDataType"): recorded("system_profiler-SPThunderboltDataType-json.4.txt"),
    ("ifconfig", "bridge0"): recorded("ifconfig-bridge0.1.no-members-derived.txt"),
    ("sysctl", "hw.memsize"): "hw.memsize: 137438953472\n",
    ("sysctl", "iogpu.wired_limit_mb"): recorded("sysctl-iogpu.wired_limit_mb.1.txt"),
    ("launchctl", "print", "system/com.tbmesh.daemon"): recorded("launchctl-print.1.running-derived.txt"),
    ("pmset", "-g", "batt"): recorded("pmset-g-batt.1.txt"),
}
BROKEN = {  # Thunderbolt 4 links, RDMA off, its ports in the bridge, the service stopped
    ("rdma_ctl", "status"): recorded("rdma_ctl-status.1.disabled-derived.txt"),
    ("system_profiler", "-json", "SPThunderboltDataType"):
        recorded("system_profiler-SPThunderboltDataType-json.1.tb4-derived.txt"),
    ("ifconfig", "bridge0"): recorded("ifconfig-bridge0.1.txt"),
    ("sysctl", "hw.memsize"): recorded("sysctl-hw.model-hw.memsize.1.txt"),
    ("sysctl", "iogpu.wired_limit_mb"): recorded("sysctl-iogpu.wired_limit_mb.1.txt"),
    ("launchctl", "print", "system/com.tbmesh.daemon"): recorded("launchctl-print.1.txt"),
    ("pmset", "-g", "batt"): recorded("pmset-g-batt.2.txt"),
}  # fmt: skip
TARGETS = ("system/com.tbmesh.daemon", "gui/501/com.tbmesh.daemon")


@pytest.fixture
def disk_of_100_gib(monkeypatch):
    from tbmesh.node import doctor

    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=100 * GiB))


def statuses(findings: list[Finding]) -> dict[str, str]:
    return {f.check: f.status for f in findings}


def test_a_healthy_mac_has_no_problem(tmp_path, disk_of_100_gib):
    m5_max = parse_device_info(recorded("mlx-metal-device_info.3.txt"))
    findings = local_findings(shard_bytes=60 * GiB, layers_dir=tmp_path, daemon_problem=None, api="http://127.0.0.1:7471",
                              service_targets=TARGETS, platform="darwin", run=fake_mac(HEALTHY),
                              mac_version=lambda: "26.2", device_info=lambda: m5_max,
                              power=lambda platform: macmon_source("/opt/homebrew/bin/macmon"))  # fmt: skip
    assert statuses(findings) == {"macos": OK, "thunderbolt": OK, "rdma": OK, "bridge": OK, "wired-limit": OK,
                                  "disk": OK, "metal": OK, "battery": OK, "power": OK, "daemon": OK, "service": OK}
    assert not [f.fix for f in findings if f.fix]


def test_a_broken_mac_gets_every_problem_with_its_fix(tmp_path, disk_of_100_gib):
    findings = local_findings(shard_bytes=150 * GiB, wants_rdma=True, layers_dir=tmp_path, daemon_problem="connection refused",
                              api="http://127.0.0.1:7471", service_targets=TARGETS, platform="darwin",
                              run=fake_mac(BROKEN), mac_version=lambda: "15.7.5",
                              device_info=lambda: None, power=no_macmon)  # fmt: skip
    problems = [f for f in findings if f.status == PROBLEM]
    assert [f.check for f in problems] == ["macos", "thunderbolt", "thunderbolt", "rdma", "bridge", "wired-limit",
                                           "disk", "metal", "service"]  # fmt: skip
    assert all(f.fix for f in problems)
    assert statuses(findings)["daemon"] == WARNING and statuses(findings)["power"] == WARNING
    battery = next(f for f in findings if f.check == "battery")
    assert battery.status == WARNING and battery.message.startswith("on battery (battery 100%, discharging, 6:30 left)")
    assert next(f for f in findings if f.check == "power").fix == "brew install macmon"


def test_rdma_is_wanted_when_it_is_enabled(tmp_path):
    common = {"layers_dir": tmp_path, "platform": "darwin", "mac_version": lambda: "26.2",
              "device_info": lambda: None, "power": no_macmon}
    broken_but_off = local_findings(run=fake_mac(BROKEN), **common)
    assert statuses(broken_but_off)["bridge"] == OK and statuses(broken_but_off)["rdma"] == WARNING
    bridged = HEALTHY | {("ifconfig", "bridge0"): recorded("ifconfig-bridge0.1.txt")}
    bridge = next(f for f in local_findings(run=fake_mac(bridged), **common) if f.check == "bridge")
    assert bridge.status == PROBLEM and bridge.message.startswith("en2 is inside")  # RDMA on en1, en6, en2 only


def mlx_missing() -> None:
    raise ImportError("no mlx")


def test_commands_that_fail_make_checks_that_say_why(tmp_path):
    findings = local_findings(layers_dir=tmp_path, platform="darwin", run=fake_mac({}), mac_version=lambda: "26.2",
                              device_info=mlx_missing, power=no_macmon)  # fmt: skip
    by_check = {f.check: f for f in findings}
    assert by_check["thunderbolt"].status == SKIPPED and "not recorded" in by_check["thunderbolt"].message
    assert by_check["wired-limit"].status == SKIPPED and by_check["metal"].status == PROBLEM
    assert "ImportError: no mlx" in by_check["metal"].message


# --- for real, here ---------------------------------------------------------------------------------


def test_on_this_linux_machine_the_mac_checks_say_they_could_not_run(tmp_path):
    findings = local_findings(shard_bytes=1, layers_dir=tmp_path / "not yet made", daemon_problem="connection refused",
                              api="http://127.0.0.1:7471", platform="linux")  # fmt: skip
    skipped = {f.check: f.message for f in findings if f.status == SKIPPED}
    power = skipped.pop("power", None)  # this machine has no RAPL counters; one that has reads them
    assert power is None or power.startswith("power is not readable here")
    assert set(skipped) == {"macos", "thunderbolt", "rdma", "bridge", "wired-limit", "metal", "battery", "service"}
    assert all(message.startswith("not a Mac") for message in skipped.values())
    assert statuses(findings)["disk"] == OK  # one byte fits the nearest existing parent's disk
    assert statuses(findings)["daemon"] == WARNING


@pytest.mark.parametrize("finding", [Finding("disk", OK, "x"), Finding("rdma", PROBLEM, "y", "rdma_ctl enable")])
def test_findings_are_plain_json(finding):
    assert finding.as_json() == {"check": finding.check, "status": finding.status, "message": finding.message,
                                 "fix": finding.fix}  # fmt: skip

