"""Units: rates and sizes must say bits or bytes; rclone's bare letters only where asked."""

import pytest

from cloudexit.core.errors import UsageError
from cloudexit.core.units import format_bytes, format_duration, format_rate, parse_rate, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("200Mbit/s", 25_000_000),
        ("200Mbps", 25_000_000),
        ("25MB/s", 25_000_000),
        ("1Gbit/s", 125_000_000),
        ("512KiB/s", 512 * 1024),
        ("1.5 Gbit/s", 187_500_000),
        ("0", 0.0),
        ("pause", 0.0),
    ],
)
def test_parse_rate_with_units(text, expected):
    assert parse_rate(text) == pytest.approx(expected)


def test_off_means_unlimited():
    assert parse_rate("off") is None
    assert parse_rate("OFF") is None


def test_bare_megabytes_or_megabits_is_refused_with_what_to_write():
    with pytest.raises(UsageError) as caught:
        parse_rate("200M")
    assert "write 200Mbit/s or 200MB/s" in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_bare_number_suggests_a_plausible_unit():
    with pytest.raises(UsageError) as caught:
        parse_rate("200")
    assert "write 200Mbit/s or 200MB/s" in str(caught.value)


@pytest.mark.parametrize("text", ["off", "0", "0Mbit/s", "pause", "fast"])
def test_a_link_speed_is_never_offered_off_and_then_refused(text):
    with pytest.raises(UsageError) as caught:
        parse_rate(text, limit=False)
    # The hint for --bandwidth names only values --bandwidth takes.
    assert "or off" not in (caught.value.hint or "")
    assert parse_rate("200Mbit/s", limit=False) == 25e6


@pytest.mark.parametrize("text", ["25Mb/s", "200", "1G"])
def test_other_ambiguous_rates_are_refused(text):
    with pytest.raises(UsageError, match="ambiguous"):
        parse_rate(text)


def test_garbage_rate_is_refused():
    with pytest.raises(UsageError, match="cannot read rate"):
        parse_rate("fast")


def test_rclone_reading_is_binary_bytes_and_bare_numbers_are_kib():
    assert parse_rate("20M", bare_unit="MiB") == 20 * 2**20
    assert parse_rate("512k", bare_unit="MiB") == 512 * 1024
    assert parse_rate("512", bare_unit="MiB") == 512 * 1024
    assert parse_rate("1G", bare_unit="MiB") == 2**30
    # An explicit unit still means what it says.
    assert parse_rate("50Mbit/s", bare_unit="MiB") == 6_250_000
    assert parse_rate("off", bare_unit="MiB") is None


def test_parse_size():
    assert parse_size("10TB") == 10 * 10**12
    assert parse_size("10TiB") == 10 * 2**40
    assert parse_size("500 GB") == 500 * 10**9
    assert parse_size("123") == 123


def test_ambiguous_sizes_are_refused():
    with pytest.raises(UsageError, match="write 10TB or 10TiB"):
        parse_size("10T")
    with pytest.raises(UsageError, match="10TB"):
        parse_size("10Tb")


def test_format_bytes_and_rate():
    assert format_bytes(12 * 10**12) == "12.0 TB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(2**30, binary=True) == "1.0 GiB"
    assert format_rate(25_000_000) == "200 Mbit/s (25.0 MB/s)"
    assert format_rate(None) == "unlimited"


def test_format_duration():
    assert format_duration(45) == "45 s"
    assert format_duration(12 * 60) == "12 min"
    assert format_duration(3 * 3600 + 20 * 60) == "3 h 20 min"
    assert format_duration(4 * 86400 + 6 * 3600) == "4 d 6 h"
    assert format_duration(float("inf")) == "never"
