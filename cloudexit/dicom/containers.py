"""Objects a PACS wrote in an envelope: recognised by content, classified, and decoded.

Orthanc (`"StorageCompression": true`, its object-storage plugins, its filesystem storage copied
up) writes every attachment as an 8-byte little-endian uncompressed size followed by a zlib
stream; newer plugins add `.cmp` to the key and older ones do not, so the key suffix proves
nothing and the bytes decide. Beside each instance Orthanc keeps "DICOM until pixel data" (the
header alone, `.dcm.head`) and may keep DICOM-as-JSON (`.json`): metadata for Orthanc's index,
neither instances nor conflicts (`pacs_metadata`). Its optional storage encryption (AES-GCM,
"A1" + key id + wrapped keys) cannot be read without the key, and is said so per object.
gzip'd files (`.dcm.gz`, or gzip without the suffix) are the other single-file envelope.

The inventory calls `classify_object` on the ranged header bytes (the zlib stream is inflated
incrementally, never more than a few MiB); the migrate workers call `decode_file` on the raw
object once its ETag/MD5/CRC checked out, streaming into the plain DICOM file.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from cloudexit.core.files import new_output
from cloudexit.dicom.header import Header, classify

ORTHANC_ZLIB = "orthanc-zlib"
GZIP = "gzip"
ORTHANC_ENCRYPTED = "orthanc-encrypted"
ZIP = "zip"
ENCODINGS = {ORTHANC_ZLIB: "Orthanc zlib attachment (8-byte size + zlib)", GZIP: "gzip",
             ORTHANC_ENCRYPTED: "Orthanc storage encryption", ZIP: "zip archive"}
UNTIL_PIXEL_DATA = "orthanc-dicom-until-pixel-data"
DICOM_AS_JSON = "orthanc-dicom-as-json"
METADATA = {UNTIL_PIXEL_DATA: "Orthanc's header-only copy of an instance (\"DICOM until pixel data\")",
            DICOM_AS_JSON: "Orthanc's DICOM-as-JSON summary of an instance"}
ZIP_NOT_READ = "zip archive whose files were not read"  # the next inventory round reads them
MAX_INFLATE = 8 * 2**20  # decoded bytes the inventory inflates at most to read a header
CHUNK = 2**20  # streaming decode: raw bytes read and decoded bytes produced per step
_HEAD = 64 * 1024  # decoded bytes kept for the DICOM check
_ENCRYPTED_OVERHEAD = 2 + 4 + 32 + 32 + 16  # "A1", master key id, IV, data key, GCM tag
_ORTHANC_JSON = re.compile(rb'^\s*\{\s*"[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}"\s*:')
_ROWS = {0x00280010: "rows"}


@dataclass
class Decoded:
    """What `decode_file` wrote: the plain file's size and SHA-256, and its first bytes."""

    size: int
    sha256: str
    head: bytes
    checks: list[str] = field(default_factory=list)


class DecodeError(Exception):
    """The raw object is whole (its checksums passed) but its envelope is broken."""


def sniff(data: bytes) -> str | None:
    """The envelope these first bytes are in, or None (plain, or nothing we know)."""
    if len(data) >= 10 and _zlib_header(data[8], data[9]):
        declared = struct.unpack_from("<Q", data)[0]
        if 0 < declared < 2**48:
            return ORTHANC_ZLIB
    if data[:3] == b"\x1f\x8b\x08":
        return GZIP
    if data[:4] == b"PK\x03\x04":
        return ZIP
    if len(data) >= _ENCRYPTED_OVERHEAD and data[:2] == b"A1" and _random_looking(data[6:262]):
        return ORTHANC_ENCRYPTED
    return None


def _zlib_header(cmf: int, flg: int) -> bool:
    # deflate, window <= 32 KiB, check bits right, no preset dictionary (Orthanc never sets one)
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf * 256 + flg) % 31 == 0 and not flg & 0x20


