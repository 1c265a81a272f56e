"""Synthetic PACS generator: fake-but-valid DICOM objects in an S3 bucket.

Used by the test suite, ``cloudexit demo`` and benchmarks. :func:`generate`
describes a PACS (patients -> studies -> series -> instances, spread over
several key layouts, plus awkward cases) as :class:`SyntheticObject` records;
:func:`upload` puts them into a bucket. The records are the ground truth that
the migration results are checked against.

Everything is derived from ``Profile.seed``: the same profile always yields
the same keys and the same bytes. All patients are invented; nothing here is
real patient data (each dataset also says so in PatientIdentityRemoved).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import random
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
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
    ComputedRadiographyImageStorage,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    XRayAngiographicImageStorage,
    generate_uid,
)

__all__ = [
    "LAYOUTS",
    "HOSTILE_KEYS",
    "PATIENT_NAMES",
    "Profile",
    "SyntheticObject",
    "expected_etag",
    "generate",
    "upload",
]

LAYOUTS = ("uid", "dcm4chee", "orthanc")

# Keys that trip up naive key -> path mapping (encoding, Windows paths,
# dot-dirs). Each one is stored verbatim by SeaweedFS; it rejects "." and ".."
# segments, segments > 255 bytes, and rewrites "//", a leading "/" and "\".
HOSTILE_KEYS = (
    "影像/张三 study/1.dcm",
    "scans/with space/image 1.dcm",
    "..hidden/x.dcm",
    "C:/PACS/export/img.dcm",
    "odd/a+b%20c&d=e;f.dcm",
    "odd/trailing space /x.dcm",
)

# Series rotate through these so every profile mixes transfer syntaxes.
_SERIES_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1)
_ENCAPSULATED = frozenset({JPEGLosslessSV1, JPEGBaseline8Bit})

_PRIVATE_CREATOR = "CLOUDEXIT SYNTHETIC"
_BIG_HEADER_PADDING = 80 * 1024  # pushes PixelData past the 64 KiB mark
_MIN_PART_SIZE = 5 * 2**20  # S3 (and SeaweedFS) minimum for non-final parts

_PIXEL_TAG = struct.pack("<HH", 0x7FE0, 0x0010)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


@dataclass(frozen=True)
class Profile:
    """How big a PACS to make.

    The defaults make 4 patients x 2 studies, each with a 10-slice 512x512 CT
    series (~0.5 MB per slice) and one 2048x2048 CR (~8 MB), plus one 24 MiB
    multi-frame object and the awkward cases: about 140 MB in all.
    """

    patients: int = 4
    studies_per_patient: int = 2
    ct_series_per_study: int = 1
    ct_slices_per_series: int = 10
    ct_matrix: int = 512  # rows = cols; 16-bit, so 512 -> 0.5 MB slices
    cr_per_study: int = 1
    cr_matrix: int = 2048  # 16-bit, so 2048 -> 8 MB
    multiframe_objects: int = 1  # XA / Enhanced MR, uploaded with multipart
    multiframe_bytes: int = 24 * 2**20  # approximate pixel bytes per multi-frame object
    layouts: tuple[str, ...] = LAYOUTS  # studies take these key layouts round-robin
    awkward: bool = True  # add the awkward cases (see generate())
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patients < 1 or self.studies_per_patient < 1:
            raise ValueError("need at least one patient and one study per patient")
        if min(self.ct_series_per_study, self.ct_slices_per_series, self.cr_per_study,
               self.multiframe_objects) < 0:
            raise ValueError("counts must not be negative")
        for matrix in (self.ct_matrix, self.cr_matrix):
            if matrix < 8 or matrix % 2:
                raise ValueError(f"matrix must be an even number >= 8, got {matrix}")
        if self.multiframe_objects and self.multiframe_bytes < 2 * 64 * 64:
            raise ValueError("multiframe_bytes too small for two 64x64 frames")
        if not self.layouts or set(self.layouts) - set(LAYOUTS):
            raise ValueError(f"layouts must be a non-empty subset of {LAYOUTS}")

    @classmethod
    def tiny(cls, seed: int = 0) -> Profile:
        """About 6.5 MB: 3 patients (ASCII, GB18030, UTF-8), one study per layout,
        small images, one 6 MiB multi-frame (two parts at part_size=5 MiB)."""
        return cls(patients=3, studies_per_patient=1, ct_series_per_study=1,
                   ct_slices_per_series=3, ct_matrix=64, cr_per_study=1, cr_matrix=128,
                   multiframe_objects=1, multiframe_bytes=6 * 2**20, seed=seed)

    @classmethod
    def demo(cls, seed: int = 0) -> Profile:
        """About 90 MB: the defaults with 1024x1024 CRs (~2 MB each)."""
        return cls(cr_matrix=1024, seed=seed)

    @classmethod
    def ct_bench(cls, n: int, layout: str = "uid", matrix: int = 512, seed: int = 0) -> Profile:
        """Exactly ``n`` CT objects (~0.5 MB each at matrix 512) in one series,
        one layout, nothing else."""
        return cls(patients=1, studies_per_patient=1, ct_series_per_study=1,
                   ct_slices_per_series=n, ct_matrix=matrix, cr_per_study=0,
                   multiframe_objects=0, layouts=(layout,), awkward=False, seed=seed)


@dataclass(frozen=True)
class SyntheticObject:
    """One object of the synthetic bucket and what a classifier should find in it.

    ``kind`` is the expected classification: "dicom", "other" or "unreadable".
    ``case`` is "normal" or the name of the awkward case. For DICOM objects the
    UID/tag fields are what the dataset contains (the truncated object's header
    is intact, so it has them too). For "other" objects that
    belong to an instance or study (orthanc sidecar, thumbnail) they name it;
    otherwise they are None. The body is rebuilt on each ``body()`` call so a
    large bucket never sits in memory.
    """

    key: str
    size: int
    kind: str
    case: str
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    study_date: str | None = None
    transfer_syntax: str | None = None
    patient_id: str | None = None
    multipart: bool = False
    content_type: str = "application/octet-stream"
    _make: Callable[[], bytes] = field(default=bytes, repr=False, compare=False)

    def body(self) -> bytes:
        """The object's bytes, regenerated deterministically."""
        return self._make()


