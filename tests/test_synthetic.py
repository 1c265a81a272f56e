"""Tests for the synthetic PACS generator (cloudexit.synthetic)."""

from __future__ import annotations

import hashlib
import inspect
import io
import re
import struct
import uuid
from collections import Counter

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from cloudexit.testing import dicom_bytes, synthetic
from cloudexit.testing.synthetic import (
    HOSTILE_KEYS,
    Profile,
    SyntheticObject,
    expected_etag,
    generate,
    upload,
)

AWKWARD_KINDS = {
    "non-dicom": "other",
    "zero-byte": "other",
    "sidecar-json": "other",
    "truncated": "unreadable",
    "no-preamble": "dicom",
    "big-header": "dicom",
    "hostile-key": "dicom",
    "dup-sop-conflict": "dicom",
    "multiframe": "dicom",
}


@pytest.fixture(scope="module")
def tiny() -> list[SyntheticObject]:
    return list(generate(Profile.tiny()))


def by_case(objs: list[SyntheticObject], case: str) -> list[SyntheticObject]:
    found = [o for o in objs if o.case == case]
    assert found, f"no {case!r} object"
    return found


def read(obj: SyntheticObject) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(obj.body()), force=True)


def pixel_data_offset(body: bytes) -> int:
    """Offset of the PixelData element's tag: where the header ends."""
    fp = io.BytesIO(body)
    pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    assert body[fp.tell():fp.tell() + 4] == b"\xe0\x7f\x10\x00"
    return fp.tell()


# --- generate() --------------------------------------------------------------

def test_generate_is_lazy() -> None:
    assert inspect.isgenerator(generate(Profile.tiny()))


def test_deterministic(tiny: list[SyntheticObject]) -> None:
    again = list(generate(Profile.tiny()))
    assert again == tiny
    for a, b in zip(tiny, again):
        assert hashlib.md5(a.body()).digest() == hashlib.md5(b.body()).digest(), a.key


def test_seed_changes_everything_but_fixed_keys(tiny: list[SyntheticObject]) -> None:
    other = list(generate(Profile.tiny(seed=1)))
    shared = {o.key for o in tiny} & {o.key for o in other}
    assert shared <= set(HOSTILE_KEYS) | {"README.txt"}


def test_size_matches_body(tiny: list[SyntheticObject]) -> None:
    for obj in tiny:
        assert len(obj.body()) == obj.size, obj.key


def test_keys_unique_and_seaweedfs_safe() -> None:
    for profile in (Profile.tiny(), Profile.demo()):
        keys = [o.key for o in generate(profile)]
        assert len(keys) == len(set(keys))
        for key in keys:
            segments = key.split("/")
            assert not key.startswith("/") and "//" not in key and "\\" not in key, key
            assert not {".", ".."} & set(segments), key
            assert all(0 < len(s.encode()) <= 255 for s in segments), key


def test_every_case_present_with_expected_kind(tiny: list[SyntheticObject]) -> None:
    cases = Counter(o.case for o in tiny)
    assert set(cases) == set(AWKWARD_KINDS) | {"normal"}
    assert cases["hostile-key"] == len(HOSTILE_KEYS)
    assert cases["dup-sop-conflict"] == 2
    for obj in tiny:
        assert obj.kind == AWKWARD_KINDS.get(obj.case, "dicom"), obj.key


def test_awkward_off_gives_only_dicom() -> None:
    objs = list(generate(Profile(patients=1, studies_per_patient=1, ct_matrix=16, cr_matrix=16,
                                 multiframe_objects=0, layouts=("uid",), awkward=False)))
    assert {(o.kind, o.case) for o in objs} == {("dicom", "normal")}


