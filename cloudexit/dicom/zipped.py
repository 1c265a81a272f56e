"""Zipped studies: a zip archive of DICOM files (one per study or series, as teleradiology and
vendor archives keep them), read where it lies.

The inventory never downloads a zip: `read_directory` takes the end of central directory (and
the zip64 records) with one ranged GET from the end of the object, then the central directory
with another, and refuses a hostile archive with one reason (unsafe or duplicate member names,
encrypted members, a zip bomb, overlapping members, a damaged directory). `inspect_members` reads
each member's local header and first bytes (ranged GETs through a small window, so small members
share requests) and classifies the member like any object. The migrate workers fetch each member's
bytes (its local header and data) with one ranged GET, and `extract_member` inflates them into the
plain file, checking the local header against the directory, the member's CRC-32 and its declared
size, with the output never allowed past the declared size.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cloudexit.core.files import new_output
from cloudexit.dicom.header import Header, classify

Read = Callable[[int, int], bytes]  # (start, end exclusive) -> bytes of the object

STORED, DEFLATED = 0, 8
MAX_MEMBERS = 1_000_000  # entries a directory may hold (a study has thousands at most)
MAX_DIRECTORY = 256 * 2**20  # bytes of central directory read (about 2 million entries)
MAX_MEMBER = 64 * 2**30  # declared size of one member (a large multi-frame is a few GiB)
MAX_TOTAL = 4 * 2**40  # declared size of all members together
MAX_RATIO = 1100  # deflate cannot do better than 1032:1; more is a declared size that lies
WINDOW = 16 * 1024  # bytes read per ranged GET when inspecting members (small members share it)
MEMBER_FIRST = 8 * 1024  # a member's first bytes read for its header (grown x4 when longer)
MAX_INFLATE = 8 * 2**20  # decoded bytes inflated at most to read one member's header
CHUNK = 2**20
_EOCD, _EOCD64, _LOCATOR = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_CENTRAL, _LOCAL = b"PK\x01\x02", b"PK\x03\x04"
_MEDIA_DIRECTORY = re.compile(rb"1\.2\.840\.10008\.1\.3\.10(?![0-9.])")  # SOP Class of a DICOMDIR
_TAIL = 22 + 65535 + 20  # end record with the longest comment, and the zip64 locator before it
_SHORT_TAIL = 64 * 1024  # the first read from the end: the end records and most directories
_KEPT = ("nothing is unpacked; the archive is kept as stored in _quarantine/unreadable/ "
         "(check it, unzip it with a trusted tool and upload its DICOM files to migrate them)")
_METHODS = {1: "shrink", 6: "implode", 9: "deflate64", 12: "bzip2", 14: "LZMA", 93: "zstd",
            95: "xz", 98: "PPMd", 99: "AES encryption"}


class ZipProblem(Exception):
    """The archive cannot be unpacked safely: one clear reason, the zip kept as stored."""


class ExtractError(Exception):
    """A member's bytes do not decode to what the directory declares."""


@dataclass
class Member:
    """One file in the archive, as the central directory declares it."""

    name: str
    offset: int  # of its local header in the object
    csize: int  # compressed bytes
    usize: int  # uncompressed bytes
    crc: int  # CRC-32 of the uncompressed bytes
    method: int
    data: int | None = None  # offset of its data (after the local header), once read
    nlen: int = 0  # bytes of its name as stored (the least its local header takes after 30)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Member:
        return cls(**value)

    @property
    def end(self) -> int:
        """The end (exclusive) of its bytes in the object, once `data` is known."""
        assert self.data is not None
        return self.data + self.csize


def member_key(zip_key: str, name: str) -> str:
    """The key a member is recorded under: the zip's key, `!/`, the member's name (as a jar URL
    names a file in a jar)."""
    return f"{zip_key}!/{name}"