# --- the hierarchy -----------------------------------------------------------

@dataclass(frozen=True)
class _Patient:
    id: str
    name: str
    charset: str | None  # SpecificCharacterSet; None = default repertoire (ASCII)
    birth_date: str
    sex: str


@dataclass(frozen=True)
class _Study:
    uid: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    layout: str
    patient: _Patient


@dataclass(frozen=True)
class _Series:
    uid: str
    number: int
    modality: str
    description: str
    study: _Study


@dataclass(frozen=True)
class _Image:
    """Everything needed to rebuild one DICOM instance byte for byte."""

    series: _Series
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    instance_number: int
    rows: int
    cols: int
    bits: int  # 8 or 16 bits allocated
    pixel_seed: str
    frames: int = 1
    content_time: str = "120000"
    preamble: bool = True  # False: raw dataset, no preamble/DICM/meta (use implicit VR)
    private_padding: int = 0  # bytes of private OB before PixelData
    truncated: bool = False  # cut the PixelData value in half


_ASCII_NAMES = tuple(f"{sur}^{given}"
                     for sur in ("DOE", "ROE", "SMITH", "JONES", "MILLER", "TAYLOR")
                     for given in ("JANE", "JOHN", "ALEX", "SAM", "MARIA", "CHRIS"))
# Alphabetic=ideographic component groups, as Chinese PACS store them.
_CHINESE_NAMES = tuple(f"{sur_py}^{given_py}={sur}^{given}"
                       for sur, sur_py in (("张", "Zhang"), ("王", "Wang"), ("李", "Li"),
                                           ("赵", "Zhao"), ("陈", "Chen"), ("刘", "Liu"))
                       for given, given_py in (("伟", "Wei"), ("芳", "Fang"), ("娜", "Na"),
                                               ("敏", "Min"), ("静", "Jing"), ("磊", "Lei")))
_UTF8_NAMES = ("Müller^Jürgen", "Ødegård^Søren", "Nguyễn^Thị Lan", "Łukasiewicz^Żaneta",
               "Öztürk^Çağla", "山田^太郎", "García^José", "Αλεξίου^Ελένη")
# Patients rotate through the character sets, so even 3 patients cover all of them.
_NAMES_BY_CHARSET: dict[str | None, tuple[str, ...]] = {
    None: _ASCII_NAMES, "GB18030": _CHINESE_NAMES, "ISO_IR 192": _UTF8_NAMES}
PATIENT_NAMES = _ASCII_NAMES + _CHINESE_NAMES + _UTF8_NAMES
"""Every PatientName generate() can produce, e.g. to check none leaks into output."""

