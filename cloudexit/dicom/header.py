"""DICOM header parsing and classification of objects (pydicom, never pixel data).

`classify` looks at the first bytes of an object and says whether it is DICOM, something else,
or DICOM we cannot read, and whether it needs more bytes to decide.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Any

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float and Double Float Pixel Data
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_EXTRA = {0x00080060: "modality", 0x00080020: "study_date", 0x00100020: "patient_id"}
_ODD = re.compile(r"[^\x20-\x7e]|\\")  # not plain ASCII text, or multi-valued


@dataclass
class Header:
    """What an object's first bytes told us."""

    kind: str  # "dicom" | "other" | "unreadable"
    reason: str | None = None
    need_more: bool = False  # read a longer range and call again
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    study_date: str | None = None
    transfer_syntax: str | None = None
    patient_id: str | None = None  # only ever stored hashed; see patient_hash()
    header_length: int | None = None  # bytes before pixel data
    encoding: str | None = None  # envelope the object is in (cloudexit.containers), None: plain
    plain_size: int | None = None  # decoded size, when the envelope declares it
    pacs_metadata: str | None = None  # a PACS's own metadata attachment (containers.METADATA)


def patient_hash(key: str | None, patient_id: str | None) -> str | None:
    """A keyed hash of a Patient ID: stable within one migration, not reversible without the
    key (kept outside the state DB, see `patientkey`). No key: None (unmatched)."""
    if not patient_id or not key:
        return None
    digest = hmac.new(key.encode(), patient_id.strip().encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:20]


_IMPORT_LOCK = threading.Lock()
_READ_PARTIAL: Any = None


def preload() -> Any:
    """Import pydicom, once, before threads parse with it; returns `read_partial`.

    pydicom's modules import each other (values, dataelem, filewriter...). A thread that
    starts `from pydicom.filereader import ...` while another is still running pydicom's
    `__init__` finds the package half-initialised and fails with "cannot import name
    'convert_numbers' from partially initialized module 'pydicom.values'". So the whole
    package is imported under a lock, by the first thread whose header needs pydicom (the
    struct walk reads clean headers without it: no command pays for pydicom up front).
    """
    global _READ_PARTIAL
    if _READ_PARTIAL is None:
        with _IMPORT_LOCK:
            if _READ_PARTIAL is None:
                import pydicom  # noqa: F401 - the whole package, before any of its modules
                from pydicom.filereader import read_partial

                _READ_PARTIAL = read_partial
    return _READ_PARTIAL