# -- the central directory ------------------------------------------------------------------------
def read_directory(read: Read, size: int) -> tuple[list[Member], int]:
    """The archive's files (folders left out), in directory order, and where the central
    directory starts (no member's bytes go past it). Raises ZipProblem."""
    # A short tail first (an archive comment is rare), the longest possible one if that fails.
    for length in (_SHORT_TAIL, _TAIL):
        tail_start = max(0, size - length)
        tail = read(tail_start, size)
        at = tail.rfind(_EOCD)
        while at >= 0 and len(tail) - at < 22:
            at = tail.rfind(_EOCD, 0, at)
        if at >= 0 or tail_start == 0:
            break
    if at < 0:
        raise ZipProblem("zip archive without its end of central directory (truncated or not a "
                         f"whole zip); {_KEPT}")
    (_sig, disk, cd_disk, _here, entries, cd_size, cd_offset, _comment) = struct.unpack_from(
        "<4s4H2LH", tail, at)
    eocd = tail_start + at
    directory_end = eocd
    if disk or cd_disk:
        raise ZipProblem(f"zip archive split across several files (a multi-part zip); {_KEPT}")
    if 0xFFFF in (entries,) or 0xFFFFFFFF in (cd_size, cd_offset) or (
            at >= 20 and tail[at - 20:at - 16] == _LOCATOR):
        entries, cd_size, cd_offset, directory_end = _zip64_end(read, tail, tail_start, at)
    if entries > MAX_MEMBERS:
        raise ZipProblem(f"zip archive declares {entries} members (more than {MAX_MEMBERS}); {_KEPT}")
    if cd_size > MAX_DIRECTORY:
        raise ZipProblem(f"zip archive with a {cd_size}-byte central directory (more than "
                         f"{MAX_DIRECTORY}); {_KEPT}")
    # Bytes before the archive (a self-extracting stub, a prefix): its offsets count from there.
    shift = directory_end - cd_offset - cd_size
    if shift < 0 or cd_offset + shift < 0:
        raise ZipProblem(f"zip archive whose central directory lies outside the object (truncated); {_KEPT}")
    start = cd_offset + shift
    # The directory is often inside the tail read already.
    directory = (tail[start - tail_start:start - tail_start + cd_size] if start >= tail_start
                 else read(start, start + cd_size))
    if len(directory) != cd_size:
        raise ZipProblem(f"zip archive whose central directory is cut short; {_KEPT}")
    members = _parse_directory(directory, entries, shift)
    _check(members, start)
    return members, start


def _zip64_end(read: Read, tail: bytes, tail_start: int, at: int) -> tuple[int, int, int, int]:
    if at < 20 or tail[at - 20:at - 16] != _LOCATOR:
        raise ZipProblem(f"zip64 archive without its zip64 locator (truncated or damaged); {_KEPT}")
    _sig, disk, record, _disks = struct.unpack_from("<4sLQL", tail, at - 20)
    if disk:
        raise ZipProblem(f"zip archive split across several files (a multi-part zip); {_KEPT}")
    end = tail_start + at - 20
    if record + 56 > end:
        raise ZipProblem(f"zip64 archive whose end record lies outside the object; {_KEPT}")
    # The record may sit before the tail read so far (a long zip64 extensible data sector).
    data = tail[record - tail_start:] if record >= tail_start else read(record, record + 56)
    if data[:4] != _EOCD64:
        # Bytes before the archive shift the record too: look for it just before the locator.
        guess = end - 56
        data = tail[guess - tail_start:] if guess >= tail_start else read(guess, guess + 56)
        if data[:4] != _EOCD64:
            raise ZipProblem(f"zip64 archive whose end record is missing or damaged; {_KEPT}")
        record = guess
    (_sig, _size, _made, _need, disk, cd_disk, _here, entries, cd_size, cd_offset) = struct.unpack_from(
        "<4sQ2H2L4Q", data)
    if disk or cd_disk:
        raise ZipProblem(f"zip archive split across several files (a multi-part zip); {_KEPT}")
    return entries, cd_size, cd_offset, record