_DESCRIPTIONS = {
    None: ("CT CHEST W/O CONTRAST", "CT ABDOMEN", "CT HEAD", "CHEST PA/LAT"),
    "GB18030": ("胸部CT平扫", "腹部CT", "头部CT", "胸部正侧位"),
    "ISO_IR 192": ("Thorax-CT nativ", "CT Abdomen", "Schädel-CT", "Röntgen Thorax"),
}
_START_DATE = dt.date(2015, 1, 1)
_DATE_SPAN_DAYS = (dt.date(2025, 12, 31) - _START_DATE).days


def _uid(seed: int, *parts: object) -> str:
    # generate_uid hashes its entropy sources, so equal inputs -> equal UIDs.
    return generate_uid(entropy_srcs=["cloudexit-synthetic", str(seed), *map(str, parts)])


def _make_patient(index: int, rng: random.Random, used_ids: set[str]) -> _Patient:
    charset = tuple(_NAMES_BY_CHARSET)[index % len(_NAMES_BY_CHARSET)]
    name = rng.choice(_NAMES_BY_CHARSET[charset])
    while (pid := f"P{rng.randrange(10**6):06d}") in used_ids:
        pass
    used_ids.add(pid)
    birth = _START_DATE - dt.timedelta(days=rng.randrange(365 * 18, 365 * 90))
    return _Patient(pid, name, charset, birth.strftime("%Y%m%d"), rng.choice("MF"))


def _make_study(seed: int, p: int, s: int, layout: str, patient: _Patient,
                rng: random.Random) -> _Study:
    date = _START_DATE + dt.timedelta(days=rng.randrange(_DATE_SPAN_DAYS + 1))
    time = f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
    return _Study(
        uid=_uid(seed, "study", p, s),
        date=date.strftime("%Y%m%d"),
        time=time,
        accession=f"A{rng.randrange(10**8):08d}",
        study_id=str(s + 1),
        description=rng.choice(_DESCRIPTIONS[patient.charset]),
        layout=layout,
        patient=patient,
    )


# --- keys --------------------------------------------------------------------

def _java_hash(text: str) -> str:
    """dcm4chee's ``{tag,hash}`` path element: Java String.hashCode as 8 hex digits."""
    h = 0
    for ch in text:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return f"{h:08X}"


def _orthanc_id(seed: int, sop_uid: str, variant: str = "") -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{seed}/{sop_uid}{variant}"))


def _layout_key(layout: str, seed: int, img: _Image, variant: str = "") -> str:
    """Where a PACS of the given kind would have stored ``img``.

    ``variant`` makes a second, different key for the same SOP Instance UID.
    """
    study = img.series.study
    if layout == "uid":
        suffix = f"_{variant}" if variant else ""
        return f"{study.uid}/{img.series.uid}/{img.sop_uid}{suffix}.dcm"
    if layout == "dcm4chee":
        d = study.date
        return (f"{d[:4]}/{d[4:6]}/{d[6:]}/{_java_hash(study.uid)}/"
                f"{_java_hash(img.series.uid)}/{_java_hash(img.sop_uid + variant)}")
    return f"{_orthanc_id(seed, img.sop_uid, variant)}.dcm"


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


def _elements(img: _Image) -> list[_Elem]:
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


def _to_pydicom(vr: str, value: Any) -> Any:
    if vr == "SQ":
        items = []
        for item_elems in value:
            item = Dataset()
            for tag, item_vr, item_value in item_elems:
                item.add_new(tag, item_vr, _to_pydicom(item_vr, item_value))
            items.append(item)
        return Sequence(items)
    return list(value) if isinstance(value, tuple) else value


@functools.lru_cache(maxsize=4096)
def _encode_element(tag: int, vr: str, value: Any, implicit: bool, charset: str | None) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_data_element(fp, DataElement(tag, vr, _to_pydicom(vr, value)), convert_encodings(charset))
    return fp.getvalue()


def _encode(elems: list[_Elem], implicit: bool, charset: str | None) -> bytes:
    return b"".join(_encode_element(tag, vr, value, implicit, charset)
                    for tag, vr, value in sorted(elems, key=lambda e: e[0]))


def _file_meta(img: _Image) -> bytes:
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


def _implicit(img: _Image) -> bool:
    return img.transfer_syntax == ImplicitVRLittleEndian


def _header(img: _Image) -> bytes:
    """Everything before PixelData; no preamble/meta for a raw (no-preamble) dataset."""
    charset = img.series.study.patient.charset
    dataset = _encode(_elements(img), _implicit(img), charset)
    return _file_meta(img) + dataset if img.preamble else dataset


