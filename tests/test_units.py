import pytest

from tbmesh.core.units import format_bandwidth, format_bytes, parse_bandwidth, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1234", 1234),
        ("9.6GB", 9_600_000_000),
        ("512GiB", 512 * 2**30),
        ("512 gib", 512 * 2**30),
        ("1kb", 1000),
        ("1KiB", 1024),
        ("2MB", 2_000_000),
        ("2MiB", 2 * 2**20),
        ("1.5TB", 1_500_000_000_000),
        ("3TiB", 3 * 2**40),
        ("64G", 64 * 10**9),
        ("100B", 100),
        (" 7 GB ", 7 * 10**9),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "-3GB", "1.5", "5GX", "1Gi", "1 gigabyte", "1e9"])
def test_parse_size_rejects_bad_input_with_one_line(text):
    with pytest.raises(ValueError) as error:
        parse_size(text)
    assert "\n" not in str(error.value) and repr(text) in str(error.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("80Gbps", 10e9),
        ("80Gbit/s", 10e9),
        ("80 Gb/s", 10e9),
        ("5gbit", 625e6),
        ("10GB/s", 10e9),
        ("10 GBps", 10e9),
        ("1GiB/s", 2**30),
        ("100Mbps", 12.5e6),
        ("40gbps", 5e9),
        ("12345", 12345),
    ],
)
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "fast", "80G", "80 Gbq", "1ibit", "-5Gbps"])
def test_parse_bandwidth_rejects_bad_input_with_one_line(text):
    with pytest.raises(ValueError) as error:
        parse_bandwidth(text)
    assert "\n" not in str(error.value)


def test_format_bytes():
    assert format_bytes(132_400_000_000) == "132.4 GB"
    assert format_bytes(999) == "999 B"
    assert format_bytes(1500) == "1.5 KB"
    assert format_bytes(658e9) == "658.0 GB"
    assert format_bytes(2.5e12) == "2.5 TB"


def test_format_bandwidth_in_bits():
    assert format_bandwidth(10e9) == "80.0 Gb/s"
    assert format_bandwidth(125e6) == "1.0 Gb/s"
    assert format_bandwidth(parse_bandwidth("40Gbps")) == "40.0 Gb/s"