def _parse_directory(data: bytes, entries: int, shift: int) -> list[Member]:
    members: list[Member] = []
    pos = count = 0
    seen: set[str] = set()
    while pos < len(data):
        if data[pos:pos + 4] != _CENTRAL or pos + 46 > len(data):
            raise ZipProblem(f"zip archive whose central directory is damaged at entry {count + 1}; {_KEPT}")
        (_sig, _made, _need, flags, method, _time, _date, crc, csize, usize, nlen, xlen, clen,
         disk, _iattr, _eattr, offset) = struct.unpack_from("<4s6H3L5HLL", data, pos)
        raw_name = data[pos + 46:pos + 46 + nlen]
        extra = data[pos + 46 + nlen:pos + 46 + nlen + xlen]
        pos += 46 + nlen + xlen + clen
        count += 1
        if pos > len(data):
            raise ZipProblem(f"zip archive whose central directory is damaged at entry {count}; {_KEPT}")
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        usize, csize, offset, disk = _zip64_extra(extra, usize, csize, offset, disk)
        if disk:
            raise ZipProblem(f"zip archive split across several files (a multi-part zip); {_KEPT}")
        _check_name(name)
        if name in seen:
            raise ZipProblem(f"zip archive with two members named {name!r} (which one is meant "
                             f"cannot be told); {_KEPT}")
        seen.add(name)
        if name.endswith("/"):
            continue  # a folder entry
        if flags & 0x1 or method == 99:
            raise ZipProblem(f"zip archive with encrypted members ({name!r}): they cannot be read "
                             f"without the password; {_KEPT}")
        if method not in (STORED, DEFLATED):
            label = _METHODS.get(method, f"method {method}")
            raise ZipProblem(f"zip archive with members compressed by {label} ({name!r}), which "
                             f"this version does not decode; {_KEPT}")
        members.append(Member(name, offset + shift, csize, usize, crc, method, nlen=nlen))
    if count != entries:
        raise ZipProblem(f"zip archive whose central directory holds {count} entries, its end "
                         f"record declares {entries} (truncated or damaged); {_KEPT}")
    return members


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int, disk: int) -> tuple[int, int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            body, at = extra[pos + 4:pos + 4 + length], 0
            values = []
            for field_value, width in ((usize, 8), (csize, 8), (offset, 8), (disk, 4)):
                full = 0xFFFFFFFF if width == 8 else 0xFFFF
                if field_value == full and at + width <= len(body):
                    values.append(int.from_bytes(body[at:at + width], "little"))
                    at += width
                else:
                    values.append(field_value)
            return values[0], values[1], values[2], values[3]
        pos += 4 + length
    return usize, csize, offset, disk


def _check_name(name: str) -> None:
    """Refuse a name that would leave its folder when unpacked (what `unzip` warns about)."""
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or ".." in parts or "\x00" in name
            or (len(name) > 1 and name[1] == ":" and name[0].isalpha())):
        raise ZipProblem(f"zip archive with an unsafe member name ({name!r}: a path that leaves "
                         f"the folder it is unpacked in); {_KEPT}")


def _check(members: list[Member], directory_start: int) -> None:
    """Zip bombs and damage: declared sizes past the caps or past deflate's best ratio,
    members that overlap (the trick that multiplies one compressed stream) or run into the
    directory."""
    total = 0
    for m in members:
        if m.usize > MAX_MEMBER:
            raise ZipProblem(f"zip archive with a member ({m.name!r}) declaring {m.usize} bytes "
                             f"(more than the {MAX_MEMBER}-byte cap): a zip bomb, or damaged; {_KEPT}")
        if m.method == STORED and m.usize != m.csize:
            raise ZipProblem(f"zip archive with a stored member ({m.name!r}) whose sizes disagree "
                             f"(damaged); {_KEPT}")
        if m.usize > m.csize * MAX_RATIO + 4096:
            raise ZipProblem(f"zip archive with a member ({m.name!r}) declaring {m.usize} bytes "
                             f"from {m.csize} (past deflate's best ratio): a zip bomb; {_KEPT}")
        total += m.usize
    if total > MAX_TOTAL:
        raise ZipProblem(f"zip archive declaring {total} bytes in all (more than the "
                         f"{MAX_TOTAL}-byte cap): a zip bomb, or damaged; {_KEPT}")
    ordered = sorted(members, key=lambda m: m.offset)
    for m, after in zip(ordered, ordered[1:] + [None]):
        limit = after.offset if after is not None else directory_start
        if m.offset < 0 or m.offset + 30 + m.nlen + m.csize > limit:
            what = (f"overlaps {after.name!r}" if after is not None
                    else "runs into the central directory")
            raise ZipProblem(f"zip archive whose member {m.name!r} {what} (a zip bomb's trick, "
                             f"or damage); {_KEPT}")


# -- the members' headers (inventory) -------------------------------------------------------------
class Window:
    """Ranged reads through a window of at least WINDOW bytes: the members of a zip of small
    files share GETs. `limit`: reads never go past it (the central directory's start)."""

    def __init__(self, read: Read, limit: int, first: bytes = b"") -> None:
        self.read, self.limit = read, limit
        self.start, self.data = 0, first
        self.requests = 0
        self.bytes = 0

    def get(self, start: int, end: int) -> bytes:
        end = min(end, self.limit)
        if not (self.start <= start and end <= self.start + len(self.data)):
            self.data = self.read(start, min(max(end, start + WINDOW), self.limit))
            self.start = start
            self.requests += 1
            self.bytes += len(self.data)
        return self.data[start - self.start:end - self.start]


