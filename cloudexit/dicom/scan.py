"""A fast structural walk of a DICOM header, for verifying downloads.

`migrate` must confirm that every downloaded DICOM object parses and carries the SOP Instance
UID the inventory recorded. pydicom does that in about a millisecond per object, which is half
of the whole per-object budget when thousands of objects a second arrive. This walker reads the
data elements up to Pixel Data with `struct` only (about 50 µs for a CT header): it follows the
transfer syntax, walks into sequences of undefined length, checks that every element fits in the
object and that Pixel Data's declared length fits in the object's size, and collects the UIDs.

Whatever it does not handle (big endian, deflated datasets, a UN of undefined length, anything
odd) it reports as undecided, and the caller falls back to pydicom (`cloudexit.dicom.classify`),
so the walker can make verification faster but never more lenient.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_FALLBACK_SYNTAXES = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN",
             b"SV", b"UV"}
_VALID_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                          b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                          b"US"}
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_WANTED = {0x00080016: "sop_class_uid", 0x00080018: "sop_uid", 0x0020000D: "study_uid",
           0x0020000E: "series_uid"}
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_TAG = struct.Struct("<HH").unpack_from


@dataclass
class Scan:
    """What the walk found. `decided` False: ask pydicom. `need_more`: read more bytes first."""

    decided: bool = True
    need_more: bool = False
    kind: str = "dicom"  # dicom | unreadable | other
    reason: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    transfer_syntax: str | None = None
    values: dict[str, str] | None = None  # the extra elements asked for (`scan(..., extra=)`)
    pixel_at: int | None = None  # where the Pixel Data value starts, when it was reached


class _NeedMore(Exception):
    pass


class _Undecided(Exception):
    pass


class _Broken(Exception):
    pass


def scan(data: bytes | bytearray | memoryview, size: int,
         extra: dict[int, str] | None = None) -> Scan:
    """Walk the header in `data` (the first bytes of an object of `size` bytes).

    `extra`: more top-level elements to collect ({tag: name}), as ASCII text in `Scan.values`
    (non-ASCII bytes come out as U+FFFD: a caller needing them decoded asks pydicom).
    """
    buf = bytes(data) if not isinstance(data, bytes) else data
    n = len(buf)
    whole = n >= size
    try:
        pos, ts = _meta(buf, n)
        if ts in _FALLBACK_SYNTAXES:
            raise _Undecided
        if ts is None:  # no file meta: guess the encoding like pydicom does
            if pos + 6 > n:
                raise _NeedMore
            explicit = buf[pos + 4:pos + 6] in _VALID_VRS
            ts = "1.2.840.10008.1.2.1" if explicit else IMPLICIT_VR_LE
        explicit = ts != IMPLICIT_VR_LE
        found: dict[str, str] = {}
        wanted = {**_WANTED, **extra} if extra else _WANTED
        pixel = _walk(buf, pos, n, size, explicit, 0, found, wanted)
    except _NeedMore:
        if whole:
            return Scan(decided=False)
        return Scan(need_more=True)
    except (_Undecided, _Broken):
        return Scan(decided=False)  # anything unusual: pydicom judges, as the inventory did
    values = {name: found.pop(name, "") for name in extra.values()} if extra else None
    result = Scan(transfer_syntax=ts, values=values, pixel_at=pixel[0] if pixel else None, **found)
    if pixel is not None and pixel[1] != _UNDEFINED and pixel[0] + pixel[1] > size:
        result.kind = "unreadable"
        result.reason = (f"truncated: pixel data declares {pixel[1]} bytes, "
                         f"object holds {max(size - pixel[0], 0)}")
    elif pixel is None and not whole:
        return Scan(need_more=True)
    if not result.sop_uid:
        return Scan(decided=False)  # pydicom gives the precise reason
    return result


def _meta(buf: bytes, n: int) -> tuple[int, str | None]:
    """Skip the preamble and file meta group; return (dataset start, transfer syntax UID)."""
    if n >= 132 and buf[128:132] == b"DICM":
        pos, ts = 132, None
        while True:
            if pos + 8 > n:
                raise _NeedMore
            group, elem = _TAG(buf, pos)
            if group != 0x0002:
                return pos, ts
            length, start = _explicit(buf, pos, n)[1:]
            if length == _UNDEFINED:
                raise _Undecided
            if start + length > n:
                raise _NeedMore
            if elem == 0x0010:
                ts = buf[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
            pos = start + length
    if n < 8:
        raise _NeedMore
    group = _U16(buf, 0)[0]
    if group not in (0x0002, 0x0008):
        raise _Undecided  # not obviously DICOM: pydicom (and the inventory) decide
    return 0, None


def _explicit(buf: bytes, pos: int, n: int) -> tuple[bytes, int, int]:
    """An explicit-VR element at `pos`: (VR, value length, value start)."""
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > n:
            raise _NeedMore
        return vr, _U32(buf, pos + 8)[0], pos + 12
    if vr in _VALID_VRS:
        return vr, _U16(buf, pos + 6)[0], pos + 8
    raise _Undecided  # odd VR: pydicom knows more tricks


def _walk(buf: bytes, pos: int, n: int, size: int, explicit: bool, depth: int,
          found: dict[str, str], wanted: dict[int, str] = _WANTED) -> tuple[int, int] | None:
    """Walk elements from `pos`. At depth 0 stop at Pixel Data and return (value start, length);
    inside an item (depth > 0) stop at the item delimiter and return (position after it, 0)."""
    while True:
        if pos == n and depth == 0 and n >= size:
            return None  # a dataset without pixel data, read to its end
        if pos + 8 > n:
            raise _NeedMore
        group, elem = _TAG(buf, pos)
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            if depth == 0:
                raise _Broken("item delimiter outside a sequence")
            return pos + 8, 0
        if group == 0xFFFE:
            raise _Broken(f"unexpected delimiter ({group:04X},{elem:04X})")
        if explicit:
            vr, length, start = _explicit(buf, pos, n)
        else:
            vr = b""
            length, start = _U32(buf, pos + 4)[0], pos + 8
        if depth == 0 and tag in _PIXEL_TAGS:
            return start, length
        if length == _UNDEFINED:
            if explicit and vr != b"SQ":
                raise _Undecided  # UN / OB of undefined length
            pos = _sequence(buf, start, n, size, explicit, depth, found)
            continue
        end = start + length
        if end > size:
            raise _Broken(f"element ({group:04X},{elem:04X}) runs past the end of the object")
        if depth == 0 and tag in wanted:
            if end > n:
                raise _NeedMore
            value = buf[start:end].rstrip(b"\x00 ").decode("ascii", "replace").strip()
            found[wanted[tag]] = value
        elif explicit and vr == b"SQ":
            if end > n:
                raise _NeedMore
            _defined_sequence(buf, start, end, size, explicit, depth, found)
        pos = end


def _sequence(buf: bytes, pos: int, n: int, size: int, explicit: bool, depth: int,
              found: dict[str, str]) -> int:
    """Skip a sequence of undefined length; return the position after its delimiter."""
    if depth > 32:
        raise _Broken("sequences nested too deep")
    while True:
        if pos + 8 > n:
            raise _NeedMore
        group, elem = _TAG(buf, pos)
        tag = (group << 16) | elem
        length = _U32(buf, pos + 4)[0]
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise _Broken(f"expected an item in a sequence, found ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            pos = _walk(buf, pos + 8, n, size, explicit, depth + 1, {})[0]  # type: ignore[index]
        else:
            pos = pos + 8 + length
            if pos > size:
                raise _Broken("sequence item runs past the end of the object")


def _defined_sequence(buf: bytes, pos: int, end: int, size: int, explicit: bool, depth: int,
                      found: dict[str, str]) -> None:
    """Check the items of a defined-length sequence stay inside it."""
    while pos < end:
        if pos + 8 > end:
            raise _Broken("sequence item header runs past the sequence")
        group, elem = _TAG(buf, pos)
        tag = (group << 16) | elem
        length = _U32(buf, pos + 4)[0]
        if tag != _ITEM:
            raise _Broken(f"expected an item in a sequence, found ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            pos = _walk(buf, pos + 8, end, size, explicit, depth + 1, {})[0]  # type: ignore[index]
        else:
            pos += 8 + length
    if pos != end:
        raise _Broken("sequence items overrun the sequence length")
