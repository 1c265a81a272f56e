"""Object keys are untrusted input: flag the dangerous ones and map keys to safe local paths."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

MAX_SEGMENT_BYTES = 255
MAX_KEY_BYTES = 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def key_flags(key: str) -> list[str]:
    """Why this key is unsafe to use as a path as it is (empty list: it is safe)."""
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
    becomes `%2E%2E`, backslashes and control characters are escaped, drive letters lose their
    colon, and over-long segments are shortened with a hash suffix.
    """
    # '%' is escaped first so that the mapping stays one-to-one (a key that already looks
    # escaped cannot collide with an escaped one).
    text = key.replace("%", "%25").replace("\\", "%5C")
    text = _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", text)
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
