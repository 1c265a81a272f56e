"""Synthetic PACS generator: fake-but-valid DICOM objects in an S3 bucket.

Used by the test suite, ``cloudexit demo`` and benchmarks. :func:`generate`
describes a PACS (patients -> studies -> series -> instances, spread over
several key layouts, plus awkward cases) as :class:`SyntheticObject` records;
:func:`upload` puts them into a bucket. The records are the ground truth that
the migration results are checked against. The patients, studies and key layouts are in
:mod:`cloudexit.testing.pacs_tree`, the objects' bytes in :mod:`cloudexit.testing.dicom_bytes`.

Everything is derived from ``Profile.seed``: the same profile always yields
the same keys and the same bytes. All patients are invented; nothing here is
real patient data (each dataset also says so in PatientIdentityRemoved).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    XRayAngiographicImageStorage,
)

from cloudexit.testing.dicom_bytes import (
    dicom_body,
    dicom_size,
    png,
    readme,
    sidecar_json,
)
from cloudexit.testing.pacs_tree import (
    PATIENT_NAMES,
    Image,
    Series,
    Study,
    layout_key,
    make_patient,
    make_study,
    orthanc_id,
    synthetic_uid,
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

_BIG_HEADER_PADDING = 80 * 1024  # pushes PixelData past the 64 KiB mark
_MIN_PART_SIZE = 5 * 2**20  # S3 (and SeaweedFS) minimum for non-final parts



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


def _dicom_object(key: str, img: Image, case: str = "normal", kind: str = "dicom",
                  multipart: bool = False) -> SyntheticObject:
    series, study = img.series, img.series.study
    return SyntheticObject(
        key=key, size=dicom_size(img), kind=kind, case=case,
        study_uid=study.uid, series_uid=series.uid, sop_uid=img.sop_uid,
        sop_class_uid=img.sop_class, modality=series.modality, study_date=study.date,
        transfer_syntax=img.transfer_syntax,
        patient_id=study.patient.id, multipart=multipart,
        content_type="application/dicom",
        _make=functools.partial(dicom_body, img),
    )


# --- non-DICOM objects ------------------------------------------------------

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
        self.studies: list[Study] = []
        self.series_count = 0
        self.picks = 0

    def emit(self, obj: SyntheticObject) -> SyntheticObject:
        # A repeated key would silently overwrite ground truth in the bucket.
        if obj.key in self.keys:
            raise RuntimeError(f"synthetic key collision: {obj.key!r}")
        self.keys.add(obj.key)
        return obj

    def pick_study(self) -> Study:
        """Round-robin over the studies, so awkward cases land in every layout."""
        study = self.studies[self.picks % len(self.studies)]
        self.picks += 1
        return study

    def series(self, study: Study, modality: str, description: str) -> tuple[Series, str]:
        """A new series and the transfer syntax its images use."""
        self.series_count += 1
        uid = synthetic_uid(self.seed, "series", study.uid, self.series_count)
        ts = _SERIES_SYNTAXES[self.series_count % len(_SERIES_SYNTAXES)]
        return Series(uid, self.series_count, modality, description, study), ts

    def image(self, series: Series, ts: str, n: int, sop_class: str, matrix: int,
              sop_uid: str | None = None, variant: str = "", **extra: Any) -> Image:
        sop = sop_uid or synthetic_uid(self.seed, "sop", series.uid, n)
        return Image(series=series, sop_uid=sop, sop_class=sop_class, transfer_syntax=ts,
                      instance_number=n, rows=matrix, cols=matrix, bits=16,
                      pixel_seed=f"{self.seed}/{sop}/{variant}", **extra)

    def place(self, img: Image, case: str = "normal", kind: str = "dicom",
              multipart: bool = False) -> Iterator[SyntheticObject]:
        """The object under its study's layout, plus an orthanc sidecar for odd instances."""
        study = img.series.study
        key = layout_key(study.layout, self.seed, img)
        yield self.emit(_dicom_object(key, img, case, kind, multipart))
        if study.layout == "orthanc" and img.instance_number % 2 == 1:
            yield self.emit(_other_object(
                f"{orthanc_id(self.seed, img.sop_uid)}.json", "sidecar-json",
                functools.partial(sidecar_json, img), "application/json",
                study_uid=study.uid, series_uid=img.series.uid, sop_uid=img.sop_uid,
                patient_id=study.patient.id))

    def hierarchy(self) -> Iterator[SyntheticObject]:
        profile = self.profile
        for p in range(profile.patients):
            patient = make_patient(p, self.rng, self.patient_ids)
            for s in range(profile.studies_per_patient):
                layout = profile.layouts[len(self.studies) % len(profile.layouts)]
                study = make_study(self.seed, p, s, layout, patient, self.rng)
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
            img = Image(series=series, sop_uid=synthetic_uid(self.seed, "sop", series.uid, 1),
                         sop_class=sop_class, transfer_syntax=ts, instance_number=1,
                         rows=side, cols=side, bits=bits, frames=frames,
                         pixel_seed=f"{self.seed}/multiframe/{m}")
            yield from self.place(img, "multiframe", multipart=True)

    def awkward(self) -> Iterator[SyntheticObject]:
        seed = self.seed
        ct_matrix, mr_matrix = self.profile.ct_matrix, min(self.profile.ct_matrix, 256)

        yield self.emit(_other_object("README.txt", "non-dicom",
                                      functools.partial(readme, seed), "text/plain"))
        study = self.pick_study()
        yield self.emit(_other_object(
            f"{study.uid}/thumbnail.png", "non-dicom",
            functools.partial(png, f"{seed}/{study.uid}/png"), "image/png",
            study_uid=study.uid, patient_id=study.patient.id))
        # A .dcm name with nothing in it, as left behind by an interrupted transfer.
        yield self.emit(_other_object(f"incoming/{orthanc_id(seed, 'zero-byte')}.dcm",
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
        sop = synthetic_uid(seed, "dup-sop", series.uid)
        for variant, content_time in (("", "120000"), ("resend", "120500")):
            img = self.image(series, ts, 1, CTImageStorage, ct_matrix, sop_uid=sop,
                             variant=variant, content_time=content_time)
            key = layout_key(series.study.layout, seed, img, variant)
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
