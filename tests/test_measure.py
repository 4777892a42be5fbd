"""What a node reports about itself: Mac sources parsed from recorded outputs, Linux for real."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import psutil
import pytest
from recorded import recorded

from tbmesh.net.system import CommandError
from tbmesh.node import measure
from tbmesh.node.measure import (
    GiB,
    Memory,
    MiB,
    chip_name,
    hash_identity,
    machine_identity,
    measure_flops,
    memory,
    memory_bandwidth,
    parse_cpuinfo_model,
    parse_device_info,
    parse_ioreg_platform_uuid,
    parse_sysctl,
    usable_linux,
    usable_macos,
)


def device_info(n: int) -> dict:
    return parse_device_info(recorded(f"mlx-metal-device_info.{n}.txt"))


@pytest.fixture(autouse=True)
def no_memory_env(monkeypatch):
    monkeypatch.delenv(measure.MEMORY_USABLE_ENV, raising=False)
    monkeypatch.delenv(measure.MEMORY_TOTAL_ENV, raising=False)


# --- memory --------------------------------------------------------------------------


def test_device_info_reprs_parse_whatever_the_key_order_or_wrapping():
    assert device_info(1) == {"max_recommended_working_set_size": 188743680000,
                              "max_buffer_length": 115964116992, "architecture": "applegpu_g14d"}
    assert device_info(2)["device_name"] == "Apple M4 Pro"
    assert device_info(3)["memory_size"] == 128 * GiB
    assert device_info(4) == {"resource_limit": 499000, "max_buffer_length": 8589934592,
                              "architecture": "applegpu_g13g", "memory_size": 16 * GiB,
                              "max_recommended_working_set_size": 11453251584, "device_name": "Apple M1"}
    with pytest.raises(ValueError):
        parse_device_info("metal_device=[1, 2]")


def test_usable_on_a_mac_is_the_smaller_of_metal_and_three_quarters():
    m1 = device_info(4)  # 16 GB: Metal recommends 67%, below our 75% share
    assert usable_macos(m1["memory_size"], m1, None) == 11453251584
    m4 = device_info(2)  # 48 GB: Metal recommends 78%
    assert usable_macos(m4["memory_size"], m4, 0) == 36 * GiB
    m5 = device_info(3)  # 128 GB: Metal recommends 84%
    assert usable_macos(m5["memory_size"], m5, None) == 96 * GiB
    first = device_info(1)  # the first MLX version had no memory_size: the total comes from psutil
    assert usable_macos(192 * GiB, first, None) == 144 * GiB
    assert usable_macos(64 * GiB, None, None) == 48 * GiB  # no Metal info at all


def test_wired_limit_set_by_the_user_wins():
    assert parse_sysctl(recorded("sysctl-iogpu.wired_limit_mb.1.txt")) == {"iogpu.wired_limit_mb": "0"}
    new = parse_sysctl(recorded("sysctl-w-iogpu.wired_limit_mb.1.txt"))["iogpu.wired_limit_mb"]
    assert new == "26000"
    m1_max = 32 * GiB
    assert usable_macos(m1_max, {"max_recommended_working_set_size": 22906503168}, int(new)) == 26000 * MiB
    assert usable_macos(m1_max, None, 0) == 24 * GiB  # 0 means the system default
    assert usable_macos(m1_max, None, 10**6) == m1_max  # never more than there is


def test_memory_on_a_mac_reads_metal_and_sysctl(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=32 * GiB, available=20 * GiB))
    monkeypatch.setattr(measure, "metal_device_info", lambda: {"max_recommended_working_set_size": 22906503168})
    sysctl = {"0": recorded("sysctl-iogpu.wired_limit_mb.1.txt"),
              "26000": recorded("sysctl-w-iogpu.wired_limit_mb.1.txt")}
    monkeypatch.setattr(measure, "run_command", lambda args: sysctl["0"])
    assert memory(platform="darwin") == Memory(32 * GiB, 22906503168)
    monkeypatch.setattr(measure, "run_command", lambda args: sysctl["26000"])
    assert memory(platform="darwin") == Memory(32 * GiB, 26000 * MiB)

    def no_such_key(args):
        raise CommandError("sysctl: unknown oid 'iogpu.wired_limit_mb'")

    monkeypatch.setattr(measure, "run_command", no_such_key)  # older macOS: no such sysctl
    assert memory(platform="darwin") == Memory(32 * GiB, 22906503168)


def test_usable_on_linux_is_available_minus_a_margin():
    assert usable_linux(64 * GiB, 50 * GiB) == 50 * GiB - int(6.4 * GiB)
    assert usable_linux(4 * GiB, 3 * GiB) == 2 * GiB  # at least 1 GiB of margin
    assert usable_linux(4 * GiB, GiB // 2) == 0


def test_memory_on_this_linux_machine():
    total, usable = memory()
    ram = psutil.virtual_memory()
    assert total == ram.total
    assert 0 < usable < total
    assert abs(usable - usable_linux(ram.total, ram.available)) < 512 * MiB  # available moves a little


def test_memory_overrides_pretend_to_be_another_mac(monkeypatch):
    assert memory(384 * GiB) == Memory(psutil.virtual_memory().total, 384 * GiB)
    assert memory(384 * GiB, 512 * GiB) == Memory(512 * GiB, 384 * GiB)
    monkeypatch.setenv(measure.MEMORY_USABLE_ENV, "96GB")
    monkeypatch.setenv(measure.MEMORY_TOTAL_ENV, "128GiB")
    assert memory() == Memory(128 * GiB, 96 * 10**9)
    assert memory(usable_override=1000) == Memory(128 * GiB, 1000)  # the parameter wins
    monkeypatch.setenv(measure.MEMORY_USABLE_ENV, "lots")
    with pytest.raises(ValueError, match="TBMESH_MEMORY_USABLE"):
        memory()


# --- chip ----------------------------------------------------------------------------


def test_chip_from_recorded_sysctl():
    assert recorded("sysctl-n-machdep.cpu.brand_string.1.txt").strip() == "Apple M3 Ultra"
    early = parse_sysctl(recorded("sysctl-A-machdep.cpu.1.txt"))
    assert early["machdep.cpu.core_count"] == "8"
    # early Apple-silicon macOS said only "Apple processor": Metal's device name says more
    assert chip_name(early["machdep.cpu.brand_string"], device_info(4)) == "Apple M1"
    assert chip_name("Apple processor", device_info(1)) == "Apple processor"  # no device_name
    assert chip_name("Apple M3 Ultra", device_info(2)) == "Apple M3 Ultra"
    model = parse_sysctl(recorded("sysctl-hw.model-hw.memsize.1.txt"))
    assert model == {"hw.model": "Mac14,12", "hw.memsize": "34359738368"}


def test_chip_on_a_mac_runs_sysctl(monkeypatch):
    outputs = {("sysctl", "-n", "machdep.cpu.brand_string"): recorded("sysctl-n-machdep.cpu.brand_string.1.txt"),
               ("sysctl", "hw.model"): recorded("sysctl-hw.model-hw.memsize.1.txt")}
    monkeypatch.setattr(measure, "run_command", lambda args: outputs[tuple(args)])
    monkeypatch.setattr(measure, "metal_device_info", lambda: device_info(2))
    assert measure.chip("darwin") == "Apple M3 Ultra"
    assert measure.hardware_model("darwin") == "Mac14,12"


def test_chip_on_linux():
    assert parse_cpuinfo_model("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n") == \
        "AMD EPYC 9654 96-Core Processor"
    assert parse_cpuinfo_model("processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\n") == "BCM2835"
    assert parse_cpuinfo_model("") == ""
    with open("/proc/cpuinfo") as f:
        expected = parse_cpuinfo_model(f.read())
    if expected:  # some ARM kernels print none of the keys
        assert measure.chip() == expected
    assert measure.chip()


def test_memory_bandwidth_of_the_recorded_chips():
    GB = 1e9
    ultra = recorded("sysctl-n-machdep.cpu.brand_string.1.txt").strip()
    assert memory_bandwidth(ultra, 28) == memory_bandwidth(ultra, 32) == 819 * GB  # both Ultra bins
    assert memory_bandwidth(chip_name("Apple processor", device_info(2)), 14) == 273 * GB  # Metal's "Apple M4 Pro"
    early = parse_sysctl(recorded("sysctl-A-machdep.cpu.1.txt"))
    m1 = chip_name(early["machdep.cpu.brand_string"], device_info(4))
    assert memory_bandwidth(m1, int(early["machdep.cpu.core_count"])) == 68.25 * GB
    assert memory_bandwidth(chip_name("Apple processor", device_info(3)), 18) == 0  # an M5 Max: not in the table
    assert memory_bandwidth("Apple processor") == 0  # no device_name to say which (device_info 1)


def test_memory_bandwidth_of_binned_chips_follows_the_cpu_cores():
    GB = 1e9
    assert memory_bandwidth("Apple M3 Max", 14) == 300 * GB and memory_bandwidth("Apple M3 Max", 16) == 400 * GB
    assert memory_bandwidth("Apple M4 Max", 14) == 410 * GB and memory_bandwidth("Apple M4 Max", 16) == 546 * GB
    assert memory_bandwidth("Apple M4 Max") == 410 * GB  # cores unknown: the lower
    assert memory_bandwidth("Apple M3 Pro", 11) == memory_bandwidth("Apple M3 Pro", 12) == 150 * GB


def test_memory_bandwidth_on_linux_is_unknown():
    assert memory_bandwidth(measure.chip(), 2) == 0
    assert memory_bandwidth("AMD EPYC 9654 96-Core Processor", 96) == 0
    for name, gbs in measure.MEMORY_BANDWIDTH_GBS.items():  # every name as chip() gives it
        assert name.startswith("Apple M") and gbs > 0


# --- compute -------------------------------------------------------------------------


def test_measure_flops_in_a_worker_thread_within_budget():
    start = time.perf_counter()
    flops = asyncio.run(asyncio.wait_for(asyncio.to_thread(measure_flops, 0.2), timeout=5))
    took = time.perf_counter() - start
    assert 1e8 < flops < 1e14  # this slow CPU does a few GFLOP/s; a Mac GPU tens of TFLOP/s
    assert took < 1.0


# --- identity ------------------------------------------------------------------------


def test_ioreg_platform_uuid_from_recording():
    text = recorded("ioreg-rd1-IOPlatformExpertDevice.1.txt")
    assert parse_ioreg_platform_uuid(text) == "1AB2345C-03E4-57D4-A375-1234D48DE123"
    assert parse_ioreg_platform_uuid('"IOPlatformSerialNumber" = "A01BC3QFQ05D"') is None


def test_machine_identity_on_a_mac_is_a_hash_of_the_platform_uuid(monkeypatch):
    monkeypatch.setattr(measure, "run_command", lambda args: recorded("ioreg-rd1-IOPlatformExpertDevice.1.txt"))
    identity = machine_identity("darwin")
    assert identity == hash_identity("1AB2345C-03E4-57D4-A375-1234D48DE123") == machine_identity("darwin")
    assert "1AB2345C" not in identity.upper() and "A01BC3QFQ05D" not in identity.upper()
    assert len(identity) == 32 and int(identity, 16) >= 0


def test_machine_identity_on_linux_comes_from_machine_id(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    two.write_text("0f0e0d0c0b0a09080706050403020100\n")
    monkeypatch.setattr(measure, "LINUX_MACHINE_ID_FILES", (str(tmp_path / "missing"), str(one)))
    first = machine_identity("linux")
    assert first == hash_identity("3d1219c7c4c5404aaa1f6d2a48adfda4") == machine_identity("linux")
    monkeypatch.setattr(measure, "LINUX_MACHINE_ID_FILES", (str(two),))
    assert machine_identity("linux") != first  # a copied state dir on another machine is noticed


def test_machine_identity_without_machine_id_uses_hostname_and_mac(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "LINUX_MACHINE_ID_FILES", (str(tmp_path / "missing"),))
    monkeypatch.setattr(measure.uuid, "getnode", lambda: 0x02FC00000001)
    monkeypatch.setattr(measure.socket, "gethostname", lambda: "studio-1")
    assert measure.raw_machine_identity("linux") == "studio-1 02fc00000001"
    monkeypatch.setattr(measure.uuid, "getnode", lambda: 0x010000000000 | 0x1234)  # random: no MAC
    assert measure.raw_machine_identity("linux") == "studio-1 "
    assert machine_identity("linux") == hash_identity("studio-1 ")


def test_machine_identity_of_this_machine_is_stable():
    assert machine_identity() == machine_identity()
    assert len(machine_identity()) == 32
