"""The bytes of the synthetic PACS's objects: DICOM instances (byte for byte what pydicom's
dcmwrite writes) and the non-DICOM files PACS exports keep beside them.
"""

from __future__ import annotations

import functools
import json
import random
import struct
import zlib
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedMRImageStorage,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
)

from cloudexit.testing.pacs_tree import Image

_ENCAPSULATED = frozenset({JPEGLosslessSV1, JPEGBaseline8Bit})
_PRIVATE_CREATOR = "CLOUDEXIT SYNTHETIC"
_PIXEL_TAG = struct.pack("<HH", 0x7FE0, 0x0010)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


# --- DICOM encoding ----------------------------------------------------------
#
# pydicom's dcmwrite costs ~10 ms per header, which dominated large benchmark
# profiles. So the header is described as (tag, VR, value) triples, each
# element is encoded by pydicom's own write_data_element, and the encodings are
# cached: most elements are identical across a series. The result is byte for
# byte what dcmwrite produces (tested).

_Elem = tuple[int, str, Any]  # multi-values and sequence items are tuples, so they can be cached


@functools.cache
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, dictionary_VR(tag)


def _el(keyword: str, value: Any) -> _Elem:
    return *_tag_vr(keyword), value


def elements(img: Image) -> list[_Elem]:
    """The instance's data elements except PixelData, which _pixel_element appends."""
    series, study = img.series, img.series.study
    patient = study.patient
    modality = series.modality
    elems = [
        _el("ImageType", ("ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER")),
        _el("SOPClassUID", img.sop_class),
        _el("SOPInstanceUID", img.sop_uid),
        _el("StudyDate", study.date),
        _el("SeriesDate", study.date),
        _el("ContentDate", study.date),
        _el("StudyTime", study.time),
        _el("SeriesTime", study.time),
        _el("ContentTime", img.content_time),
        _el("AccessionNumber", study.accession),
        _el("Modality", modality),
        _el("Manufacturer", "CLOUDEXIT SYNTHETIC"),
        _el("InstitutionName", "Synthetic General Hospital"),
        _el("StudyDescription", study.description),
        _el("SeriesDescription", series.description),
        _el("PatientName", patient.name),
        _el("PatientID", patient.id),
        _el("PatientBirthDate", patient.birth_date),
        _el("PatientSex", patient.sex),
        # Flag the data as belonging to nobody, for whoever finds it later.
        _el("PatientIdentityRemoved", "YES"),
        _el("DeidentificationMethod", "cloudexit synthetic data, no real patient"),
        _el("StudyInstanceUID", study.uid),
        _el("SeriesInstanceUID", series.uid),
        _el("StudyID", study.study_id),
        _el("SeriesNumber", series.number),
        _el("InstanceNumber", img.instance_number),
        _el("SamplesPerPixel", 1),
        _el("PhotometricInterpretation", "MONOCHROME2"),
        _el("Rows", img.rows),
        _el("Columns", img.cols),
        _el("BitsAllocated", img.bits),
        _el("BitsStored", img.bits),
        _el("HighBit", img.bits - 1),
        _el("PixelRepresentation", 1 if modality == "CT" else 0),
    ]
    if patient.charset:
        elems.append(_el("SpecificCharacterSet", patient.charset))
    if modality == "CT":
        z = f"{-1.25 * img.instance_number:.2f}"
        elems += [
            _el("KVP", "120"),
            _el("SliceThickness", "1.25"),
            _el("ImagePositionPatient", ("-160", "-160", z)),
            _el("ImageOrientationPatient", ("1", "0", "0", "0", "1", "0")),
            _el("SliceLocation", z),
            _el("RescaleIntercept", "-1024"),
            _el("RescaleSlope", "1"),
        ]
    if modality in ("CT", "CR") or img.sop_class == MRImageStorage:
        elems.append(_el("PixelSpacing", ("0.625", "0.625")))
    if img.frames > 1:
        elems.append(_el("NumberOfFrames", img.frames))
    if modality == "XA":
        elems += [_el("FrameTime", "66.7"),
                  _el("FrameIncrementPointer", tag_for_keyword("FrameTime"))]
    if img.sop_class == EnhancedMRImageStorage:
        # A little functional-group nesting, as real enhanced objects have.
        measures = (_el("PixelSpacing", ("0.9375", "0.9375")), _el("SliceThickness", "5"))
        shared = (_el("PixelMeasuresSequence", (measures,)),)
        elems.append(_el("SharedFunctionalGroupsSequence", (shared,)))
    if img.private_padding:
        padding = random.Random(img.pixel_seed + "/private").randbytes(img.private_padding)
        elems += [(0x00090010, "LO", _PRIVATE_CREATOR), (0x00091001, "OB", padding)]
    return elems


def to_pydicom(vr: str, value: Any) -> Any:
    if vr == "SQ":
        items = []
        for item_elems in value:
            item = Dataset()
            for tag, item_vr, item_value in item_elems:
                item.add_new(tag, item_vr, to_pydicom(item_vr, item_value))
            items.append(item)
        return Sequence(items)
    return list(value) if isinstance(value, tuple) else value


