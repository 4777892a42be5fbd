"""Sizes and bandwidths as people type them, and back.

Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB ... TiB) powers of 1024,
as on macOS and in Thunderbolt's "80 Gb/s". Sizes are bytes, bandwidths bytes per second.
"""

from __future__ import annotations

import re

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(.*?)\s*")
# size units, case-insensitive: "", b, k, kb, kib, ...
_SIZE_UNIT = re.compile(r"([kmgt]?)(i?)(b?)", re.IGNORECASE)
# bandwidth units: prefix, optional binary "i", bit/bits/byte/bytes/b/B, optional per second
_RATE_UNIT = re.compile(r"([kmgt]?)(i?)(bits?|bytes?|b)(/s|ps)?", re.IGNORECASE)


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    match = _NUMBER.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"bad {what} {text!r}: expected a number and a unit, e.g. {example}")
    return float(match.group(1)), match.group(2)


def _scale(prefix: str, binary: str) -> int:
    return _BINARY[prefix.lower()] if binary else _DECIMAL[prefix.lower()]


def parse_size(text: str) -> int:
    """"9.6GB" -> 9_600_000_000, "512GiB" -> 512 * 2**30, "1234" -> 1234 bytes."""
    value, unit = _split(text, "size", "512GB, 9.6GiB or 1234")
    match = _SIZE_UNIT.fullmatch(unit)
    # "i" needs a prefix (GiB), and a bare prefix with "i" needs the "B" (Gi alone is unclear)
    if not match or (match.group(2) and not (match.group(1) and match.group(3))):
        raise ValueError(f"bad size {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB ... TiB)")
    prefix, binary, _ = match.groups()
    if not prefix and value != int(value):
        raise ValueError(f"bad size {text!r}: a count of bytes must be whole")
    return int(round(value * _scale(prefix, binary)))


def parse_bandwidth(text: str) -> float:
    """"80Gbps", "80Gbit/s", "5gbit" are bits (divided by 8); "10GB/s" is bytes. -> bytes/s.

    A lower-case "b" alone means bits and an upper-case "B" bytes, as usual; a plain number
    is bytes per second.
    """
    value, unit = _split(text, "bandwidth", "80Gbps, 80Gbit/s or 10GB/s")
    if unit == "":
        return value
    match = _RATE_UNIT.fullmatch(unit)
    if not match or (match.group(2) and not match.group(1)):
        raise ValueError(
            f"bad bandwidth {text!r}: unknown unit {unit!r} (use Gbps, Gbit/s or Gb/s for bits, GB/s for bytes)"
        )
    prefix, binary, word, _ = match.groups()
    is_bytes = word == "B" or word.lower().startswith("byte")
    return value * _scale(prefix, binary) / (1 if is_bytes else 8)


def format_bytes(n: float) -> str:
    """132_400_000_000 -> "132.4 GB" (decimal units, one decimal)."""
    return _format(n, "B", ("KB", "MB", "GB", "TB"))


def format_bandwidth(bytes_per_s: float) -> str:
    """In bits per second, the way links are sold: 10e9 bytes/s -> "80.0 Gb/s"."""
    return _format(bytes_per_s * 8, "b/s", ("Kb/s", "Mb/s", "Gb/s", "Tb/s"))


def _format(n: float, base: str, units: tuple[str, ...]) -> str:
    if abs(n) < 1000:
        return f"{n:.0f} {base}"
    for unit in units:
        n /= 1000
        if abs(n) < 1000 or unit == units[-1]:
            break
    return f"{n:.1f} {unit}"
