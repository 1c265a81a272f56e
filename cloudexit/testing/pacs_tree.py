"""The synthetic PACS's patients, studies, series and instances, and where each PACS layout keys them.

Everything is derived from the seed; all patients are invented (see cloudexit.testing.synthetic).
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass

from pydicom.uid import generate_uid


@dataclass(frozen=True)
class Patient:
    id: str
    name: str
    charset: str | None  # SpecificCharacterSet; None = default repertoire (ASCII)
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Study:
    uid: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    layout: str
    patient: Patient


@dataclass(frozen=True)
class Series:
    uid: str
    number: int
    modality: str
    description: str
    study: Study


@dataclass(frozen=True)
class Image:
    """Everything needed to rebuild one DICOM instance byte for byte."""

    series: Series
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


def synthetic_uid(seed: int, *parts: object) -> str:
    # generate_uid hashes its entropy sources, so equal inputs -> equal UIDs.
    return generate_uid(entropy_srcs=["cloudexit-synthetic", str(seed), *map(str, parts)])


def make_patient(index: int, rng: random.Random, used_ids: set[str]) -> Patient:
    charset = tuple(_NAMES_BY_CHARSET)[index % len(_NAMES_BY_CHARSET)]
    name = rng.choice(_NAMES_BY_CHARSET[charset])
    while (pid := f"P{rng.randrange(10**6):06d}") in used_ids:
        pass
    used_ids.add(pid)
    birth = _START_DATE - dt.timedelta(days=rng.randrange(365 * 18, 365 * 90))
    return Patient(pid, name, charset, birth.strftime("%Y%m%d"), rng.choice("MF"))


def make_study(seed: int, p: int, s: int, layout: str, patient: Patient,
                rng: random.Random) -> Study:
    date = _START_DATE + dt.timedelta(days=rng.randrange(_DATE_SPAN_DAYS + 1))
    time = f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
    return Study(
        uid=synthetic_uid(seed, "study", p, s),
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


def orthanc_id(seed: int, sop_uid: str, variant: str = "") -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{seed}/{sop_uid}{variant}"))


def layout_key(layout: str, seed: int, img: Image, variant: str = "") -> str:
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
    return f"{orthanc_id(seed, img.sop_uid, variant)}.dcm"
