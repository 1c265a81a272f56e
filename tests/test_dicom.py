"""Header classification on crafted bytes (pure functions; no server needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from cloudexit.testing import synthetic
from cloudexit.dicom.header import classify, patient_hash
from cloudexit.core.paths import key_flags, safe_relative_path


def _dicom(pixels: int = 1000, ts: str = ExplicitVRLittleEndian, preamble: bool = True,
           extra: int = 0) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate, ds.PatientID = "CT", "20200101", "P1"
    if extra:
        ds.add_new(0x00091010, "OB", b"\0" * extra)  # private data making the header long
    ds.PixelData = b"\1" * pixels
    ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble, implicit_vr=ts == ImplicitVRLittleEndian,
               little_endian=True)
    return buf.getvalue()


def test_plain_dicom() -> None:
    data = _dicom()
    h = classify(data, len(data))
    assert h.kind == "dicom" and h.modality == "CT" and h.transfer_syntax == ExplicitVRLittleEndian


def test_implicit_vr_and_no_preamble() -> None:
    data = _dicom(ts=ImplicitVRLittleEndian, preamble=False)
    assert data[128:132] != b"DICM"
    h = classify(data, len(data))
    assert h.kind == "dicom" and h.sop_uid


def test_truncated_pixel_data_is_unreadable() -> None:
    data = _dicom(pixels=4000)
    h = classify(data[:-1000], len(data) - 1000)
    assert h.kind == "unreadable" and "truncated" in (h.reason or "")


def test_long_header_asks_for_more_then_parses() -> None:
    data = _dicom(extra=100_000)
    assert classify(data[:65536], len(data)).need_more
    assert classify(data, len(data)).kind == "dicom"


def test_first_bytes_suffice_when_pixel_data_is_reached() -> None:
    data = _dicom(pixels=2_000_000)
    h = classify(data[:65536], len(data))
    assert h.kind == "dicom" and not h.need_more and h.header_length and h.header_length < 1000


@pytest.mark.parametrize("data,reason", [
    (b"", "empty object"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "PNG"),
    (b'{"0020000D": {"vr": "UI"}}', "JSON"),
    (b"hello world, this is a readme file" * 10, "not DICOM"),
])
def test_other_objects(data: bytes, reason: str) -> None:
    h = classify(data, len(data))
    assert h.kind == "other" and reason in (h.reason or "")


def test_garbage_after_dicm_is_unreadable() -> None:
    data = b"\0" * 128 + b"DICM" + b"\xff" * 300
    h = classify(data, len(data))
    assert h.kind == "unreadable"


def test_patient_hash_is_salted_and_stable() -> None:
    assert patient_hash("s1", "P1") == patient_hash("s1", "P1 ")
    assert patient_hash("s1", "P1") != patient_hash("s2", "P1")
    assert "P1" not in (patient_hash("s1", "P1") or "")
    assert patient_hash("s1", None) is None


@pytest.mark.parametrize("key,flags", [
    ("study/series/1.dcm", []),
    ("../../etc/passwd", ["dot-segment"]),
    ("a/./b", ["dot-segment"]),
    ("/etc/passwd", ["absolute", "empty-segment"]),
    ("C:\\Windows\\x", ["absolute", "backslash"]),
    ("a\\..\\b", ["dot-segment", "backslash"]),
    ("a//b", ["empty-segment"]),
    ("bell\x07", ["control-char"]),
    ("scan\u202egpj.exe", ["control-char"]),
    ("a/\u2066b\u2069", ["control-char"]),
    ("c1\x85", ["control-char"]),
    ("x" * 300, ["too-long"]),
    ("影像/张三 study/1.dcm", []),
])
def test_key_flags(key: str, flags: list[str]) -> None:
    assert key_flags(key) == flags


@pytest.mark.parametrize("key", ["../../etc/passwd", "/abs/x", "a/../../b", "C:\\x\\..\\..\\y",
                                 "..", ".", "a//b", "x" * 600, "a/\x00/b", "影像/../张三"])
def test_safe_relative_path_stays_inside(tmp_path, key: str) -> None:
    rel = safe_relative_path(key)
    assert not rel.is_absolute()
    assert ".." not in rel.parts and "." not in rel.parts
    target = (tmp_path / rel).resolve()
    assert target.is_relative_to(tmp_path.resolve())
    assert all(len(p.encode()) <= 255 for p in rel.parts)


@pytest.mark.parametrize("char", [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))])
def test_bidi_controls_are_escaped_in_file_names(char: str) -> None:
    """A bidi override in a key would show a file name in another order than it is."""
    rel = str(safe_relative_path(f"scan{char}gpj.exe"))
    assert char not in rel
    assert rel == "scan" + "".join(f"%{b:02X}" for b in char.encode()) + "gpj.exe"
    assert safe_relative_path("scan\u202egpj.exe") != safe_relative_path("scan%E2%80%AEgpj.exe")


def test_safe_relative_paths_keep_distinct_keys_distinct() -> None:
    keys = ["a/../b", "a/%2E%2E/b", "a/b", "a//b", "x" * 300, "x" * 299 + "y"]
    paths = [safe_relative_path(k) for k in keys]
    assert len(set(paths)) == len(paths)


# A cold interpreter parses truncated headers (they go to pydicom, not the fast path) on 64
# threads that start a few ms apart, so that some begin while another is inside pydicom's
# __init__. Before `preload` took a lock, 8 runs of 10 failed with an ImportError.
_RACE = """
import sys, threading, time, pathlib
from cloudexit.dicom import header as dicom
assert "pydicom" not in sys.modules
cases = [(p.read_bytes(), int(p.stem.split("-")[1])) for p in pathlib.Path(sys.argv[1]).iterdir()]
errors = []
def work(i):
    time.sleep(i * 0.004)
    try:
        for data, size in cases:
            h = dicom.classify(data, size)
            if "import" in (h.reason or "").lower():
                errors.append(h.reason)
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors[0] if errors else "ok")
"""


@pytest.mark.slow
def test_threads_importing_pydicom_from_cold_do_not_race(tmp_path: Path) -> None:
    """Probabilistic: 5 cold interpreters; each failed 8 times in 10 without the fix."""
    import subprocess
    import sys

    bodies = [o.body() for o in synthetic.generate(synthetic.Profile.tiny()) if o.kind == "dicom"][:8]
    for n, body in enumerate(bodies):
        cut = 300 + 37 * n  # a truncated object: the header ends mid-element
        (tmp_path / f"{n}-{cut}").write_bytes(body[:cut])
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", _RACE, str(tmp_path)], check=False,
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "ok", out.stdout + out.stderr
