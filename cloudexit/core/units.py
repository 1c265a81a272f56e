"""Sizes, rates and durations, parsed so that nobody pays for a misread unit.

Rates must say bits or bytes: ``200Mbit/s`` (also ``200Mbps``) or ``25MB/s``; binary byte units
``512KiB/s``; ``off`` (or ``unlimited``) means no limit and parses to None; ``0`` pauses.
``200M`` or ``25Mb/s`` are refused because people write both for megabits and megabytes, and
the two differ eightfold.

rclone's ``--bwlimit`` has its own convention, which the bandwidth timetable accepts with
``bare_unit="MiB"``: a suffix letter means binary bytes per second (``20M`` = 20 MiB/s,
``512k`` = 512 KiB/s) and a number with no suffix means KiB/s (``512`` = 512 KiB/s). Rates with
an explicit unit still mean what they say in that mode.

Decimal prefixes (k, M, G, T, P) are powers of 1000 and binary ones (Ki, Mi, Gi, Ti, Pi) powers
of 1024, as in IEC 80000-13.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from cloudexit.core.errors import UsageError

_DECIMAL = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
# rclone's SizeSuffix letters, all binary and case-insensitive (B = bytes).
_RCLONE = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}

_NUMBER = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
_RATE = re.compile(
    _NUMBER + r"\s*(?P<prefix>Ki|Mi|Gi|Ti|Pi|[kKMGTP]?)(?P<unit>bit/s|bps|b/s|B/s|Bps|Byte/s|)$"
)
_RCLONE_RATE = re.compile(_NUMBER + r"(?P<suffix>[bBkKmMgGtTpP]?)$")
_SIZE = re.compile(_NUMBER + r"\s*(?P<prefix>Ki|Mi|Gi|Ti|Pi|[kKMGTP]?)(?P<unit>B|b|)$")

OFF_WORDS = ("off", "unlimited", "none")
PAUSE_WORDS = ("pause", "paused")


def parse_rate(text: str, bare_unit: str | None = None, *, limit: bool = True) -> float | None:
    """Parse a transfer rate into bytes per second; None means unlimited, 0.0 means paused.

    ``limit=False`` reads a link's speed (plan --bandwidth), where off and 0 mean nothing.

    With ``bare_unit=None`` the unit must say bits or bytes. With ``bare_unit="MiB"`` rclone's
    ``--bwlimit`` reading also applies (``20M`` = 20 MiB/s, bare ``512`` = 512 KiB/s).
    """
    if bare_unit not in (None, "MiB"):
        raise ValueError(f"bare_unit must be None or 'MiB', not {bare_unit!r}")
    raw = text.strip()
    word = raw.lower()
    example = "200Mbit/s, 25MB/s, 512KiB/s" + (", or off" if limit else "")
    if not limit and (word in OFF_WORDS or word in PAUSE_WORDS or _is_zero(raw)):
        raise UsageError(f"{text!r} is not a link speed",
                         hint=f"write it with a unit, e.g. {example}; 0 and off are timetable "
                              "values, for --schedule / --bwlimit")
    if word in OFF_WORDS:
        return None
    if word in PAUSE_WORDS:
        return 0.0
    if bare_unit == "MiB":
        match = _RCLONE_RATE.match(raw)
        if match:
            suffix = match["suffix"].lower()
            # rclone reads a number without suffix as KiB/s.
            factor = _RCLONE[suffix] if suffix else 2**10
            return float(match["num"]) * factor
    match = _RATE.match(raw)
    if not match:
        raise UsageError(
            f"cannot read rate {text!r}",
            hint=f"write it with a unit, e.g. {example}",
        )
    value = float(match["num"])
    prefix, unit = match["prefix"], match["unit"]
    if value == 0:
        return 0.0  # zero is zero in any unit
    if unit in ("", "b/s"):
        # A bare number is almost always meant in mega (a link of 200 bit/s is not plausible).
        shown = f"{match['num']}{prefix or 'M'}"
        raise UsageError(
            f"ambiguous rate {text!r}: write {shown}bit/s or {shown}B/s",
            hint="bits and bytes differ eightfold; cloudexit does not guess which one you meant",
        )
    factor = _BINARY[prefix] if prefix in _BINARY else _DECIMAL[prefix]
    if unit in ("bit/s", "bps"):
        return value * factor / 8
    return value * factor


def _is_zero(raw: str) -> bool:
    match = _RATE.match(raw)
    return match is not None and float(match["num"]) == 0


def parse_size(text: str) -> int:
    """Parse a size into bytes: ``10TB`` (decimal), ``10TiB`` (binary) or a plain byte count.

    ``10T`` is refused (TB or TiB differ by 10%), and so is ``10Tb`` (bits are not a size).
    """
    raw = text.strip()
    match = _SIZE.match(raw)
    if not match:
        raise UsageError(f"cannot read size {text!r}", hint="write e.g. 10TB, 500GiB or 123456")
    value = float(match["num"])
    prefix, unit = match["prefix"], match["unit"]
    shown = f"{match['num']}{prefix}"
    if unit == "b":
        raise UsageError(f"ambiguous size {text!r}: write {shown}B for bytes")
    if unit == "" and prefix:
        suggestion = f"{shown}B or {match['num']}{prefix.upper()}iB"
        raise UsageError(f"ambiguous size {text!r}: write {suggestion}")
    factor = _BINARY[prefix] if prefix in _BINARY else _DECIMAL[prefix]
    return int(round(value * factor))


def format_bytes(count: float, binary: bool = False) -> str:
    """``12.3 TB`` style, decimal by default (cloud bills and disk vendors count in 1000s)."""
    step = 1024.0 if binary else 1000.0
    names = (
        ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] if binary else ["B", "kB", "MB", "GB", "TB", "PB"]
    )
    value = float(count)
    for name in names:
        if abs(value) < step or name == names[-1]:
            if name == "B":
                return f"{int(round(value))} B"
            return f"{value:.1f} {name}"
        value /= step
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float | None) -> str:
    """A rate in both bits and bytes, so nobody has to convert: ``200 Mbit/s (25.0 MB/s)``."""
    if bytes_per_second is None:
        return "unlimited"
    if bytes_per_second == 0:
        return "paused"
    bits = bytes_per_second * 8
    for name, factor in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= factor:
            return f"{bits / factor:.3g} {name} ({format_bytes(bytes_per_second)}/s)"
    return f"{bits:.3g} bit/s ({format_bytes(bytes_per_second)}/s)"


def format_duration(seconds: float) -> str:
    """Short human duration: ``45 s``, ``12 min``, ``3 h 20 min``, ``4 d 6 h``."""
    if math.isinf(seconds):
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    hours = int(minutes // 60)
    if hours < 24:
        rest = int(round(minutes - hours * 60))
        if rest == 60:
            hours, rest = hours + 1, 0
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    days = int(hours // 24)
    rest_hours = int(round((seconds - days * 86400) / 3600))
    if rest_hours == 24:
        days, rest_hours = days + 1, 0
    return f"{days} d {rest_hours} h" if rest_hours else f"{days} d"


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """`7d`, `36h`, `90m`, `2w`, `30s`, `40ms` -> timedelta; a bare number is refused (which unit?)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhdw])\s*", text or "")
    if not match:
        raise UsageError(f"cannot read duration {text!r}", hint="write it like 7d, 36h, 90m or 2w")
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2)])