def _local_header(window: Window, m: Member) -> int:
    """Check the member's local header against the directory; returns where its data starts."""
    fixed = window.get(m.offset, m.offset + 30)
    if len(fixed) < 30 or fixed[:4] != _LOCAL:
        raise ExtractError(f"member {m.name!r}: no local header at offset {m.offset} (damaged zip)")
    nlen, xlen = struct.unpack_from("<HH", fixed, 26)
    if struct.unpack_from("<H", fixed, 6)[0] & 0x1:
        raise ExtractError(f"member {m.name!r} is encrypted (its local header says so)")
    return m.offset + 30 + nlen + xlen


def member_header(window: Window, m: Member, first: int, most: int) -> Header:
    """Classify one member from its first bytes (`first` compressed bytes, grown to `most`)."""
    try:
        m.data = _local_header(window, m)
    except ExtractError as exc:
        return Header("unreadable", encoding="zip", plain_size=m.usize, reason=str(exc))
    want = min(first, m.csize)
    while True:
        body = window.get(m.data, m.data + want)
        if m.method == STORED:
            plain, problem = body, None
        else:
            plain, problem = _inflate_start(body)
        if problem:
            return Header("unreadable", encoding="zip", plain_size=m.usize,
                          reason=f"zip member {m.name!r}: the deflate stream is corrupt ({problem})")
        header = classify(plain, m.usize)
        if not header.need_more or want >= m.csize or want >= most or len(plain) >= MAX_INFLATE:
            break
        want = min(want * 4, m.csize, most)
    header.encoding, header.plain_size = "zip", m.usize
    if header.kind != "dicom" and _MEDIA_DIRECTORY.search(plain[:1024]):
        # The media's index (a zipped CD/DVD export keeps it): not an instance, nor damage.
        return Header("other", encoding="zip", plain_size=m.usize, reason=(
            f"zip member {m.name!r}: a DICOMDIR (the index of the files beside it), not an instance"))
    if header.need_more:
        header.kind, header.need_more = "unreadable", False
        header.reason = f"zip member {m.name!r}: {header.reason} (gave up after {want} bytes)"
    elif header.kind != "dicom" and header.reason:
        header.reason = f"zip member {m.name!r}: {header.reason}"
    return header


def _inflate_start(body: bytes) -> tuple[bytes, str | None]:
    try:
        return zlib.decompressobj(-15).decompress(body, MAX_INFLATE), None
    except zlib.error as exc:
        return b"", str(exc)


def summary(members: list[Member], headers: list[Header]) -> str:
    dicom = sum(1 for h in headers if h.kind == "dicom")
    other = len(headers) - dicom
    return (f"zip archive of {len(members)} files: {dicom} DICOM instances recorded as members"
            + (f", {other} other files" if other else "")
            + " (unpacked by migrate; the zip itself is kept only with --keep-containers)")


# -- extraction (migrate workers) -----------------------------------------------------------------
@dataclass
class Extracted:
    size: int
    sha256: str  # of the plain file
    head: bytes
    raw_sha256: str  # of the member's bytes as fetched (local header and data)