def test_hierarchy_counts() -> None:
    p = Profile(patients=2, studies_per_patient=3, ct_series_per_study=2, ct_slices_per_series=4,
                ct_matrix=16, cr_per_study=1, cr_matrix=16, multiframe_objects=2,
                multiframe_bytes=64 * 1024, awkward=False)
    objs = [o for o in generate(p) if o.kind == "dicom"]
    assert Counter(o.modality for o in objs) == {"CT": 2 * 3 * 2 * 4, "CR": 6, "XA": 1, "MR": 1}
    assert len({o.patient_id for o in objs}) == 2
    assert len({o.study_uid for o in objs}) == 6
    assert len({o.sop_uid for o in objs}) == len(objs)
    assert all(re.fullmatch(r"P\d{6}", o.patient_id) for o in objs)
    assert all("20150101" <= o.study_date <= "20251231" for o in objs)


def test_dicom_bodies_parse_and_match_ground_truth(tiny: list[SyntheticObject]) -> None:
    for obj in tiny:
        if obj.kind != "dicom":
            continue
        ds = read(obj)
        assert ds.SOPInstanceUID == obj.sop_uid
        assert ds.StudyInstanceUID == obj.study_uid
        assert ds.SeriesInstanceUID == obj.series_uid
        assert ds.SOPClassUID == obj.sop_class_uid
        assert ds.Modality == obj.modality
        assert ds.StudyDate == obj.study_date
        assert ds.PatientID == obj.patient_id
        assert ds.PatientIdentityRemoved == "YES"
        if obj.case != "no-preamble":
            assert obj.body()[128:132] == b"DICM"
            assert ds.file_meta.TransferSyntaxUID == obj.transfer_syntax
            assert ds.file_meta.MediaStorageSOPInstanceUID == obj.sop_uid


def test_cached_header_encoding_equals_dcmwrite(tiny: list[SyntheticObject]) -> None:
    """dicom_bytes encodes headers element by element for speed; it must match dcmwrite."""
    for obj in tiny:
        if obj.kind == "other":
            continue
        img = obj._make.args[0]  # the Image behind the partial
        ds = Dataset()
        for tag, vr, value in dicom_bytes.elements(img):
            ds.add_new(tag, vr, dicom_bytes.to_pydicom(vr, value))
        buf = io.BytesIO()
        if img.preamble:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = img.sop_class
            ds.file_meta.MediaStorageSOPInstanceUID = img.sop_uid
            ds.file_meta.TransferSyntaxUID = img.transfer_syntax
            ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
            ds.file_meta.ImplementationVersionName = "CLOUDEXIT_SYN"
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        else:
            pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
        assert dicom_bytes.header(img) == buf.getvalue(), obj.key


def test_transfer_syntaxes_mixed_and_encapsulation_valid(tiny: list[SyntheticObject]) -> None:
    dicom = [o for o in tiny if o.kind == "dicom"]
    syntaxes = {UID(o.transfer_syntax) for o in dicom}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"} <= syntaxes
    encapsulated = [o for o in dicom if UID(o.transfer_syntax).is_encapsulated]
    assert encapsulated
    for obj in encapsulated:
        ds = read(obj)
        frames = list(generate_frames(ds.PixelData, number_of_frames=ds.get("NumberOfFrames", 1)))
        assert len(frames) == ds.get("NumberOfFrames", 1)
        assert all(f.startswith(b"\xff\xd8") and f.endswith(b"\xff\xd9") for f in frames)


def test_native_pixel_data_has_full_size(tiny: list[SyntheticObject]) -> None:
    for obj in tiny:
        if obj.kind == "dicom" and not UID(obj.transfer_syntax).is_encapsulated:
            ds = read(obj)
            expected = ds.Rows * ds.Columns * ds.BitsAllocated // 8 * ds.get("NumberOfFrames", 1)
            assert len(ds.PixelData) == expected, obj.key


def test_no_preamble_really_lacks_dicm(tiny: list[SyntheticObject]) -> None:
    (obj,) = by_case(tiny, "no-preamble")
    body = obj.body()
    assert body[128:132] != b"DICM" and b"DICM" not in body[:1024]
    assert body[:4] == b"\x08\x00\x05\x00"  # starts right at the dataset (SpecificCharacterSet)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(io.BytesIO(body))
    assert read(obj).SOPInstanceUID == obj.sop_uid