def _random_looking(sample: bytes) -> bool:
    """Ciphertext: nearly every byte value appears (text and DICOM headers use a few dozen)."""
    return len(set(sample)) >= min(len(sample) // 2, 150)


def classify_object(key: str, data: bytes, size: int) -> Header:
    """`dicom.classify`, through an envelope when the bytes are in one.

    `data`: the object's first bytes, `size`: the whole object's size. The Header says the
    envelope (`encoding`), the decoded size when known (`plain_size`) and, for Orthanc's own
    metadata attachments, what they are (`pacs_metadata`)."""
    encoding = sniff(data) if size else None
    if encoding is None:
        header = classify(data, size)
        if header.kind == "other" and len(data) >= size and _ORTHANC_JSON.match(data[:64]):
            header.pacs_metadata, header.reason = DICOM_AS_JSON, METADATA[DICOM_AS_JSON]
        return header
    if encoding == ZIP:
        return Header("unreadable", encoding=encoding, reason=_zip_reason(data, size))
    if encoding == ORTHANC_ENCRYPTED:
        key_id = data[2:6].hex()
        return Header("unreadable", encoding=encoding, reason=(
            f"encrypted by Orthanc's storage encryption (master key id {key_id}): cannot be read "
            "without the key; decrypt it with Orthanc (or its plugin's key) before migrating"))
    whole = len(data) >= size
    if encoding == ORTHANC_ZLIB:
        declared = struct.unpack_from("<Q", data)[0]
        inflater, body, label = zlib.decompressobj(), data[8:], "Orthanc-compressed attachment"
    else:
        declared, inflater, body, label = None, zlib.decompressobj(31), data, "gzip file"
    try:
        plain = inflater.decompress(body, MAX_INFLATE)
    except zlib.error as exc:
        return Header("unreadable", encoding=encoding,
                      reason=f"{label}: the compressed stream is corrupt ({exc})")
    ended = inflater.eof
    if ended:
        declared = declared if declared is not None else len(plain)
        if len(plain) != declared:
            return Header("unreadable", encoding=encoding, plain_size=declared, reason=(
                f"{label}: declares {declared} bytes, decodes to {len(plain)}"))
    elif whole and not inflater.unconsumed_tail:
        return Header("unreadable", encoding=encoding, plain_size=declared, reason=(
            f"{label}: the compressed stream is cut short (truncated object: {len(plain)} "
            f"bytes decoded{'' if declared is None else f' of {declared} declared'})"))
    # Not ended: the rest of the stream is unread (or beyond MAX_INFLATE); classify what we have
    # against the declared size (gzip: unknown until the end, so "larger than what we have").
    plain_size = declared if declared is not None else (len(plain) if ended else 2**62)
    header = classify(plain, plain_size)
    header.encoding, header.plain_size = encoding, declared
    if header.need_more and (len(plain) >= MAX_INFLATE or whole):
        header.need_more = False
        header.reason = f"{label}: {header.reason} after {len(plain)} decoded bytes"
        return header
    if header.need_more:
        return header
    if header.kind == "dicom" and header.header_length is None and ended and (
            key.endswith((".head", ".head.cmp")) or scan_rows(plain, len(plain))):
        # A whole image dataset without Pixel Data: Orthanc's header copy of an instance.
        return Header("other", encoding=encoding, plain_size=declared,
                      pacs_metadata=UNTIL_PIXEL_DATA, reason=METADATA[UNTIL_PIXEL_DATA])
    if header.kind == "other":
        if ended and _ORTHANC_JSON.match(plain[:64]):
            return Header("other", encoding=encoding, plain_size=declared,
                          pacs_metadata=DICOM_AS_JSON, reason=METADATA[DICOM_AS_JSON])
        header.reason = f"{label} holding {header.reason}"
    elif header.kind == "unreadable":
        header.reason = f"{label}: {header.reason}"
    return header


def _zip_reason(data: bytes, size: int) -> str:
    """A zip whose files were not read here: the inventory reads them (`cloudexit.dicom.zipped`);
    migrate meets an unread one only when it was in an archive storage class at inventory time."""
    return (f"{ZIP_NOT_READ} (it was not readable at inventory time, e.g. "
            "in an archive storage class): the archive is kept as stored in _quarantine/ "
            "(run `cloudexit inventory` again once it is restored, then `migrate --resume`)")


def scan_rows(plain: bytes, size: int) -> bool:
    """The dataset has Rows (an image), so a copy without Pixel Data is Orthanc's header copy."""
    from cloudexit.dicom.scan import scan

    found = scan(plain, size, _ROWS)
    return bool(found.decided and found.values and found.values.get("rows"))


def describe(encoding: str | None) -> str:
    return ENCODINGS.get(encoding or "", encoding or "plain")


# -- the worker side: stream a verified raw object into its plain file --------------------------
def decode_file(encoding: str, raw_path: str, out_path: str, fsync: bool = True) -> Decoded:
    """Decode `raw_path` into `out_path` (created 0600), checking the envelope: the zlib
    stream's Adler-32 and Orthanc's declared size, or each gzip member's CRC-32 and length.
    Memory stays at a few MiB whatever the object's size. Raises DecodeError."""
    digest = hashlib.sha256()
    head = bytearray()
    written = 0
    with new_output(out_path, fsync) as fd:
        with open(raw_path, "rb") as raw:
            if encoding == ORTHANC_ZLIB:
                prefix = raw.read(8)
                if len(prefix) < 8:
                    raise DecodeError("Orthanc-compressed attachment shorter than its 8-byte size")
                declared: int | None = struct.unpack("<Q", prefix)[0]
                label, wbits = "Orthanc-compressed attachment", 15
                checks = ["zlib-adler32", "orthanc-declared-size"]
            elif encoding == GZIP:
                declared, label, wbits, checks = None, "gzip file", 31, ["gzip-crc32", "gzip-isize"]
            else:
                raise DecodeError(f"{describe(encoding)}: cannot be decoded")
            inflater = zlib.decompressobj(wbits)
            members, pending = 1, b""
            while True:
                data, pending = pending or raw.read(CHUNK), b""
                if not data:
                    if not inflater.eof:
                        raise DecodeError(f"{label}: the compressed stream is cut short after "
                                          f"{written} decoded bytes")
                    break
                if inflater.eof:  # bytes after the end of the stream
                    if encoding == GZIP and data[:2] == b"\x1f\x8b":
                        members += 1  # concatenated gzip members form one file
                        inflater = zlib.decompressobj(31)
                    elif encoding == GZIP and not data.strip(b"\x00"):
                        continue  # zero padding after the last member (tape-era habit)
                    else:
                        raise DecodeError(f"{label}: unexpected bytes after the end of the "
                                          "compressed stream")
                try:
                    out = inflater.decompress(data, CHUNK)
                except zlib.error as exc:
                    raise DecodeError(f"{label}: the compressed stream is corrupt after "
                                      f"{written} decoded bytes ({exc})") from None
                if out:
                    written += _write(fd, out)
                    digest.update(out)
                    if len(head) < _HEAD:
                        head += out[:_HEAD - len(head)]
                pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
        if declared is not None and written != declared:
            raise DecodeError(f"{label}: declares {declared} bytes, decodes to {written}")
    return Decoded(written, digest.hexdigest(), bytes(head),
                   checks + ([f"gzip-members:{members}"] if members > 1 else []))


def _write(fd: int, data: bytes) -> int:
    view = memoryview(data)
    done = os.write(fd, view)
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def judge_decoded(fetcher: Any, task: Any, result: Any) -> str:
    """The worker's verdict on a raw object whose checksums passed (`Fetcher._judge`): decode
    it beside its temp file, check the envelope, then the DICOM header and UIDs of the plain
    file, which takes the temp file's name. Returns where the file goes (the final path, or
    quarantine with the raw object as it was, and why)."""
    plain = task.temp + ".plain"
    try:
        decoded = decode_file(task.encoding, task.temp, plain, fsync=fetcher.placer.fsync)
    except DecodeError as exc:
        result.outcome, result.detail = "quarantined", f"{exc} (the raw object is kept)"
        return str(task.quarantine or fetcher._mismatch_path(task.key))
    raw_sha256 = result.sha256
    result.checks.extend(decoded.checks)
    problem = fetcher._check_dicom(task, decoded.head, result, path=plain, size=decoded.size)
    if problem:
        os.unlink(plain)
        result.outcome, result.detail = "quarantined", f"{problem} (decoded; the raw object is kept)"
        return str(task.quarantine or fetcher._mismatch_path(task.key))
    os.replace(plain, task.temp)  # the placement renames the temp file: now the plain DICOM
    result.decoded = {"encoding": task.encoding, "raw_sha256": raw_sha256, "raw_size": task.size,
                      "size": decoded.size}
    result.sha256, result.md5 = decoded.sha256, None  # of the file written
    result.outcome = "verified"
    return str(task.final)


def audit_facts(conn: Any) -> dict[str, Any]:
    """For the audit: objects by envelope (and how many were decoded into verified files), and
    Orthanc's metadata attachments by kind. Grouped in SQL: a few rows, whatever the bucket."""
    stored = {r[0]: r[1] for r in conn.execute(  # objects of the bucket: not the files inside zips
        "SELECT encoding, count(*) FROM objects WHERE status = 'present' AND encoding IS NOT NULL "
        "AND container IS NULL GROUP BY 1").fetchall()}
    decoded = {r[0]: r[1] for r in conn.execute(
        "SELECT encoding, count(DISTINCT key) FROM transfers WHERE encoding IS NOT NULL "
        "AND state = 'verified' GROUP BY 1").fetchall()}
    metadata = {r[0]: r[1] for r in conn.execute(
        "SELECT pacs_metadata, count(*) FROM objects WHERE status = 'present' "
        "AND pacs_metadata IS NOT NULL GROUP BY 1").fetchall()}
    zip_members = conn.execute("SELECT count(*) FROM objects WHERE status = 'present' "
                               "AND container IS NOT NULL").fetchone()[0]
    return {"stored_in": stored, "decoded": decoded, "zip_members": zip_members, "decoded_total": sum(decoded.values()),
            "pacs_metadata": metadata, "pacs_metadata_total": sum(metadata.values())}
