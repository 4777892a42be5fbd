"""Power per machine: macmon and powermetrics read from recorded samples, IOReport's channel
rules on the channel names macmon matches, RAPL on a fake powercap tree, and the streams of
a tool for real with a stand-in tool."""

from __future__ import annotations

import json
import plistlib
import sys
import time
from pathlib import Path

import pytest
from recorded import FIXTURES, recorded

from tbmesh.core.power import DOMAINS, PowerReading
from tbmesh.node.power import NoPower, power_source
from tbmesh.node.power_macos import (
    STALE_AFTER_S,
    StreamSource,
    ioreport_domain,
    ioreport_reading,
    parse_macmon_line,
    parse_powermetrics_plist,
    parse_powermetrics_text,
)
from tbmesh.node.power_rapl import RaplSource, energy_delta_uj, find_zones

# --- macmon -------------------------------------------------------------------------------


def test_macmon_lines_of_every_recorded_version_give_watts_by_domain():
    v06 = parse_macmon_line(recorded("macmon-pipe.1.txt"))  # v0.6+: sorted keys, a timestamp
    assert v06 == PowerReading("macmon", system=9.391488075256348, cpu=0.25233203172683716,
                               gpu=0.004442947451025248, ane=0.0, dram=None)  # ram_power 0.0: no channel
    assert parse_macmon_line(recorded("macmon-pipe.2.txt")).dram == 0.14885640144348145
    first, second = (parse_macmon_line(line) for line in recorded("macmon-pipe.3.txt").splitlines())
    assert (first.system, first.cpu, first.dram) == (10.269848, 0.06117144, 0.0812975)  # v0.4-0.5 layout
    assert (second.system, second.gpu) == (10.272432, 0.03071117)


def test_macmon_figures_it_could_not_read_are_absent_not_zero():
    sample = json.loads(recorded("macmon-pipe.1.txt"))
    # PSTR unread: macmon reports sys_power = all_power (cpu + gpu + ane), which is not the machine
    unread = parse_macmon_line(json.dumps(sample | {"sys_power": sample["all_power"]}))
    assert unread.system is None and unread.cpu == sample["cpu_power"]
    # the macOS 27 beta fault: the CPU energy counter stops, cpu_power reads 0.0
    stuck = parse_macmon_line(json.dumps(sample | {"cpu_power": 0.0, "all_power": sample["gpu_power"]}))
    assert stuck.cpu is None and stuck.system == sample["sys_power"] and stuck.ane == 0.0


def test_a_broken_macmon_line_is_an_error_naming_what_is_missing():
    with pytest.raises(ValueError, match="cpu_power"):
        parse_macmon_line('{"gpu_power": 1.0}')
    with pytest.raises(ValueError):
        parse_macmon_line("macmon: command not found")


# --- powermetrics ----------------------------------------------------------------------------


def test_powermetrics_plist_samples_in_watts_with_no_system_or_dram_figure():
    ultra = parse_powermetrics_plist((FIXTURES / "powermetrics-plist.1.txt").read_bytes())
    assert ultra.source == "powermetrics"
    assert ultra.watts() == pytest.approx({"system": None, "cpu": 0.835188, "gpu": 70.9246, "ane": 0.0, "dram": None})
    m1 = parse_powermetrics_plist(b"\0" + (FIXTURES / "powermetrics-plist.2.txt").read_bytes())  # mid-stream
    assert (m1.cpu, m1.gpu) == pytest.approx((0.0440773, 0.0153528))
    assert parse_powermetrics_plist((FIXTURES / "powermetrics-plist.3.txt").read_bytes()).cpu == pytest.approx(0.102663)
    with pytest.raises(ValueError, match="not a powermetrics plist"):
        parse_powermetrics_plist(b"<plist><dict></dict></plist>")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_plist_pattern_reads_what_plistlib_reads(n):
    data = (FIXTURES / f"powermetrics-plist.{n}.txt").read_bytes()
    processor = plistlib.loads(data)["processor"]
    reading = parse_powermetrics_plist(data)
    assert (reading.cpu, reading.gpu, reading.ane) == (processor["cpu_power"] / 1000, processor["gpu_power"] / 1000,
                                                       processor["ane_power"] / 1000)  # fmt: skip


@pytest.mark.parametrize("name, cpu, gpu, ane, dram", [
    ("powermetrics-default-samplers.1.txt", 0.954, 0.028, 0.0, None),
    ("powermetrics-cpu_power-gpu_power.1.txt", 0.041, 0.002, 0.0, None),
    ("powermetrics-cpu_power-gpu_power.2.txt", 8.916, 9.462, 0.0, None),
    ("powermetrics-cpu_power-thermal.1.txt", 2.889, 0.001, 0.0, None),
    ("powermetrics-cpu_power.1.txt", 23.639, 0.109, 0.0, 2.545),  # macOS 13 beta: DRAM and Package lines
])  # fmt: skip
def test_powermetrics_text_of_every_recorded_sample(name, cpu, gpu, ane, dram):
    reading = parse_powermetrics_text(recorded(name))
    assert reading.watts() == pytest.approx({"system": None, "cpu": cpu, "gpu": gpu, "ane": ane, "dram": dram})