def test_big_header_exceeds_64k(tiny: list[SyntheticObject]) -> None:
    (obj,) = by_case(tiny, "big-header")
    assert pixel_data_offset(obj.body()) > 64 * 1024


def test_truncated_is_really_truncated(tiny: list[SyntheticObject]) -> None:
    (obj,) = by_case(tiny, "truncated")
    body = obj.body()
    offset = pixel_data_offset(body)
    vr, declared = struct.unpack_from("<2s2xI", body, offset + 4)  # explicit VR element header
    assert vr == b"OW"
    available = len(body) - (offset + 12)
    assert 0 < available < declared
    ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
    assert declared == ds.Rows * ds.Columns * 2
    assert ds.SOPInstanceUID == obj.sop_uid  # header is intact


def test_zero_byte_and_non_dicom(tiny: list[SyntheticObject]) -> None:
    (empty,) = by_case(tiny, "zero-byte")
    assert empty.size == 0 and empty.body() == b""
    bodies = {o.key: o.body() for o in by_case(tiny, "non-dicom")}
    assert any(b.startswith(b"\x89PNG\r\n\x1a\n") for b in bodies.values())
    assert "README.txt" in bodies
    for body in bodies.values():
        with pytest.raises(pydicom.errors.InvalidDicomError):
            pydicom.dcmread(io.BytesIO(body))


def test_ct_slice_size_at_matrix_512() -> None:
    objs = list(generate(Profile.ct_bench(3)))
    assert len(objs) == 3 and {o.modality for o in objs} == {"CT"}
    for obj in objs:
        assert 512 * 512 * 2 < obj.size < 512 * 512 * 2 + 4096
    assert len(objs[0].body()) == objs[0].size


def test_multiframe_is_large_and_multipart() -> None:
    p = Profile(patients=1, studies_per_patient=1, ct_matrix=16, cr_matrix=16,
                multiframe_objects=2, multiframe_bytes=6 * 2**20, awkward=False)
    multi = [o for o in generate(p) if o.case == "multiframe"]
    assert [o.modality for o in multi] == ["XA", "MR"]
    for obj in multi:
        assert obj.multipart
        assert 0.9 * 6 * 2**20 < obj.size < 1.1 * 6 * 2**20
        assert read(obj).NumberOfFrames > 1
    assert not any(o.multipart for o in generate(p) if o.case != "multiframe")


def test_non_ascii_names_round_trip(tiny: list[SyntheticObject]) -> None:
    seen = {}
    for obj in tiny:
        if obj.kind != "dicom":
            continue
        ds = pydicom.dcmread(io.BytesIO(obj.body()), force=True)
        charset = ds.get("SpecificCharacterSet")
        raw = ds.get_item("PatientName").value  # still undecoded bytes
        name = str(ds.PatientName)
        assert name in synthetic.PATIENT_NAMES
        if charset == "GB18030":
            assert re.search(r"[\u4e00-\u9fff]", name)
            assert raw.rstrip(b" ") == name.encode("gb18030")
        elif charset == "ISO_IR 192":
            assert not name.isascii()
            assert raw.rstrip(b" ") == name.encode("utf-8")
        else:
            assert charset is None and name.isascii()
        # Survives a write/read cycle with the same characters.
        buf = io.BytesIO()
        ds.save_as(buf)
        assert str(pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True).PatientName) == name
        seen[charset] = name
    assert set(seen) == {None, "GB18030", "ISO_IR 192"}