def _frame_bytes(img: _Image) -> int:
    return img.rows * img.cols * img.bits // 8


def _pixel_element_size(img: _Image) -> int:
    """Encoded size of the PixelData element, without building it."""
    if img.transfer_syntax in _ENCAPSULATED:
        # tag/VR/undefined length + offset table item + one item per frame + delimiter
        return 12 + (8 + 4 * img.frames) + img.frames * (8 + _frame_bytes(img)) + 8
    return (8 if _implicit(img) else 12) + img.frames * _frame_bytes(img)


def _pixel_element(img: _Image) -> list[bytes]:
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


def _truncated_by(img: _Image) -> int:
    return (img.frames * _frame_bytes(img)) // 2 if img.truncated else 0


def _dicom_size(img: _Image) -> int:
    return len(_header(img)) + _pixel_element_size(img) - _truncated_by(img)


def _dicom_body(img: _Image) -> bytes:
    body = b"".join([_header(img), *_pixel_element(img)])
    return body[: len(body) - _truncated_by(img)] if img.truncated else body


def _dicom_object(key: str, img: _Image, case: str = "normal", kind: str = "dicom",
                  multipart: bool = False) -> SyntheticObject:
    series, study = img.series, img.series.study
    return SyntheticObject(
        key=key, size=_dicom_size(img), kind=kind, case=case,
        study_uid=study.uid, series_uid=series.uid, sop_uid=img.sop_uid,
        sop_class_uid=img.sop_class, modality=series.modality, study_date=study.date,
        transfer_syntax=img.transfer_syntax,
        patient_id=study.patient.id, multipart=multipart,
        content_type="application/dicom",
        _make=functools.partial(_dicom_body, img),
    )


# --- non-DICOM bodies --------------------------------------------------------

def _sidecar_json(img: _Image) -> bytes:
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


