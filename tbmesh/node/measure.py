"""What a node reports about itself: memory, chip, compute speed, and which machine it is.

Mac-only sources (sysctl, ioreg, Metal's device info) are read through small parsers that
are tested on recorded outputs; on Linux the counterparts run for real.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from tbmesh.core.units import parse_size
from tbmesh.net.system import CommandError, run_command

MiB = 2**20
GiB = 2**30
# Metal's recommended working set is about 75% of RAM; we never plan beyond that share, so
# macOS and the other processes keep the rest.
MACOS_USABLE_SHARE = 0.75
# Linux (the test machines): what is available now, minus room for everything else.
LINUX_MARGIN_SHARE = 0.10
LINUX_MARGIN_MIN = 1 * GiB
MEMORY_USABLE_ENV = "TBMESH_MEMORY_USABLE"
MEMORY_TOTAL_ENV = "TBMESH_MEMORY_TOTAL"
# Pretend usable memory read from a file at every check, so a test can shrink a running
# node's memory as a Mac's does when `sysctl iogpu.wired_limit_mb` is lowered (bench/chaos.py).
MEMORY_FILE_ENV = "TBMESH_MEMORY_FILE"
MACHINE_ENV = "TBMESH_MACHINE"  # pretend to be another machine (tests, demos of many "Macs")
LINUX_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class Memory(NamedTuple):
    total: int  # bytes of RAM
    usable: int  # bytes a model may take here


# --- memory --------------------------------------------------------------------------


def memory(
    usable_override: int | None = None, total_override: int | None = None, platform: str = sys.platform
) -> Memory:
    """(total, usable) bytes of this machine.

    Overrides, for running many pretend Macs on one test machine: the parameters, else the
    environment variables TBMESH_MEMORY_USABLE and TBMESH_MEMORY_TOTAL ("96GB", "512GiB"), or
    the size written in the file TBMESH_MEMORY_FILE names.
    """
    usable_override = usable_override if usable_override is not None else _env_size(MEMORY_USABLE_ENV)
    usable_override = usable_override if usable_override is not None else _file_size(MEMORY_FILE_ENV)
    total_override = total_override if total_override is not None else _env_size(MEMORY_TOTAL_ENV)
    ram = psutil.virtual_memory()
    total = total_override if total_override is not None else ram.total
    if usable_override is not None:
        return Memory(total, usable_override)
    if platform == "darwin":
        return Memory(total, usable_macos(total, metal_device_info(), wired_limit_mb()))
    return Memory(total, usable_linux(total, ram.available))


def usable_macos(total: int, device_info: dict[str, Any] | None, wired_limit_mb: int | None) -> int:
    """What a model may take on a Mac.

    `sysctl iogpu.wired_limit_mb` set by the user (non-zero) is what the GPU may wire: it
    wins. Otherwise the smaller of Metal's recommended working set and 75% of RAM (the
    recommended set reaches 84% on a 128 GB Mac; we leave the system more room).
    """
    if wired_limit_mb:
        return min(wired_limit_mb * MiB, total)
    cap = int(total * MACOS_USABLE_SHARE)
    recommended = (device_info or {}).get("max_recommended_working_set_size")
    return min(int(recommended), cap) if recommended else cap


def usable_linux(total: int, available: int) -> int:
    """Available memory minus 10% of RAM (at least 1 GiB) for everything else."""
    margin = max(int(total * LINUX_MARGIN_SHARE), LINUX_MARGIN_MIN)
    return max(available - margin, 0)


def parse_device_info(text: str) -> dict[str, Any]:
    """Parse the printed repr of MLX's Metal device info dict (it may wrap over lines)."""
    try:
        info = ast.literal_eval(text.strip())
    except (SyntaxError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise ValueError(f"not a device info dict: {text[:60]!r}")
    return info


def metal_device_info() -> dict[str, Any] | None:
    """MLX's Metal device info, or None without a Metal GPU (Linux)."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    # mx.device_info() replaced mx.metal.device_info() (deprecated in MLX 0.32)
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return dict(info)


def wired_limit_mb() -> int | None:
    """`sysctl iogpu.wired_limit_mb` (0 = the system default), None where it does not exist."""
    try:
        values = parse_sysctl(run_command(["sysctl", "iogpu.wired_limit_mb"]))
    except CommandError:
        return None
    value = values.get("iogpu.wired_limit_mb", "")
    return int(value) if value.isdigit() else None


def _env_size(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _file_size(name: str) -> int | None:
    path = os.environ.get(name, "").strip()
    if not path:
        return None
    try:
        return parse_size(Path(path).read_text().strip())
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None


# --- sysctl --------------------------------------------------------------------------


def parse_sysctl(text: str) -> dict[str, str]:
    """Parse `sysctl name ...` lines ("hw.model: Mac14,12"); the set form "a: old -> new"
    gives the new value."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name and " " not in name:
            values[name] = value.rpartition(" -> ")[2].strip()
    return values


# --- chip ----------------------------------------------------------------------------


def chip(platform: str = sys.platform) -> str:
    """The processor's name: "Apple M3 Ultra" on a Mac, the CPU model name on Linux."""
    if platform == "darwin":
        brand = run_command(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
        return chip_name(brand, metal_device_info())
    if platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                name = parse_cpuinfo_model(f.read())
        except OSError:
            name = ""
        if name:
            return name
    import platform as platform_module

    return platform_module.processor() or platform_module.machine()


def chip_name(brand_string: str, device_info: dict[str, Any] | None) -> str:
    """The brand string, unless it is the generic "Apple processor" that early Apple-silicon
    macOS printed: then Metal's device name ("Apple M1") says more."""
    name = (device_info or {}).get("device_name")
    if brand_string in ("", "Apple processor") and name:
        return str(name)
    return brand_string


# --- memory bandwidth ------------------------------------------------------------------

# Apple's published unified-memory bandwidth of each chip, GB/s: the "memory bandwidth" line of
# the Tech Specs pages of the Macs that carry it (support.apple.com/en-us/docs/mac lists them;
# e.g. "MacBook Pro (14-inch, M4 Pro or M4 Max, 2024) - Tech Specs", "Mac Studio (2025) - Tech
# Specs", "Mac Studio (2022) - Tech Specs", "MacBook Pro (14-inch, Nov 2023) - Tech Specs").
# M1: its Tech Specs give none; 68.25 is its LPDDR4X-4266 on 128 bits, which Apple's "M2: 100GB/s,
# 50 percent more than M1" and "M1 Pro: 200GB/s, nearly 3x M1" (Apple Newsroom) agree with.
# M5: Apple Newsroom, October 2025 (153GB/s). Chips not here (M5 Pro, M5 Max, ...) are unknown (0).
MEMORY_BANDWIDTH_GBS: dict[str, float] = {
    "Apple M1": 68.25, "Apple M1 Pro": 200, "Apple M1 Max": 400, "Apple M1 Ultra": 800,
    "Apple M2": 100, "Apple M2 Pro": 200, "Apple M2 Max": 400, "Apple M2 Ultra": 800,
    "Apple M3": 100, "Apple M3 Pro": 150, "Apple M3 Max": 400, "Apple M3 Ultra": 819,
    "Apple M4": 120, "Apple M4 Pro": 273, "Apple M4 Max": 546,
    "Apple M5": 153,
}
# Two chips come in two bandwidths: M3 Max with a 14-core CPU (and 30-core GPU) has 300GB/s,
# with 16 cores (40-core GPU) 400GB/s; M4 Max with 14 cores (32-core GPU) 410GB/s, with 16
# (40-core GPU) 546GB/s. Apple sells each CPU only with its GPU, so the CPU cores tell them
# apart: at most this many -> the binned figure. Cores unknown: the binned one too (a Mac is
# not credited with bandwidth it may lack; the other Pro/Max/Ultra bins share one figure).
BINNED_BANDWIDTH_GBS: dict[str, tuple[int, float]] = {"Apple M3 Max": (14, 300), "Apple M4 Max": (14, 410)}


def memory_bandwidth(chip: str, cpu_cores: int | None = None) -> float:
    """Bytes/s of memory bandwidth of a chip named as `chip()` names it ("Apple M3 Ultra"),
    from Apple's published figures; 0 (unknown: the planner takes the M3 Ultra it was
    calibrated on) for a chip not in the table, and for every Linux CPU."""
    name = chip.strip()
    gbs = MEMORY_BANDWIDTH_GBS.get(name, 0.0)
    binned = BINNED_BANDWIDTH_GBS.get(name)
    if binned is not None and (cpu_cores is None or cpu_cores <= binned[0]):
        gbs = binned[1]
    return gbs * 1e9


def parse_cpuinfo_model(text: str) -> str:
    """The CPU name from /proc/cpuinfo: "model name" (x86), else "Hardware"/"Model" (ARM)."""
    for key in ("model name", "Hardware", "Model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match[1].strip()
    return ""


def hardware_model(platform: str = sys.platform) -> str:
    """The machine model: "Mac15,14" from `sysctl hw.model`; the DMI product name on Linux."""
    if platform == "darwin":
        return parse_sysctl(run_command(["sysctl", "hw.model"])).get("hw.model", "")
    try:
        with open("/sys/class/dmi/id/product_name", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


# --- compute -------------------------------------------------------------------------


def measure_flops(seconds_budget: float = 0.5) -> float:
    """FLOP/s of a square matmul: float16 on a Metal GPU, float32 on a CPU.

    Blocking; the daemon runs it in a worker thread. Matrix sizes are picked so one product
    takes milliseconds (4096 on a GPU, 256 on the slow reference BLAS of MLX's Linux wheel);
    after one warm-up product they are repeated for about half the budget.
    """
    import mlx.core as mx

    if mx.metal.is_available():
        device, dtype, n = mx.gpu, mx.float16, 4096
    else:
        device, dtype, n = mx.cpu, mx.float32, 256
    # A stream created in this thread: MLX streams are thread-local since 0.31.2. They are
    # cleared before the thread goes back to its pool: MLX 0.32 aborts the process at exit
    # now and then when a thread that used it still has streams (ml-explore/mlx#3126).
    stream = mx.new_stream(device)
    try:
        a = mx.random.normal((n, n), dtype=dtype, stream=stream)
        b = mx.random.normal((n, n), dtype=dtype, stream=stream)
        mx.eval(mx.matmul(a, b, stream=stream))  # warm-up: allocation, kernel compilation
        count = 0
        start = time.perf_counter()
        while True:
            mx.eval(mx.matmul(a, b, stream=stream))
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds_budget / 2:
                return 2 * n**3 * count / elapsed
    finally:
        del stream
        mx.clear_streams()


# --- identity ------------------------------------------------------------------------


def machine_identity(platform: str = sys.platform) -> str:
    """A stable id of this physical machine, hashed so no serial or UUID leaks.

    A state dir copied to another Mac keeps its node id; comparing this id tells the daemon
    it now runs elsewhere and needs a new node id.
    """
    return hash_identity(os.environ.get(MACHINE_ENV) or raw_machine_identity(platform))


def hash_identity(raw: str) -> str:
    return hashlib.sha256(b"tbmesh machine\0" + raw.encode()).hexdigest()[:32]


def raw_machine_identity(platform: str = sys.platform) -> str:
    """macOS: the IOPlatformUUID; Linux: /etc/machine-id; else the hostname and a MAC."""
    if platform == "darwin":
        try:
            found = parse_ioreg_platform_uuid(run_command(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"]))
        except CommandError:
            found = None
        if found:
            return found
    if platform.startswith("linux"):
        for path in LINUX_MACHINE_ID_FILES:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text:
                return text
    node = uuid.getnode()
    # getnode() makes up a random number (multicast bit set) when it finds no MAC
    mac = "" if node >> 40 & 1 else f"{node:012x}"
    return f"{socket.gethostname()} {mac}"


def parse_ioreg_platform_uuid(text: str) -> str | None:
    """The IOPlatformUUID from `ioreg -rd1 -c IOPlatformExpertDevice`."""
    match = re.search(r'"IOPlatformUUID"\s*=\s*"([0-9A-Fa-f-]+)"', text)
    return match[1] if match else None