def _sniff(data: bytes) -> str | None:
    """Why these bytes are not DICOM, or None if they might be."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return None
    if len(data) >= 8:
        group = struct.unpack("<H", data[:2])[0]
        # A raw dataset (no preamble) starts with file meta (0002) or identifying elements (0008).
        if group in (0x0002, 0x0008):
            return None
    head = data[:16].lstrip()
    for magic, name in ((b"\x89PNG", "PNG image"), (b"\xff\xd8\xff", "JPEG image"),
                        (b"PK\x03\x04", "ZIP archive"), (b"%PDF", "PDF document"),
                        (b"{", "JSON"), (b"[", "JSON"), (b"<", "XML/HTML"),
                        (b"\x1f\x8b", "gzip data")):
        if head.startswith(magic):
            return f"not DICOM ({name})"
    return "not DICOM (no DICM marker, no DICOM tags)"


def classify(data: bytes, object_size: int) -> Header:
    """Classify an object from its first `len(data)` bytes (`object_size` is the whole size)."""
    if object_size == 0:
        return Header("other", "empty object (0 bytes)")
    whole = len(data) >= object_size
    reason = _sniff(data)
    if reason:
        if not whole and len(data) < 132:
            return Header("other", reason, need_more=True)
        return Header("other", reason)
    fast = _scan(data, object_size)
    if fast is not None:
        return fast

    read_partial = preload()
    pixel: dict[str, int] = {}

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            pixel["length"] = length
            return True
        return False

    fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=stop, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on broken input
        if not whole:
            return Header("unreadable", f"header parse failed: {exc}", need_more=True)
        return Header("unreadable", f"DICOM header cannot be parsed: {_short(exc)}")

    found_pixels = "length" in pixel
    if not found_pixels and not whole:
        # Header longer than what we read (or no pixel data at all): read more.
        return Header("unreadable", "header longer than the bytes read", need_more=True)

    header = _fields(ds)
    if not header.sop_uid or not UID_RE.match(header.sop_uid):
        return Header("unreadable", "no valid SOP Instance UID in the header",
                      transfer_syntax=header.transfer_syntax)
    if not header.study_uid or not header.series_uid:
        header.kind, header.reason = "unreadable", "Study or Series Instance UID missing"
        return header

    if found_pixels:
        element_start = fp.tell()
        explicit = header.transfer_syntax != IMPLICIT_VR_LE
        value_start = element_start + (12 if explicit else 8)
        header.header_length = element_start
        length = pixel["length"]
        if length != 0xFFFFFFFF and value_start + length > object_size:
            header.kind = "unreadable"
            header.reason = (f"truncated: pixel data declares {length} bytes, "
                             f"object holds {max(object_size - value_start, 0)}")
    return header


def _scan(data: bytes, object_size: int) -> Header | None:
    """The common case by `dicomscan`'s struct walk (~50 µs against ~1.4 ms for pydicom): a
    clean header with valid UIDs and plain ASCII values. None: anything else, which pydicom
    judges (and explains). Values must come out exactly as pydicom gives them, or the patient
    hash of one patient would differ between the two paths; non-ASCII text goes to pydicom."""
    from cloudexit.dicom.scan import scan

    found = scan(data, object_size, _EXTRA)
    if found.need_more:
        return Header("unreadable", "header longer than the bytes read", need_more=True)
    values = found.values
    if (not found.decided or found.kind != "dicom" or values is None
            or not found.sop_uid or not UID_RE.match(found.sop_uid)
            or not found.study_uid or not found.series_uid or not found.sop_class_uid
            or any(_ODD.search(v) for v in (*values.values(), found.study_uid, found.series_uid,
                                             found.sop_class_uid))):
        return None
    return Header("dicom", study_uid=found.study_uid, series_uid=found.series_uid,
                  sop_uid=found.sop_uid, sop_class_uid=found.sop_class_uid,
                  modality=values["modality"] or None, study_date=values["study_date"] or None,
                  transfer_syntax=found.transfer_syntax, patient_id=values["patient_id"] or None,
                  header_length=None if found.pixel_at is None else
                  found.pixel_at - (8 if found.transfer_syntax == IMPLICIT_VR_LE else 12))


def _fields(ds: object) -> Header:
    get = lambda name: _text(getattr(ds, name, None))  # noqa: E731
    meta = getattr(ds, "file_meta", None)
    ts = _text(getattr(meta, "TransferSyntaxUID", None)) if meta is not None else None
    if ts is None:
        ts = IMPLICIT_VR_LE if getattr(ds, "is_implicit_VR", True) else "1.2.840.10008.1.2.1"
    sop_class = get("SOPClassUID") or (_text(getattr(meta, "MediaStorageSOPClassUID", None))
                                       if meta is not None else None)
    return Header(
        kind="dicom", study_uid=get("StudyInstanceUID"), series_uid=get("SeriesInstanceUID"),
        sop_uid=get("SOPInstanceUID"), sop_class_uid=sop_class, modality=get("Modality"),
        study_date=get("StudyDate"), transfer_syntax=ts, patient_id=get("PatientID"),
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _short(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def parse_file(path: str, first_read: int = 64 * 1024) -> Header:
    """Classify a local file, reading only as much of it as the header needs."""
    import os

    size = os.path.getsize(path)
    length = first_read
    with open(path, "rb") as fh:
        while True:
            fh.seek(0)
            header = classify(fh.read(length), size)
            if not header.need_more or length >= size:
                return header
            length *= 4