def test_layouts(tiny: list[SyntheticObject]) -> None:
    normal = [o for o in tiny if o.case == "normal"]
    uid_re = r"[0-9.]+"
    layouts = Counter()
    for obj in normal:
        if re.fullmatch(rf"{uid_re}/{uid_re}/{uid_re}\.dcm", obj.key):
            assert obj.key == f"{obj.study_uid}/{obj.series_uid}/{obj.sop_uid}.dcm"
            layouts["uid"] += 1
        elif m := re.fullmatch(r"(\d{4})/(\d\d)/(\d\d)(/[0-9A-F]{8}){3}", obj.key):
            assert "".join(m.groups()[:3]) == obj.study_date
            assert obj.sop_uid not in obj.key and obj.study_uid not in obj.key
            layouts["dcm4chee"] += 1
        else:
            stem = obj.key.removesuffix(".dcm")
            assert obj.key.endswith(".dcm") and str(uuid.UUID(stem)) == stem, obj.key
            layouts["orthanc"] += 1
    assert set(layouts) == {"uid", "dcm4chee", "orthanc"}

    sidecars = by_case(tiny, "sidecar-json")
    dcm_keys = {o.key: o for o in tiny if o.kind == "dicom"}
    for side in sidecars:
        instance = dcm_keys[side.key.removesuffix(".json") + ".dcm"]
        assert side.sop_uid == instance.sop_uid
        assert instance.sop_uid in side.body().decode("utf-8")


def test_hostile_keys_hold_valid_dicom(tiny: list[SyntheticObject]) -> None:
    hostile = by_case(tiny, "hostile-key")
    assert {o.key for o in hostile} == set(HOSTILE_KEYS)
    assert any("..hidden" in o.key for o in hostile)
    assert any(o.key.startswith("C:/") for o in hostile)
    assert any(re.search(r"[\u4e00-\u9fff]", o.key) for o in hostile)
    for obj in hostile:
        assert read(obj).SOPInstanceUID == obj.sop_uid


def test_dup_sop_conflict(tiny: list[SyntheticObject]) -> None:
    a, b = by_case(tiny, "dup-sop-conflict")
    assert a.sop_uid == b.sop_uid and a.key != b.key
    assert a.body() != b.body()
    assert read(a).SOPInstanceUID == read(b).SOPInstanceUID == a.sop_uid


def test_profile_presets_and_validation() -> None:
    tiny_mb = sum(o.size for o in generate(Profile.tiny())) / 1e6
    demo_mb = sum(o.size for o in generate(Profile.demo())) / 1e6
    assert tiny_mb < 10 and 50 < demo_mb < 100
    with pytest.raises(ValueError):
        Profile(layouts=("s3fs",))
    with pytest.raises(ValueError):
        Profile(ct_matrix=63)


# --- upload() against a real S3 server ---------------------------------------

@pytest.fixture
def s3_client_and_bucket(s3, bucket):
    """A fresh bucket name on the session's SeaweedFS (upload() creates it)."""
    return s3.client(), bucket + "-syn"


def test_upload_matches_ground_truth(s3_client_and_bucket) -> None:
    client, bucket = s3_client_and_bucket
    part_size = 5 * 2**20
    truth = upload(client, bucket, generate(Profile.tiny()), workers=8, part_size=part_size)
    assert truth == list(generate(Profile.tiny()))

    listed = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            listed[item["Key"]] = (item["Size"], item["ETag"].strip('"'))
    assert set(listed) == {o.key for o in truth}
    for obj in truth:
        size, etag = listed[obj.key]
        assert size == obj.size, obj.key
        assert etag == expected_etag(obj, part_size), obj.key
        if obj.multipart:
            assert etag.endswith(f"-{-(-obj.size // part_size)}") and obj.size > part_size
        else:
            assert etag == hashlib.md5(obj.body()).hexdigest()

    hostile = next(o for o in truth if o.key == "影像/张三 study/1.dcm")
    got = client.get_object(Bucket=bucket, Key=hostile.key)
    assert got["Body"].read() == hostile.body()
    assert got["ContentType"] == "application/dicom"


def test_upload_rejects_small_parts() -> None:
    with pytest.raises(ValueError):
        upload(object(), "bucket", [], part_size=2**20)
