"""`verify` against an Orthanc that lets any calling AE title store but only registered ones
query (DicomAlwaysAllowStore true, DicomAlwaysAllowFind false, CLOUDEXIT not in DicomModalities):
it says what most likely happened and what to do, and asks QIDO-RS when it knows the PACS's
DICOMweb URL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cloudexit.testing import synthetic
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer
from orthanc import ORTHANC, OrthancServer


@pytest.fixture(scope="module")
def store_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not os.path.exists(ORTHANC):
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    with OrthancServer(tmp_path_factory.mktemp("store-only"), DicomAlwaysAllowStore=True,
                       DicomAlwaysAllowFind=False, DicomModalities={}) as server:
        yield server


def _run(env: dict[str, Any], *args: str) -> Result:
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def _migrated(s3: SeaweedServer, tmp: Path, *pacs: str) -> tuple[dict[str, Any], Path]:
    bucket = f"find-{os.getpid()}-{len(pacs)}"
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=2, ct_matrix=32,
                                cr_per_study=1, cr_matrix=32, multiframe_objects=0, layouts=("uid",),
                                awkward=False)
    synthetic.upload(s3.client(), bucket, synthetic.generate(profile))
    env = {**s3.env(), "AWS_PROFILE": None, "CLOUDEXIT_DB": None}
    db = tmp / "cloudexit.db"
    assert _run(env, "inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    tos = [a for url in (str(tmp / "archive"), *pacs) for a in ("--to", url)]
    done = _run(env, "migrate", *tos, "--db", str(db), "-q")
    assert done.exit_code == 0, done.output  # C-STORE from any AE title is accepted
    return env, db


@pytest.mark.slow
def test_a_refused_c_find_is_named_with_what_to_do(s3: SeaweedServer, store_only: OrthancServer,
                                                  tmp_path: Path) -> None:
    env, db = _migrated(s3, tmp_path, store_only.dicom_url)
    result = _run(env, "verify", "--db", str(db), "--to", store_only.dicom_url)
    assert result.exit_code == 1, result.output
    assert "stopped answering" not in result.output
    assert "is up (it answers C-ECHO) but closed the association on our C-FIND" in result.stderr
    assert "calling AE title CLOUDEXIT" in result.stderr
    assert "DicomModalities" in result.stderr and "DicomAlwaysAllowFind" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_refused_c_find_falls_back_to_qido_rs(s3: SeaweedServer, store_only: OrthancServer,
                                               tmp_path: Path) -> None:
    store_only.clear()
    env, db = _migrated(s3, tmp_path, store_only.dicom_url, store_only.dicomweb_url)
    result = _run(env, "verify", "--db", str(db), "--to", store_only.dicom_url, "--json")
    assert result.exit_code == 0, result.output
    assert f"verifying through its DICOMweb URL {store_only.dicomweb_url} (QIDO-RS) instead" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["verified"] is True
    assert [d["dest"] for d in doc["destinations"]] == [store_only.dicomweb_url]


@pytest.mark.slow
def test_a_refused_c_get_of_a_sample_is_named_too(s3: SeaweedServer, tmp_path: Path) -> None:
    """Queries allowed, retrieval not (DicomAlwaysAllowGet false): --sample says so."""
    if not os.path.exists(ORTHANC):
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    with OrthancServer(tmp_path / "no-get", DicomAlwaysAllowGet=False, DicomModalities={}) as no_get:
        env, db = _migrated(s3, tmp_path, no_get.dicom_url)
        result = _run(env, "verify", "--db", str(db), "--to", no_get.dicom_url, "--sample", "2")
    # The counts pass; each sample is not compared, and says why (exit 3: not verified).
    assert result.exit_code == 3, result.output
    assert "could not fetch it back: the PACS at" in result.output
    assert "closed the association on our C-GET" in result.output
    assert "DicomAlwaysAllowGet" in result.output and "stopped answering" not in result.output