def _png(seed: str, side: int = 32) -> bytes:
    """A real (tiny, grey noise) PNG, like the thumbnails some PACS exports keep."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rng = random.Random(seed)
    rows = b"".join(b"\0" + rng.randbytes(side) for _ in range(side))  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _readme(seed: int) -> bytes:
    return (f"Synthetic PACS export (cloudexit, seed {seed}).\n"
            "Contains invented patients only. Do not import into a clinical system.\n").encode()


def _other_object(key: str, case: str, data: Callable[[], bytes], content_type: str,
                  **uids: str | None) -> SyntheticObject:
    return SyntheticObject(key=key, size=len(data()), kind="other", case=case,
                           content_type=content_type, _make=data, **uids)


# --- generation --------------------------------------------------------------

def _multiframe_geometry(total: int, bits: int, side: int) -> tuple[int, int]:
    """(side, frames) so that frames * side^2 * bytes adds up to about ``total``."""
    while side > 64 and total // (side * side * bits // 8) < 4:
        side //= 2
    return side, max(2, total // (side * side * bits // 8))


class _Builder:
    """Generation state: the seed, the keys handed out and the studies made so far."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.seed = profile.seed
        self.rng = random.Random(f"cloudexit-synthetic/{profile.seed}")
        self.keys: set[str] = set()
        self.patient_ids: set[str] = set()
        self.studies: list[_Study] = []
        self.series_count = 0
        self.picks = 0

    def emit(self, obj: SyntheticObject) -> SyntheticObject:
        # A repeated key would silently overwrite ground truth in the bucket.
        if obj.key in self.keys:
            raise RuntimeError(f"synthetic key collision: {obj.key!r}")
        self.keys.add(obj.key)
        return obj

    def pick_study(self) -> _Study:
        """Round-robin over the studies, so awkward cases land in every layout."""
        study = self.studies[self.picks % len(self.studies)]
        self.picks += 1
        return study

    def series(self, study: _Study, modality: str, description: str) -> tuple[_Series, str]:
        """A new series and the transfer syntax its images use."""
        self.series_count += 1
        uid = _uid(self.seed, "series", study.uid, self.series_count)
        ts = _SERIES_SYNTAXES[self.series_count % len(_SERIES_SYNTAXES)]
        return _Series(uid, self.series_count, modality, description, study), ts

    def image(self, series: _Series, ts: str, n: int, sop_class: str, matrix: int,
              sop_uid: str | None = None, variant: str = "", **extra: Any) -> _Image:
        sop = sop_uid or _uid(self.seed, "sop", series.uid, n)
        return _Image(series=series, sop_uid=sop, sop_class=sop_class, transfer_syntax=ts,
                      instance_number=n, rows=matrix, cols=matrix, bits=16,
                      pixel_seed=f"{self.seed}/{sop}/{variant}", **extra)

    def place(self, img: _Image, case: str = "normal", kind: str = "dicom",
              multipart: bool = False) -> Iterator[SyntheticObject]:
        """The object under its study's layout, plus an orthanc sidecar for odd instances."""
        study = img.series.study
        key = _layout_key(study.layout, self.seed, img)
        yield self.emit(_dicom_object(key, img, case, kind, multipart))
        if study.layout == "orthanc" and img.instance_number % 2 == 1:
            yield self.emit(_other_object(
                f"{_orthanc_id(self.seed, img.sop_uid)}.json", "sidecar-json",
                functools.partial(_sidecar_json, img), "application/json",
                study_uid=study.uid, series_uid=img.series.uid, sop_uid=img.sop_uid,
                patient_id=study.patient.id))

    def hierarchy(self) -> Iterator[SyntheticObject]:
        profile = self.profile
        for p in range(profile.patients):
            patient = _make_patient(p, self.rng, self.patient_ids)
            for s in range(profile.studies_per_patient):
                layout = profile.layouts[len(self.studies) % len(profile.layouts)]
                study = _make_study(self.seed, p, s, layout, patient, self.rng)
                self.studies.append(study)
                for _ in range(profile.ct_series_per_study):
                    series, ts = self.series(study, "CT", "AXIAL 1.25mm")
                    for n in range(1, profile.ct_slices_per_series + 1):
                        yield from self.place(
                            self.image(series, ts, n, CTImageStorage, profile.ct_matrix))
                for _ in range(profile.cr_per_study):
                    series, ts = self.series(study, "CR", "PA")
                    yield from self.place(self.image(
                        series, ts, 1, ComputedRadiographyImageStorage, profile.cr_matrix))

    def multiframes(self) -> Iterator[SyntheticObject]:
        total = self.profile.multiframe_bytes
        for m in range(self.profile.multiframe_objects):
            study = self.studies[m % len(self.studies)]
            if m % 2 == 0:
                series, _ = self.series(study, "XA", "CINE")
                side, frames = _multiframe_geometry(total, 8, 512)
                sop_class, ts, bits = XRayAngiographicImageStorage, JPEGBaseline8Bit, 8
            else:
                series, _ = self.series(study, "MR", "ENHANCED T1")
                side, frames = _multiframe_geometry(total, 16, 256)
                sop_class, ts, bits = EnhancedMRImageStorage, ExplicitVRLittleEndian, 16
            img = _Image(series=series, sop_uid=_uid(self.seed, "sop", series.uid, 1),
                         sop_class=sop_class, transfer_syntax=ts, instance_number=1,
                         rows=side, cols=side, bits=bits, frames=frames,
                         pixel_seed=f"{self.seed}/multiframe/{m}")
            yield from self.place(img, "multiframe", multipart=True)

    def awkward(self) -> Iterator[SyntheticObject]:
        seed = self.seed
        ct_matrix, mr_matrix = self.profile.ct_matrix, min(self.profile.ct_matrix, 256)

        yield self.emit(_other_object("README.txt", "non-dicom",
                                      functools.partial(_readme, seed), "text/plain"))
        study = self.pick_study()
        yield self.emit(_other_object(
            f"{study.uid}/thumbnail.png", "non-dicom",
            functools.partial(_png, f"{seed}/{study.uid}/png"), "image/png",
            study_uid=study.uid, patient_id=study.patient.id))
        # A .dcm name with nothing in it, as left behind by an interrupted transfer.
        yield self.emit(_other_object(f"incoming/{_orthanc_id(seed, 'zero-byte')}.dcm",
                                      "zero-byte", bytes, "application/dicom"))

        series, _ = self.series(self.pick_study(), "CT", "TRUNCATED")
        yield from self.place(self.image(series, ExplicitVRLittleEndian, 1, CTImageStorage,
                                         ct_matrix, truncated=True), "truncated", "unreadable")

        series, _ = self.series(self.pick_study(), "MR", "T2 LEGACY")
        yield from self.place(self.image(series, ImplicitVRLittleEndian, 1, MRImageStorage,
                                         mr_matrix, preamble=False), "no-preamble")

        series, _ = self.series(self.pick_study(), "MR", "T1 VENDOR PRIVATE")
        yield from self.place(self.image(series, ExplicitVRLittleEndian, 1, MRImageStorage,
                                         mr_matrix, private_padding=_BIG_HEADER_PADDING),
                              "big-header")

        series, ts = self.series(self.pick_study(), "CT", "EXPORTED")
        for n, key in enumerate(HOSTILE_KEYS, 1):
            img = self.image(series, ts, n, CTImageStorage, ct_matrix)
            yield self.emit(_dicom_object(key, img, "hostile-key"))

        # Same SOP Instance UID sent twice with different content (e.g. re-sent
        # after post-processing): both copies are valid; the migration must notice.
        series, ts = self.series(self.pick_study(), "CT", "RESENT")
        sop = _uid(seed, "dup-sop", series.uid)
        for variant, content_time in (("", "120000"), ("resend", "120500")):
            img = self.image(series, ts, 1, CTImageStorage, ct_matrix, sop_uid=sop,
                             variant=variant, content_time=content_time)
            key = _layout_key(series.study.layout, seed, img, variant)
            yield self.emit(_dicom_object(key, img, "dup-sop-conflict"))


