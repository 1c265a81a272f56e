"""Header classification: the dicomscan fast path gives exactly what pydicom gives."""

from __future__ import annotations

import pytest

from cloudexit.dicom import header as dicom
from cloudexit.testing import synthetic


def _cases() -> list[tuple[str, bytes, int]]:
    out = []
    for obj in synthetic.generate(synthetic.Profile.tiny()):
        body = obj.body()
        for length in (132, 4096, 64 * 1024, len(body)):
            out.append((f"{obj.key}[:{length}]", body[:length], len(body)))
    return out


def test_fast_path_agrees_with_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field (the patient hash depends on patient_id) on every synthetic case, which has
    GB18030 and UTF-8 patients, truncated, broken and non-DICOM objects."""
    cases = _cases()
    fast = [dicom.classify(data, size) for _, data, size in cases]
    used = sum(dicom._scan(data, size) is not None for _, data, size in cases)
    monkeypatch.setattr(dicom, "_scan", lambda data, size: None)
    slow = [dicom.classify(data, size) for _, data, size in cases]
    assert used > len(cases) // 3  # the fast path does the common case
    for (name, _, _), a, b in zip(cases, fast, slow):
        if a.need_more and b.need_more:
            continue  # both read more first; the reason text of an interim answer is not kept
        assert a == b, name


def test_non_ascii_patient_goes_to_pydicom() -> None:
    import io

    import pydicom

    obj = next(o for o in synthetic.generate(synthetic.Profile.tiny())
               if o.kind == "dicom" and o.case == "normal")
    ds = pydicom.dcmread(io.BytesIO(obj.body()))
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientID = "\u5f20\u4e09-001"
    out = io.BytesIO()
    ds.save_as(out)
    body = out.getvalue()
    assert dicom._scan(body, len(body)) is None
    assert dicom.classify(body, len(body)).patient_id == "\u5f20\u4e09-001"