@functools.lru_cache(maxsize=4096)
def _encode_element(tag: int, vr: str, value: Any, implicit: bool, charset: str | None) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_data_element(fp, DataElement(tag, vr, to_pydicom(vr, value)), convert_encodings(charset))
    return fp.getvalue()


def _encode(elems: list[_Elem], implicit: bool, charset: str | None) -> bytes:
    return b"".join(_encode_element(tag, vr, value, implicit, charset)
                    for tag, vr, value in sorted(elems, key=lambda e: e[0]))


def _file_meta(img: Image) -> bytes:
    """Preamble, DICM and the file meta group (always explicit VR little endian)."""
    elems = [
        _el("FileMetaInformationVersion", b"\0\1"),
        _el("MediaStorageSOPClassUID", img.sop_class),
        _el("MediaStorageSOPInstanceUID", img.sop_uid),
        _el("TransferSyntaxUID", img.transfer_syntax),
        _el("ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID),
        _el("ImplementationVersionName", "CLOUDEXIT_SYN"),
    ]
    group = _encode(elems, implicit=False, charset=None)
    length = _encode([_el("FileMetaInformationGroupLength", len(group))], False, None)
    return b"\0" * 128 + b"DICM" + length + group


def _implicit(img: Image) -> bool:
    return img.transfer_syntax == ImplicitVRLittleEndian


def header(img: Image) -> bytes:
    """Everything before PixelData; no preamble/meta for a raw (no-preamble) dataset."""
    charset = img.series.study.patient.charset
    dataset = _encode(elements(img), _implicit(img), charset)
    return _file_meta(img) + dataset if img.preamble else dataset


def _frame_bytes(img: Image) -> int:
    return img.rows * img.cols * img.bits // 8


def _pixel_element_size(img: Image) -> int:
    """Encoded size of the PixelData element, without building it."""
    if img.transfer_syntax in _ENCAPSULATED:
        # tag/VR/undefined length + offset table item + one item per frame + delimiter
        return 12 + (8 + 4 * img.frames) + img.frames * (8 + _frame_bytes(img)) + 8
    return (8 if _implicit(img) else 12) + img.frames * _frame_bytes(img)


def _pixel_element(img: Image) -> list[bytes]:
    """The PixelData element, in pieces so the body is assembled with one copy."""
    rng = random.Random(img.pixel_seed)
    n = _frame_bytes(img)
    if img.transfer_syntax in _ENCAPSULATED:
        # Fake JPEG frames: SOI + noise + EOI. Undecodable but correctly framed.
        frames = [b"\xff\xd8" + rng.randbytes(n - 4) + b"\xff\xd9" for _ in range(img.frames)]
        head = _PIXEL_TAG + b"OB\0\0" + b"\xff\xff\xff\xff"
        return [head, encapsulate(frames, has_bot=True), _ITEM_DELIMITER]
    value = rng.randbytes(img.frames * n)
    if _implicit(img):
        return [_PIXEL_TAG + struct.pack("<I", len(value)), value]
    vr = b"OW" if img.bits == 16 else b"OB"
    return [_PIXEL_TAG + vr + b"\0\0" + struct.pack("<I", len(value)), value]


def _truncated_by(img: Image) -> int:
    return (img.frames * _frame_bytes(img)) // 2 if img.truncated else 0


def dicom_size(img: Image) -> int:
    return len(header(img)) + _pixel_element_size(img) - _truncated_by(img)


def dicom_body(img: Image) -> bytes:
    body = b"".join([header(img), *_pixel_element(img)])
    return body[: len(body) - _truncated_by(img)] if img.truncated else body


# --- non-DICOM bodies --------------------------------------------------------

def sidecar_json(img: Image) -> bytes:
    """A few tags in the DICOM JSON model, as a PACS might keep next to the file."""
    series, study = img.series, img.series.study
    tags = {
        "00080018": {"vr": "UI", "Value": [img.sop_uid]},
        "00080060": {"vr": "CS", "Value": [series.modality]},
        "00080020": {"vr": "DA", "Value": [study.date]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": study.patient.name}]},
        "00100020": {"vr": "LO", "Value": [study.patient.id]},
        "0020000D": {"vr": "UI", "Value": [study.uid]},
        "0020000E": {"vr": "UI", "Value": [series.uid]},
    }
    return json.dumps(tags, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")


def png(seed: str, side: int = 32) -> bytes:
    """A real (tiny, grey noise) PNG, like the thumbnails some PACS exports keep."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rng = random.Random(seed)
    rows = b"".join(b"\0" + rng.randbytes(side) for _ in range(side))  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def readme(seed: int) -> bytes:
    return (f"Synthetic PACS export (cloudexit, seed {seed}).\n"
            "Contains invented patients only. Do not import into a clinical system.\n").encode()