def test_powermetrics_text_without_power_lines_is_an_error():
    with pytest.raises(ValueError, match="CPU Power"):
        parse_powermetrics_text("*** Sampled system activity ***\n")


# --- IOReport ------------------------------------------------------------------------------------


def test_ioreport_channels_are_summed_by_domain_as_macmon_does():
    # channel names of an M1 Ultra (SOURCES.md, ioreport notes): two dies, two ANEs, two DRAMs
    deltas = [
        ("Energy Model", "DIE_0_CPU Energy", "mJ", 3000.0),
        ("Energy Model", "DIE_1_CPU Energy", "mJ", 1000.0),
        ("Energy Model", "GPU Energy", "nJ", 10e9),
        ("Energy Model", "GPU0_0", "mJ", 9000.0),  # a part of the GPU: not counted twice
        ("Energy Model", "GPU SRAM0_0", "mJ", 500.0),
        ("Energy Model", "ANE0_0", "mJ", 100.0),
        ("Energy Model", "ANE0_1", "mJ", 100.0),
        ("Energy Model", "DRAM0_0", "mJ", 1500.0),
        ("Energy Model", "DRAM0_1", "mJ", 500.0),
        ("Energy Model", "PCIe Port 0 Energy", "uJ", 7e6),
        ("CPU Stats", "DIE_0_PCPU1_CPU0", "24Mticks", 5e6),  # another group
    ]
    reading = ioreport_reading(deltas, seconds=2.0)
    assert reading.watts() == pytest.approx({"system": None, "cpu": 2.0, "gpu": 5.0, "ane": 0.1, "dram": 1.0})
    assert ioreport_domain("Energy Model", "CPU Energy") == "cpu"  # plain, Pro and Max chips
    assert ioreport_domain("Energy Model", "DRAM") == "dram"  # A18 Pro
    assert ioreport_reading([("Energy Model", "ISP", "mJ", 5.0)], 1.0).watts() == dict.fromkeys(DOMAINS)
    with pytest.raises(ValueError, match="'kJ'"):
        ioreport_reading([("Energy Model", "GPU Energy", "kJ", 1.0)], 1.0)


# --- RAPL on a fake powercap tree ------------------------------------------------------------------


def make_zone(root: Path, zone: str, name: str, energy_uj: int, max_range_uj: int = 262143328850) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def set_energy(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    """A client Intel chip: one package with core, uncore (its GPU) and dram, and psys."""
    return {
        "package": make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, max_range_uj=5_000_000),
        "core": make_zone(tmp_path, "intel-rapl:0:0", "core", 500_000),
        "uncore": make_zone(tmp_path, "intel-rapl:0:1", "uncore", 0),
        "dram": make_zone(tmp_path, "intel-rapl:0:2", "dram", 0),
        "psys": make_zone(tmp_path, "intel-rapl:1", "psys", 0),
        "mmio": make_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0),  # the same package again
    }


def test_rapl_watts_are_energy_differences_over_time_by_domain(powercap, tmp_path):
    source = RaplSource(tmp_path)
    assert source.why_not == "" and len(source.zones) == 4  # core and the mmio twin left out
    assert source.sample(now=10.0) is None  # no interval yet
    set_energy(powercap["package"], 4_000_000)  # 3 J in 2 s
    set_energy(powercap["core"], 9_000_000)  # inside the package: not counted again
    set_energy(powercap["uncore"], 1_000_000)
    set_energy(powercap["dram"], 2_000_000)
    set_energy(powercap["psys"], 40_000_000)
    reading = source.sample(now=12.0)
    assert reading.source == "rapl"
    assert reading.watts() == pytest.approx({"system": 20.0, "cpu": 1.5, "gpu": 0.5, "ane": None, "dram": 1.0})


def test_rapl_counts_a_wrapped_counter_from_its_range():
    assert energy_delta_uj(4_900_000, 100_000, 5_000_000) == 200_000
    assert energy_delta_uj(100, 300, 5_000_000) == 200


def test_rapl_across_a_wrap_and_two_packages(tmp_path):
    first = make_zone(tmp_path, "intel-rapl:0", "package-0", 4_000_000, max_range_uj=5_000_000)
    second = make_zone(tmp_path, "intel-rapl:1", "package-1", 0)
    source = RaplSource(tmp_path)
    source.sample(now=0.0)
    set_energy(first, 1_000_000)  # wrapped: 1 J to the top, 1 J after it
    set_energy(second, 3_000_000)
    reading = source.sample(now=1.0)
    assert reading.cpu == pytest.approx(5.0) and reading.system is None  # a package is not the machine


