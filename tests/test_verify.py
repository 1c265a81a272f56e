"""`cloudexit verify` on real parts: a migrated archive (SeaweedFS -> folder through the CLI), and
Orthanc filled through the C-STORE and STOW-RS stores."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydicom import dcmread

from cloudexit.testing import synthetic
from cloudexit import verify as verify_module
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.state.db import State
from cloudexit.stores import Item
from cloudexit.stores.cstore import open_store as open_cstore
from cloudexit.stores.dicomweb import open_store as open_dicomweb
from orthanc import OrthancServer


def run(*args: str, env: dict[str, Any] | None = None) -> Result:
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def migrated(s3: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny synthetic PACS inventoried and migrated into a folder, through the CLI."""
    bucket = f"verify-{os.getpid()}"
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    base = tmp_path_factory.mktemp("verify")
    db, archive = base / "state" / "cloudexit.db", base / "archive"
    env = {**s3.env(), "AWS_PROFILE": None}
    assert run("inventory", f"s3://{bucket}", "--db", str(db), "-q", env=env).exit_code == 0
    result = run("migrate", "--to", str(archive), "--db", str(db), "-q", env=env)
    assert result.exit_code == 3, result.output  # the truncated object and the conflict: quarantined
    return db, archive


def test_a_copy_landing_after_a_fast_verify_is_stamped_later(migrated: tuple[Path, Path], tmp_path: Path) -> None:
    """The deletion rule vouches for a copy that landed at or before the destination's last
    verify started (one-second stamps). A verify that starts and ends within one second would
    let a copy landing right after it share its start second and pass for vouched (the
    intermittent failure of test_delta_round_readiness_and_proof_of_deletion): verify reads only
    once its start second is over, so anything recorded after it carries a later stamp."""
    import shutil
    import time

    from cloudexit.state.db import now

    db = tmp_path / "cloudexit.db"
    shutil.copy(migrated[0], db)  # a copy: the module's other tests count the verify runs
    while time.time() % 1 > 0.2:  # start early in a second: the tiny verify would end within it
        time.sleep(0.01)
    assert run("verify", "--db", str(db), "-q").exit_code in (0, 3)
    after = now()  # what a copy landing now would be stamped
    started = _rows(db, "SELECT started_at FROM verify_runs ORDER BY id DESC LIMIT 1")[0]["started_at"]
    assert after > started, (after, started)


def _archived_items(db: Path, archive: Path) -> list[tuple[Item, str]]:
    with State(db) as state:
        rows = state.query(
            "SELECT t.key, t.path, t.size, t.sha256, o.kind, o.sop_uid, o.sop_class_uid, o.study_uid, "
            "o.series_uid, o.transfer_syntax FROM transfers t JOIN objects o ON o.key = t.key "
            "WHERE t.state = 'verified' AND o.kind = 'dicom' ORDER BY t.seq")
    return [(Item(key=r["key"], size=r["size"], sha256=r["sha256"], kind=r["kind"], sop_uid=r["sop_uid"],
                  sop_class_uid=r["sop_class_uid"], study_uid=r["study_uid"], series_uid=r["series_uid"],
                  transfer_syntax=r["transfer_syntax"]), str(archive / r["path"])) for r in rows]


