"""What the PACS stores need from a DICOM file on disk: its meta, its dataset bytes, a Part 10 form.

A PACS rewrites the File Meta Information of what it receives (its own implementation UID,
source AE title), but keeps the dataset that follows byte for byte (Orthanc does, for C-STORE
and STOW-RS alike). So "is the PACS's copy ours?" is answered by the SHA-256 of the dataset
bytes, never of the whole file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian

PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class Layout:
    """Where a file's dataset starts and what its meta says."""

    part10: bool  # preamble + DICM + meta present
    offset: int  # first byte of the dataset
    transfer_syntax: str | None
    sop_class_uid: str | None
    sop_uid: str | None


def _meta_end(head: bytes) -> int:
    """Offset just past the group 0002 elements that follow the DICM marker (explicit VR LE)."""
    pos = 132
    while pos + 8 <= len(head):
        group = int.from_bytes(head[pos:pos + 2], "little")
        if group != 0x0002:
            return pos
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = int.from_bytes(head[pos + 8:pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(head[pos + 6:pos + 8], "little")
            pos += 8 + length
    return pos


def _meta_value(head: bytes, end: int, element: int) -> str | None:
    pos = 132
    while pos < end:
        elem = int.from_bytes(head[pos + 2:pos + 4], "little")
        vr = head[pos + 4:pos + 6]
        long_form = vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV")
        start = pos + (12 if long_form else 8)
        length = int.from_bytes(head[pos + 8:pos + 12] if long_form else head[pos + 6:pos + 8], "little")
        if elem == element:
            return head[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace") or None
        pos = start + length
    return None


def layout(head: bytes) -> Layout:
    """Parse the start of a file (the first 64 KiB is plenty for any sane meta group)."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return Layout(False, 0, None, None, None)
    end = _meta_end(head)
    return Layout(True, end, _meta_value(head, end, 0x0010), _meta_value(head, end, 0x0002),
                  _meta_value(head, end, 0x0003))


def file_layout(path: str) -> Layout:
    with open(path, "rb") as fh:
        return layout(fh.read(65536))


def dataset_sha256(path: str | None = None, data: bytes | None = None) -> str:
    """SHA-256 of the dataset bytes (after the File Meta Information, if any)."""
    digest = hashlib.sha256()
    if data is not None:
        digest.update(data[layout(data[:65536]).offset:])
        return digest.hexdigest()
    assert path is not None
    with open(path, "rb") as fh:
        fh.seek(file_layout(path).offset)
        while chunk := fh.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def meta_prefix(sop_class_uid: str, sop_uid: str, transfer_syntax: str | None) -> bytes:
    """Preamble, DICM and a File Meta group, to make a raw dataset into a Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax or ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return PREAMBLE + buf.getvalue()


def split_part10(data: bytes) -> tuple[str | None, bytes]:
    """(transfer syntax, dataset bytes) of a Part 10 file held in memory."""
    info = layout(data[:65536])
    return info.transfer_syntax, data[info.offset:]


def read_dataset(transfer_syntax: str, data: bytes) -> object:
    """Decode dataset bytes (no meta) with pydicom, without touching pixel data."""
    from pydicom.filereader import read_dataset as _read
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    return _read(io.BytesIO(data), is_implicit_VR=ts.is_implicit_VR,
                 is_little_endian=ts.is_little_endian)