def test_rapl_drops_a_domain_when_one_of_its_zones_could_not_be_read(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    broken = make_zone(tmp_path, "intel-rapl:1", "package-1", 0)
    make_zone(tmp_path, "intel-rapl:2", "psys", 0)
    source = RaplSource(tmp_path)
    source.sample(now=0.0)
    (broken / "energy_uj").write_text("not a number\n")
    reading = source.sample(now=1.0)
    assert reading.cpu is None and reading.system == 0.0  # half the packages is no CPU figure


def test_rapl_unreadable_or_missing_says_why(tmp_path, monkeypatch):
    why = f"power is not readable here: this kernel has no RAPL counters ({tmp_path}/intel-rapl:*)"
    assert find_zones(tmp_path) == ([], why)
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    read_text = Path.read_text

    def root_only(path: Path, *args, **kwargs) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")  # this test may run as root
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", root_only)
    zones, why = find_zones(tmp_path)
    assert zones == [] and "CVE-2020-8694" in why and "root" in why


# --- choosing a source ---------------------------------------------------------------------------


def test_the_source_is_the_best_the_machine_has(tmp_path):
    mac = power_source("darwin", euid=501, which=lambda name: "/opt/homebrew/bin/macmon")
    assert mac.name == "macmon" and mac.args == ["/opt/homebrew/bin/macmon", "pipe", "--interval", "1000"]
    root_mac = power_source("darwin", euid=0, which=lambda name: None)
    assert root_mac.name == "powermetrics" and root_mac.args[:3] == ["powermetrics", "--samplers", "cpu_power,gpu_power"]
    nothing = power_source("darwin", euid=501, which=lambda name: None)
    assert isinstance(nothing, NoPower) and "brew install macmon" in nothing.why_not
    assert nothing.sample(now=1.0) is None
    no_rapl = power_source("linux", powercap_root=tmp_path)
    assert isinstance(no_rapl, NoPower) and "no RAPL counters" in no_rapl.why_not
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    assert isinstance(power_source("linux", powercap_root=tmp_path), RaplSource)
    assert "freebsd" in power_source("freebsd14").why_not


# --- a tool's stream, for real with a stand-in tool --------------------------------------------------


def stand_in(tmp_path: Path, payload: bytes, then_sleep: float) -> list[str]:
    """A tool that prints `payload` at once, then lives `then_sleep` seconds more."""
    data = tmp_path / "payload"
    data.write_bytes(payload)
    script = (f"import sys, time; sys.stdout.buffer.write(open({str(data)!r}, 'rb').read()); "
              f"sys.stdout.flush(); time.sleep({then_sleep})")  # fmt: skip
    return [sys.executable, "-c", script]


def wait_for_reading(source: StreamSource, now: float) -> PowerReading:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reading = source.sample(now)
        if reading is not None:
            return reading
        time.sleep(0.02)
    raise AssertionError(f"no reading from the stand-in tool ({source.why_not})")


def test_a_macmon_stream_gives_its_newest_line_and_says_when_the_tool_stopped(tmp_path):
    lines = recorded("macmon-pipe.3.txt").encode()
    source = StreamSource("macmon", stand_in(tmp_path, lines, 0.5), b"\n", parse_macmon_line)
    try:
        assert wait_for_reading(source, now=0.0) == parse_macmon_line(lines.splitlines()[1])
        deadline = time.monotonic() + 10
        while source.sample(now=0.1) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stopped (exit status 0)" in source.why_not
    finally:
        source.close()


def test_a_stream_that_went_quiet_gives_no_reading(tmp_path):
    line = recorded("macmon-pipe.1.txt").encode()
    source = StreamSource("macmon", stand_in(tmp_path, line, 60), b"\n", parse_macmon_line)
    try:
        assert wait_for_reading(source, now=100.0).system == 9.391488075256348
        assert source.sample(now=100.0 + STALE_AFTER_S) is not None
        assert source.sample(now=100.0 + STALE_AFTER_S + 0.1) is None
    finally:
        source.close()
    assert source._process is None


def test_a_powermetrics_stream_splits_its_plists_at_nul(tmp_path):
    payload = ((FIXTURES / "powermetrics-plist.3.txt").read_bytes() + b"\0"
               + (FIXTURES / "powermetrics-plist.1.txt").read_bytes() + b"\0")  # fmt: skip
    source = StreamSource("powermetrics", stand_in(tmp_path, payload, 60), b"\0", parse_powermetrics_plist)
    try:
        first = wait_for_reading(source, now=0.0)  # the M1's, or the Ultra's if both came at once
        assert first.gpu in (pytest.approx(0.0190117), pytest.approx(70.9246))
        deadline = time.monotonic() + 10
        while source.sample(now=0.0).gpu != pytest.approx(70.9246) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert source.sample(now=0.0).gpu == pytest.approx(70.9246)  # the newest of the two
    finally:
        source.close()


def test_a_tool_that_cannot_start_says_so(tmp_path):
    source = StreamSource("macmon", [str(tmp_path / "macmon"), "pipe"], b"\n", parse_macmon_line)
    assert source.sample(now=0.0) is None and "No such file" in source.why_not