def extract_member(raw_path: str, m: Member, out_path: str, fsync: bool = True) -> Extracted:
    """Decode the member's bytes as fetched (`raw_path`: its local header and data) into
    `out_path` (created 0600): the local header must be the directory's member, the output
    stops at the declared size (a lying directory cannot make it grow), and the CRC-32 and
    size must match. Memory stays at a few MiB. Raises ExtractError."""
    plain_digest, raw_digest = hashlib.sha256(), hashlib.sha256()
    head = bytearray()
    written, crc = 0, 0
    with new_output(out_path, fsync) as fd:
        with open(raw_path, "rb") as raw:
            fixed = raw.read(30)
            raw_digest.update(fixed)
            if len(fixed) < 30 or fixed[:4] != _LOCAL:
                raise ExtractError(f"zip member {m.name!r}: no local header where the directory "
                                   "points (damaged zip)")
            flags, method = struct.unpack_from("<HH", fixed, 6)
            nlen, xlen = struct.unpack_from("<HH", fixed, 26)
            rest = raw.read(nlen + xlen)
            raw_digest.update(rest)
            if flags & 0x1:
                raise ExtractError(f"zip member {m.name!r} is encrypted (its local header says so)")
            if method != m.method or 30 + nlen + xlen != (m.data or 0) - m.offset:
                raise ExtractError(f"zip member {m.name!r}: its local header disagrees with the "
                                   "central directory (damaged zip)")
            inflater = zlib.decompressobj(-15) if m.method == DEFLATED else None
            left = m.csize
            while left > 0:
                data = raw.read(min(CHUNK, left))
                if not data:
                    raise ExtractError(f"zip member {m.name!r}: cut short after {m.csize - left} "
                                       f"of {m.csize} bytes")
                left -= len(data)
                raw_digest.update(data)
                pending = data
                while pending:
                    if inflater is None:
                        out, pending = pending, b""
                    else:
                        try:
                            # At most one byte past the declared size: enough to catch a lie.
                            out = inflater.decompress(pending, max(1, min(CHUNK, m.usize + 1 - written)))
                        except zlib.error as exc:
                            raise ExtractError(f"zip member {m.name!r}: the deflate stream is "
                                               f"corrupt after {written} bytes ({exc})") from None
                        pending = inflater.unconsumed_tail
                    if written + len(out) > m.usize:
                        raise ExtractError(f"zip member {m.name!r} decodes to more than the "
                                           f"{m.usize} bytes declared (a zip bomb, or damaged)")
                    if out:
                        _write(fd, out)
                        written += len(out)
                        crc = zlib.crc32(out, crc)
                        plain_digest.update(out)
                        if len(head) < 65536:
                            head += out[:65536 - len(head)]
                    if inflater is not None and (inflater.eof or not out):
                        break
            if inflater is not None and not inflater.eof:
                raise ExtractError(f"zip member {m.name!r}: the deflate stream is cut short "
                                   f"after {written} bytes")
        if written != m.usize:
            raise ExtractError(f"zip member {m.name!r}: declares {m.usize} bytes, decodes to {written}")
        if crc != m.crc:
            raise ExtractError(f"zip member {m.name!r}: CRC-32 mismatch (the directory says "
                               f"{m.crc:08x}, the data gives {crc:08x}): damaged in the zip")
    return Extracted(written, plain_digest.hexdigest(), bytes(head), raw_digest.hexdigest())


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    done = os.write(fd, view)
    while done < len(view):
        done += os.write(fd, view[done:])


def file_crc(path: str) -> tuple[int, int]:
    """(CRC-32, size) of a file already in the archive (a member placed before a crash)."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


# -- the inventory's entry point ------------------------------------------------------------------
@dataclass
class Inspected:
    """What the inventory learned of a zip: its own row's header, and its members'."""

    header: Header
    members: list[tuple[Member, Header]]
    requests: int = 0
    bytes: int = 0


def inspect_zip(read: Read, size: int, first: bytes, header_bytes: int, max_header_bytes: int) -> Inspected:
    """Read a zip's directory and its members' headers with ranged reads (`read`), starting
    from the `first` bytes of the object already read. A hostile or damaged archive gives one
    `unreadable` header with its reason, and no members. The object's ETag is the caller's
    If-Match on every read, so a zip that changes meanwhile raises the caller's error."""
    counted = [0, 0]

    def counting(start: int, end: int) -> bytes:
        if end <= start:
            return b""
        if end <= len(first):
            return first[start:end]
        data = read(start, end)
        counted[0] += 1
        counted[1] += len(data)
        return data

    try:
        members, directory_start = read_directory(counting, size)
    except ZipProblem as exc:
        return Inspected(Header("unreadable", encoding="zip", reason=str(exc)), [], *counted)
    except (struct.error, ValueError, IndexError) as exc:  # records cut or garbled past our checks
        return Inspected(Header("unreadable", encoding="zip", reason=(
            f"zip archive whose end records or directory are damaged ({exc}); {_KEPT}")), [], *counted)
    window = Window(counting, directory_start, first)
    first_bytes = min(header_bytes, MEMBER_FIRST)
    headers = [(m, member_header(window, m, first_bytes, max_header_bytes)) for m in members]
    header = Header("other", encoding="zip", plain_size=sum(m.usize for m in members),
                    reason=summary(members, [h for _, h in headers]))
    return Inspected(header, headers, *counted)