def generate(profile: Profile) -> Iterator[SyntheticObject]:
    """Yield the objects of a synthetic PACS, lazily and deterministically.

    Normal objects: per study, ``ct_series_per_study`` CT series and
    ``cr_per_study`` CRs; then ``multiframe_objects`` multi-frame objects
    (XA JPEG Baseline and Enhanced MR native, alternating; case "multiframe",
    multipart=True). Series rotate through Explicit VR LE, Implicit VR LE and
    JPEG Lossless. Studies in the ``orthanc`` layout get a ``{uuid}.json``
    sidecar for every odd-numbered instance (kind "other", case "sidecar-json").

    With ``profile.awkward``: "non-dicom" (README.txt, a PNG thumbnail),
    "zero-byte", "truncated" (unreadable), "no-preamble", "big-header",
    "hostile-key" (one object per HOSTILE_KEYS entry) and "dup-sop-conflict"
    (two objects, same SOP Instance UID, different keys and bytes).
    """
    builder = _Builder(profile)
    yield from builder.hierarchy()
    yield from builder.multiframes()
    if profile.awkward:
        yield from builder.awkward()


# --- upload ------------------------------------------------------------------

def _ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
        return
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass  # another uploader got there first


def _upload_one(client: Any, bucket: str, obj: SyntheticObject, part_size: int) -> None:
    data = obj.body()
    if not obj.multipart:
        client.put_object(Bucket=bucket, Key=obj.key, Body=data, ContentType=obj.content_type)
        return
    upload_id = client.create_multipart_upload(
        Bucket=bucket, Key=obj.key, ContentType=obj.content_type)["UploadId"]
    try:
        parts = []
        for number, offset in enumerate(range(0, max(len(data), 1), part_size), 1):
            resp = client.upload_part(Bucket=bucket, Key=obj.key, UploadId=upload_id,
                                      PartNumber=number, Body=data[offset:offset + part_size])
            part = {"PartNumber": number, "ETag": resp["ETag"]}
            # Newer botocore adds a CRC32 to each part; completion must repeat it.
            if resp.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = resp["ChecksumCRC32"]
            parts.append(part)
        client.complete_multipart_upload(Bucket=bucket, Key=obj.key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=obj.key, UploadId=upload_id)
        raise


def upload(client: Any, bucket: str, objects: Iterable[SyntheticObject], workers: int = 8,
           part_size: int = 8 * 2**20) -> list[SyntheticObject]:
    """Create the bucket if missing, upload every object (multipart for obj.multipart,
    with part_size parts) in parallel threads; return the list (ground truth).

    Bodies are built inside the worker threads, so at most ``workers`` of them
    are in memory at once. ``client`` is a boto3 S3 client (thread-safe).
    """
    if part_size < _MIN_PART_SIZE:
        raise ValueError(f"part_size must be at least {_MIN_PART_SIZE} bytes (S3 minimum)")
    objs = list(objects)
    _ensure_bucket(client, bucket)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_upload_one, client, bucket, obj, part_size) for obj in objs]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return objs


def expected_etag(obj: SyntheticObject, part_size: int = 8 * 2**20) -> str:
    """The ETag S3 reports for ``obj`` after upload() with this part_size (unquoted)."""
    data = obj.body()
    if not obj.multipart:
        return hashlib.md5(data).hexdigest()
    digests = [hashlib.md5(data[i:i + part_size]).digest()
               for i in range(0, max(len(data), 1), part_size)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"
