"""Object keys are untrusted input: flag the dangerous ones and map keys to safe local paths."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import PurePosixPath

MAX_SEGMENT_BYTES = 255
MAX_KEY_BYTES = 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
# Control characters, C1 controls too, and the Unicode bidirectional controls (embeddings,
# overrides, isolates: U+202A-202E, U+2066-2069), which make a name display in another order
# than it is ("scan\u202egpj.exe" shows as "scanexe.jpg").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def key_flags(key: str) -> list[str]:
    """Why this key is unsafe to use as a path as it is (empty list: it is safe)."""
    # The common case first, in a few C-level string checks (the listing calls this per key):
    # printable ASCII, short, no backslash, no empty or dot-led segment, no drive letter.
    if (key.isascii() and key.isprintable() and 0 < len(key) <= MAX_SEGMENT_BYTES
            and "\\" not in key and "//" not in key and "/." not in key
            and key[0] not in "/." and key[1:2] != ":"):
        return []
    flags = []
    segments = key.split("/")
    if any(s in ("..", ".") for s in segments) or any(s in ("..", ".") for s in key.split("\\")):
        flags.append("dot-segment")
    if key.startswith(("/", "\\")) or _DRIVE.match(key):
        flags.append("absolute")
    if "\\" in key:
        flags.append("backslash")
    if _CONTROL.search(key):
        flags.append("control-char")
    if "" in segments[:-1] or key == "":
        flags.append("empty-segment")
    if len(key.encode()) > MAX_KEY_BYTES or any(len(s.encode()) > MAX_SEGMENT_BYTES for s in segments):
        flags.append("too-long")
    return flags


def safe_relative_path(key: str) -> PurePosixPath:
    """A relative path for `key` that cannot leave the directory it is joined to.

    Unsafe segments are rewritten (never dropped, so two keys stay two paths): `..`
    becomes `%2E%2E`, backslashes, control characters and bidirectional controls are escaped
    (their UTF-8 bytes as %XX), drive letters lose their colon, and over-long segments are
    shortened with a hash suffix.
    """
    # '%' is escaped first so that the mapping stays one-to-one (a key that already looks
    # escaped cannot collide with an escaped one).
    text = key.replace("%", "%25").replace("\\", "%5C")
    # Escaped as URL encoding does: each UTF-8 byte as %XX (U+202E -> %E2%80%AE).
    text = _CONTROL.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)
    parts = []
    for segment in text.split("/"):
        if segment in ("", "."):
            segment = "%2E" if segment == "." else "%2F"
        elif segment == "..":
            segment = "%2E%2E"
        segment = segment.replace(":", "%3A")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            digest = hashlib.sha256(segment.encode()).hexdigest()[:16]
            segment = segment.encode()[:200].decode(errors="ignore") + "~" + digest
        parts.append(segment)
    return PurePosixPath(*parts)


_YEAR, _MONTH, _DAY = re.compile(r"(19|20)\d\d$"), re.compile(r"(0?[1-9]|1[0-2])$"), re.compile(r"\d\d?$")
_YMD = re.compile(r"((?:19|20)\d\d)-?(\d\d)-?(\d\d)$")


def folder_dates(folder: str) -> tuple[dt.date, dt.date] | None:
    """The days a dated folder covers, [first, after last), from the first date in its path:
    `YYYY/`, `YYYY/MM/`, `YYYY/MM/DD/`, `YYYYMMDD/` or `YYYY-MM-DD/` (None: no date in it)."""
    parts = [p for p in folder.split("/") if p]
    for i, part in enumerate(parts):
        match = _YMD.match(part)
        if match:
            try:
                day = dt.date(*map(int, match.groups()))
            except ValueError:
                continue
            return day, day + dt.timedelta(days=1)
        if not _YEAR.match(part):
            continue
        year = int(part)
        if i + 1 >= len(parts) or not _MONTH.match(parts[i + 1]):
            return dt.date(year, 1, 1), dt.date(year + 1, 1, 1)
        month = int(parts[i + 1])
        after_month = dt.date(year + month // 12, month % 12 + 1, 1)
        if i + 2 >= len(parts) or not _DAY.match(parts[i + 2]):
            return dt.date(year, month, 1), after_month
        try:
            day = dt.date(year, month, int(parts[i + 2]))
        except ValueError:
            return dt.date(year, month, 1), after_month
        return day, day + dt.timedelta(days=1)
    return None