def _rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_archive_verifies(migrated: tuple[Path, Path]) -> None:
    db, _ = migrated
    result = run("verify", "--db", str(db), "--deep", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["verified"] is True
    (dest,) = doc["destinations"]
    assert dest["kind"] == "filesystem" and dest["status"] == "passed" and dest["findings"] == []
    assert dest["counts"]["files_checked"] == dest["counts"]["files_ok"] == dest["counts"]["files_rehashed"]
    assert dest["counts"]["expected_instances"] == dest["counts"]["found_instances"] == 22
    assert {s["status"] for s in dest["studies"]} == {"ok"} and len(dest["studies"]) == 3
    (run_row,) = _rows(db, f"SELECT * FROM verify_runs WHERE id = {dest['run']}")
    assert run_row["status"] == "passed" and json.loads(run_row["options"])["deep"] is True
    assert len(_rows(db, f"SELECT * FROM verify_studies WHERE run_id = {dest['run']}")) == 3
    text = run("verify", "--db", str(db))
    assert text.exit_code == 0 and "verified" in text.output and "studies 3/3 match" in text.output


@pytest.mark.parametrize("page", [2000, pytest.param(2, marks=pytest.mark.slow)])  # page 2: over 3 s
def test_tampered_archive(migrated: tuple[Path, Path], page: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file, a flipped byte and a stray file are each found; also when the files are
    read two rows at a time (the paging that keeps memory flat on a million-file archive)."""
    monkeypatch.setattr(verify_module, "_PAGE", page)
    db, archive = migrated
    items = _archived_items(db, archive)
    gone, flipped = Path(items[0][1]), Path(items[1][1])
    saved = gone.read_bytes(), flipped.read_bytes()
    times = [(st.st_atime_ns, st.st_mtime_ns) for st in (gone.stat(), flipped.stat())]
    extra = archive / "stray.dcm"
    try:
        gone.unlink()
        data = bytearray(saved[1])
        data[-1] ^= 0xFF  # same size: only a re-hash sees it
        flipped.write_bytes(bytes(data))
        extra.write_bytes(b"not ours")
        quick = run("verify", "--db", str(db), "--json")
        assert quick.exit_code == 3
        findings = json.loads(quick.output)["destinations"][0]["findings"]
        problems = {(f["level"], f["problem"]) for f in findings}
        # The flipped file kept its size; its modification time gives it away without a re-hash.
        assert problems == {("file", "missing"), ("file", "extra"), ("file", "mtime"), ("study", "count")}
        assert [f["key"] for f in findings if f["problem"] == "mtime"] == [items[1][0].key]
        deep = run("verify", "--db", str(db), "--deep", "--json")
        findings = json.loads(deep.output)["destinations"][0]["findings"]
        assert deep.exit_code == 3
        sha = [f for f in findings if f["problem"] == "sha256"]
        assert len(sha) == 1 and sha[0]["key"] == items[1][0].key
        assert any(f["problem"] == "extra" and f["path"] == "stray.dcm" for f in findings)
        assert run("verify", "--db", str(db)).output.count("DIFFERENCES FOUND") == 1
    finally:
        gone.write_bytes(saved[0])
        flipped.write_bytes(saved[1])
        for path, ns in zip((gone, flipped), times):
            os.utime(path, ns=ns)
        extra.unlink(missing_ok=True)


def test_deep_verify_records_the_times_quick_checks_compare(migrated: tuple[Path, Path]) -> None:
    """Files placed before schema 7 have no recorded time: a --deep run that proves their bytes
    records it, and a quick verify then catches a file replaced with the same size."""
    db, archive = migrated
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE transfers SET mtime_ns = NULL")
    conn.close()
    deep = run("verify", "--db", str(db), "--deep", "--json")
    assert deep.exit_code == 0, deep.output
    counts = json.loads(deep.output)["destinations"][0]["counts"]
    recorded = [r["mtime_ns"] for r in _rows(db, "SELECT mtime_ns FROM transfers WHERE path IS NOT NULL "
                                                 "AND state IN ('verified', 'quarantined')")]
    assert counts["files_mtime_recorded"] == len(recorded) and None not in recorded
    path = Path(_archived_items(db, archive)[0][1])
    saved, st = path.read_bytes(), path.stat()
    try:
        path.write_bytes(saved)  # same bytes, same size, a new time: only the time tells
        quick = run("verify", "--db", str(db), "--json")
        assert quick.exit_code == 3
        assert [f["problem"] for f in json.loads(quick.output)["destinations"][0]["findings"]
                if f["level"] == "file"] == ["mtime"]
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run("verify", "--db", str(db)).exit_code == 0


@pytest.mark.slow
def test_pacs_counts_by_c_find(migrated: tuple[Path, Path], pacs: OrthancServer) -> None:
    db, archive = migrated
    items = _archived_items(db, archive)
    store = open_cstore(pacs.dicom_url)
    assert all(store.deliver(*pair).ok for pair in items)
    store.close()
    result = run("verify", "--db", str(db), "--to", pacs.dicom_url, "--sample", "5", "--seed", "7", "--json")
    assert result.exit_code == 0, result.output
    dest = json.loads(result.output)["destinations"][0]
    assert dest["kind"] == "dicom" and dest["status"] == "passed"
    assert dest["counts"]["found_instances"] == 22
    assert [s["result"] for s in dest["samples"]] == ["identical"] * 5
    assert all(s["found_series"] == s["expected_series"] for s in dest["studies"])

    victim = items[3][0]
    pacs.delete_instance(victim.sop_uid or "")
    result = run("verify", "--db", str(db), "--to", pacs.dicom_url, "--json")
    assert result.exit_code == 3
    findings = json.loads(result.output)["destinations"][0]["findings"]
    assert {"level": "instance", "problem": "missing", "study_uid": victim.study_uid,
            "series_uid": victim.series_uid, "sop_uid": victim.sop_uid} in findings
    assert any(f["level"] == "study" and f["problem"] == "count" and f["expected"] == str(int(f["found"]) + 1)
               for f in findings)
    rows = _rows(db, "SELECT * FROM verify_findings WHERE problem = 'missing' AND level = 'instance'")
    assert rows and rows[-1]["sop_uid"] == victim.sop_uid


@pytest.mark.slow  # a PACS filled and queried: over 3 s
def test_pacs_by_qido(migrated: tuple[Path, Path], pacs: OrthancServer) -> None:
    db, archive = migrated
    items = _archived_items(db, archive)
    store = open_dicomweb(pacs.dicomweb_url)
    assert all(d.ok for d in store.deliver_many(items))
    store.close()
    result = run("verify", "--db", str(db), "--to", pacs.dicomweb_url, "--sample", "3", "--json")
    assert result.exit_code == 0, result.output
    dest = json.loads(result.output)["destinations"][0]
    assert dest["kind"] == "dicomweb" and dest["counts"]["found_instances"] == 22
    assert [s["result"] for s in dest["samples"]] == ["identical"] * 3

    study = items[0][0].study_uid or ""
    for patient in pacs.rest("GET", "/patients"):
        studies = pacs.rest("GET", f"/patients/{patient}/studies")
        for s in studies:
            if s["MainDicomTags"]["StudyInstanceUID"] == study:
                pacs.rest("DELETE", f"/studies/{s['ID']}")
    result = run("verify", "--db", str(db), "--to", pacs.dicomweb_url, "--json")
    assert result.exit_code == 3
    dest = json.loads(result.output)["destinations"][0]
    assert [(f["level"], f["problem"], f["study_uid"]) for f in dest["findings"]] == [("study", "missing", study)]
    assert {s["study_uid"]: s["status"] for s in dest["studies"]}[study] == "missing"
    text = run("verify", "--db", str(db), "--to", pacs.dicomweb_url)
    for name in synthetic.PATIENT_NAMES:
        assert name not in text.output


@pytest.mark.slow
def test_sample_reports_what_differs(migrated: tuple[Path, Path], pacs: OrthancServer, tmp_path: Path) -> None:
    """Without a recorded conflict, the rewritten copy is sampled and every change is named."""
    db, archive = migrated
    items = _archived_items(db, archive)
    item, path = next((i, p) for i, p in items if i.transfer_syntax == "1.2.840.10008.1.2.1")
    ds = dcmread(path)
    ds.PatientName = "REWRITTEN^BY^PACS"
    ds.SeriesDescription = "RENAMED"
    pixels = bytearray(ds.PixelData)
    pixels[0] ^= 0x01
    ds.PixelData = bytes(pixels)
    rewritten = tmp_path / "rewritten.dcm"
    ds.save_as(rewritten)
    pacs.rest("POST", "/instances", rewritten.read_bytes())
    store = open_cstore(pacs.dicom_url)
    for pair in items:
        store.deliver(*pair)
    store.close()
    result = run("verify", "--db", str(db), "--to", pacs.dicom_url, "--sample", "1000", "--json")
    assert result.exit_code == 3
    samples = {s["sop_uid"]: s for s in json.loads(result.output)["destinations"][0]["samples"]}
    odd = samples[item.sop_uid]
    assert odd["result"] == "differs" and odd["pixel"] == "differs"
    changes = {d["keyword"]: d for d in odd["differences"]}
    assert set(changes) == {"PatientName", "SeriesDescription"}
    assert "archived" not in changes["PatientName"]  # identifying values are never shown
    assert "REWRITTEN" not in result.output
    text = run("verify", "--db", str(db), "--to", pacs.dicom_url, "--sample", "1000")
    assert "PatientName changed" in text.output and "pixel data differs" in text.output


def test_usage_errors(migrated: tuple[Path, Path], tmp_path: Path) -> None:
    db, archive = migrated
    assert run("verify", "--db", str(db), "--to", str(archive), "--sample", "3").exit_code == 2
    empty = tmp_path / "empty.db"
    State(empty, create=True).close()
    result = run("verify", "--db", str(empty))
    assert result.exit_code == 2 and "nothing to verify" in result.output


@pytest.mark.slow
def test_sample_with_the_archive_first_samples_the_pacs_only(migrated: tuple[Path, Path],
                                                             pacs: OrthancServer) -> None:
    db, archive = migrated
    items = _archived_items(db, archive)
    store = open_cstore(pacs.dicom_url)
    assert all(store.deliver(*pair).ok for pair in items)
    store.close()
    result = run("verify", "--db", str(db), "--to", str(archive), "--to", pacs.dicom_url,
                 "--deep", "--sample", "5", "--json")
    assert result.exit_code == 0, result.output
    folder, dicom = json.loads(result.output)["destinations"]
    assert folder["kind"] == "filesystem" and folder["samples"] == []
    assert [s["result"] for s in dicom["samples"]] == ["identical"] * 5
    alone = run("verify", "--db", str(db), "--to", str(archive), "--sample", "5")
    assert alone.exit_code == 2 and "no destination here is one" in alone.output
