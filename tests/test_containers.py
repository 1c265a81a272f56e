"""Buckets as a PACS wrote them: a real Orthanc with `"StorageCompression": true` stores
generated instances, its storage area goes to SeaweedFS under the object-storage plugin's key
layouts, and cloudexit must find the instances inside, migrate them decoded and deliver them to
a second Orthanc. Broken envelopes (a zlib stream cut short or damaged, Orthanc's encryption,
a gzip whose CRC is wrong) are each a clear per-object result, never a silent non-DICOM."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows

from cloudexit.testing import synthetic
from cloudexit.dicom.containers import DecodeError, classify_object, decode_file, sniff
from cloudexit.testing.s3server import SeaweedServer
from orthanc import ORTHANC, OrthancServer


@dataclass
class OrthancStorage:
    """What a compressed Orthanc left on disk, and what it holds."""

    files: dict[str, tuple[bytes, str, str]]  # uuid -> (stored bytes, SOP Instance UID, attachment)
    instances: dict[str, bytes]  # SOP Instance UID -> the DICOM file Orthanc returns
    studies: set[str]  # Study Instance UIDs


def _profile() -> synthetic.Profile:
    return synthetic.Profile(patients=2, studies_per_patient=1, ct_series_per_study=1,
                             ct_slices_per_series=3, ct_matrix=64, cr_per_study=1, cr_matrix=128,
                             multiframe_objects=0, awkward=False)


@pytest.fixture(scope="module")
def orthanc_storage(tmp_path_factory: pytest.TempPathFactory) -> OrthancStorage:
    if not os.path.exists(ORTHANC):
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-compressed"), aet="WRITER",
                           options={"StorageCompression": True})
    with server:
        for obj in synthetic.generate(_profile()):
            if obj.kind == "dicom":
                server.rest("POST", "/instances", obj.body())
        mapping = server.attachments()
        instances = {sop: server.stored_file(sop) for sop, _ in mapping.values()}
        studies = {server.rest("GET", f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
                   for s in server.rest("GET", "/studies")}
    files = {}
    for path in server.storage.rglob("*"):
        if path.name in mapping:
            files[path.name] = (path.read_bytes(), *mapping[path.name])
    assert len(files) == len(mapping) and len(instances) == 8
    return OrthancStorage(files, instances, studies)


_SUFFIX = {"dicom": ".dcm", "dicom-until-pixel-data": ".dcm.head"}


def upload_orthanc(s3: SeaweedServer, bucket: str, storage: OrthancStorage, layout: str) -> None:
    """The storage area as the object-storage plugin names it: `flat` ({uuid}{ext}, `.cmp`
    added to every other one as newer plugins do) or `legacy` (aa/bb/{uuid})."""
    client = s3.client()
    for n, (uuid, (data, _sop, name)) in enumerate(sorted(storage.files.items())):
        if layout == "flat":
            key = f"{uuid}{_SUFFIX[name]}" + (".cmp" if n % 2 else "")
        else:
            key = f"{uuid[:2]}/{uuid[2:4]}/{uuid}"
        client.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.parametrize("layout", ["flat", "legacy"])
def test_inventory_finds_the_instances_inside(cli: Any, s3: SeaweedServer, bucket: str, db: Path,
                                              orthanc_storage: OrthancStorage, layout: str) -> None:
    upload_orthanc(s3, bucket, orthanc_storage, layout)
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(cli("status", "--db", str(db), "--json").output)
    heads = sum(1 for _, _, name in orthanc_storage.files.values() if name != "dicom")
    assert heads > 0
    assert summary["dicom_instances"] == summary["dicom_objects"] == len(orthanc_storage.instances)
    assert summary["studies"] == len(orthanc_storage.studies)
    assert summary["pacs_metadata"] == heads
    assert summary["non_dicom"] == summary["unreadable"] == summary["duplicate_sop_uids"] == 0
    assert {r["encoding"] for r in rows(db, "SELECT encoding FROM objects")} == {"orthanc-zlib"}
    text = cli("status", "--db", str(db)).output
    assert "PACS metadata" in text and "orthanc-zlib" in text
    # The plan counts instances and studies, and what the compressed objects decode to.
    plan = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "100Mbit/s")
    assert plan.exit_code == 0, plan.output
    assert (f"{len(orthanc_storage.instances)} DICOM instances in {len(orthanc_storage.studies)} studies"
            in plan.output), plan.output
    assert "stored compressed by the PACS decode to" in plan.output


@pytest.mark.parametrize("protocol", ["dicom", "dicomweb"])
def test_migrate_orthanc_bucket_into_a_second_orthanc(cli: Any, s3: SeaweedServer, bucket: str,
                                                      db: Path, tmp_path: Path, pacs: OrthancServer,
                                                      orthanc_storage: OrthancStorage,
                                                      protocol: str) -> None:
    upload_orthanc(s3, bucket, orthanc_storage, "flat")
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    archive = tmp_path / "archive"
    target = pacs.dicom_url if protocol == "dicom" else pacs.dicomweb_url  # C-STORE or STOW-RS
    result = cli("migrate", "--to", str(archive), "--to", target, "--db", str(db), "--json")
    assert result.exit_code == 0, result.output
    # The archive holds each instance as plain DICOM at STUDY/SERIES/SOP.dcm, byte for byte the
    # file the first Orthanc was given; Orthanc's header copies went to the side area as stored.
    archived = rows(db, "SELECT t.*, o.study_uid, o.series_uid, o.sop_uid, o.pacs_metadata "
                        "FROM transfers t JOIN objects o ON o.key = t.key WHERE t.dest LIKE 'file://%'")
    instances = [r for r in archived if r["pacs_metadata"] is None]
    assert len(instances) == len(orthanc_storage.instances)
    for r in instances:
        assert r["state"] == "verified" and r["encoding"] == "orthanc-zlib", dict(r)
        assert r["path"] == f"{r['study_uid']}/{r['series_uid']}/{r['sop_uid']}.dcm"
        plain = (archive / r["path"]).read_bytes()
        assert plain == orthanc_storage.instances[r["sop_uid"]]
        assert r["sha256"] == hashlib.sha256(plain).hexdigest() and r["file_size"] == len(plain)
        raw = next(d for d, sop, name in orthanc_storage.files.values()
                   if sop == r["sop_uid"] and name == "dicom")
        assert r["raw_sha256"] == hashlib.sha256(raw).hexdigest()
        checks = set(r["checks"].split(","))
        assert {"md5", "zlib-adler32", "orthanc-declared-size", "dicom-sop-uid"} <= checks
    heads = [r for r in archived if r["pacs_metadata"]]
    assert heads and all(r["state"] == "verified" and r["path"].startswith("_non-dicom/")
                         and r["encoding"] is None for r in heads)
    # The second Orthanc holds every study and instance of the first.
    assert pacs.instance_count() == len(orthanc_storage.instances)
    found = {pacs.rest("GET", f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
             for s in pacs.rest("GET", "/studies")}
    assert found == orthanc_storage.studies
    for sop, data in orthanc_storage.instances.items():
        # The same dataset (the file meta records who sent it, so it differs).
        assert _dataset(pacs.stored_file(sop)) == _dataset(data)
    check = cli("verify", "--deep", "--db", str(db), "--json")
    assert check.exit_code == 0, check.output
    assert all(d["status"] == "passed" for d in json.loads(check.output)["destinations"])
    # The audit says which objects were decoded and how, and what the metadata copies are.
    out = tmp_path / "audit"
    assert cli("audit", "--db", str(db), "--out", str(out), "-q").exit_code == 0
    facts = json.loads((out / "audit.json").read_text())["containers"]
    assert facts["decoded"] == {"orthanc-zlib": len(instances)}
    assert facts["pacs_metadata"] == {"orthanc-dicom-until-pixel-data": len(heads)}
    with open(out / "manifest.csv", newline="") as fh:
        lines = [r for r in csv.DictReader(fh) if r["destination"].startswith("file://")]
    decoded = [r for r in lines if r["raw_sha256"]]
    assert len(decoded) == len(instances) and {r["encoding"] for r in decoded} == {"orthanc-zlib"}
    html = (out / "audit.html").read_text()
    assert "PACS metadata attachments" in html and "Instances decoded" in html
    # Every object (instances and Orthanc's header copies) is verified where it must be: the
    # decommission plan deletes them all, and records the SHA-256 of the plain file kept.
    dry = cli("decommission", "--db", str(db), "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["to_delete"] == len(orthanc_storage.files)


def _dataset(data: bytes) -> Any:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    return ds


# -- broken envelopes: each a clear per-object result --------------------------------------------
def _ct(matrix: int = 64, seed: int = 0) -> synthetic.SyntheticObject:
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_series_per_study=1,
                                ct_slices_per_series=1, ct_matrix=matrix, cr_per_study=0,
                                multiframe_objects=0, awkward=False, layouts=("uid",), seed=seed)
    return next(o for o in synthetic.generate(profile) if o.kind == "dicom")


def _orthanc(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + zlib.compress(data)


def _noisy(obj: synthetic.SyntheticObject) -> bytes:
    """The object with random pixel values (incompressible: the stream runs past 64 KiB)."""
    body = obj.body()
    return body[:-65536 * 2] + os.urandom(65536 * 2)


def test_classify_envelopes() -> None:
    body = _ct().body()
    packed = _orthanc(body)
    assert sniff(packed) == "orthanc-zlib" and sniff(gzip.compress(body)) == "gzip"
    assert sniff(body) is None
    whole = classify_object("x", packed, len(packed))
    assert whole.kind == "dicom" and whole.encoding == "orthanc-zlib" and whole.plain_size == len(body)
    assert classify_object("x.dcm.gz", gzip.compress(body), len(gzip.compress(body))).kind == "dicom"
    cut = packed[:len(packed) // 2]
    h = classify_object("x", cut, len(cut))
    assert h.kind == "unreadable" and "cut short" in (h.reason or ""), h
    wrong_size = struct.pack("<Q", len(body) + 5) + packed[8:]
    h = classify_object("x", wrong_size, len(wrong_size))
    assert h.kind == "unreadable" and "declares" in (h.reason or ""), h
    encrypted = b"A1" + b"\x01\x00\x00\x00" + os.urandom(400)
    h = classify_object("x.dcm.enc", encrypted, len(encrypted))
    assert h.kind == "unreadable" and h.encoding == "orthanc-encrypted"
    assert "cannot be read without the key" in (h.reason or "")
    bad_crc = bytearray(gzip.compress(body))
    bad_crc[-8] ^= 0xFF
    h = classify_object("x", bytes(bad_crc), len(bad_crc))
    assert h.kind == "unreadable" and "corrupt" in (h.reason or ""), h
    packed_zip = io.BytesIO()
    with zipfile.ZipFile(packed_zip, "w") as archive:
        archive.writestr("study/1.dcm", body)
        archive.writestr("study/README.txt", b"hello")
    h = classify_object("study.zip", packed_zip.getvalue(), len(packed_zip.getvalue()))
    assert h.kind == "unreadable" and h.encoding == "zip", h
    assert "zip archive of 2 files (1 DICOM by name): zipped studies are not unpacked" in str(h.reason)
    json_copy = _orthanc(b'{ "0008,0018" : { "Name" : "SOPInstanceUID", "Type" : "String" } }')
    h = classify_object("x.json", json_copy, len(json_copy))
    assert h.kind == "other" and h.pacs_metadata == "orthanc-dicom-as-json"
    plain_json = b'{"0008,0018": {"Name": "SOPInstanceUID", "Type": "String", "Value": "1.2"}}'
    h = classify_object("x.json", plain_json, len(plain_json))  # stored without compression
    assert h.kind == "other" and h.pacs_metadata == "orthanc-dicom-as-json" and h.encoding is None
    other = b'{"hello": 1}'
    assert classify_object("x.json", other, len(other)).pacs_metadata is None


def test_decode_file_checks_the_envelope(tmp_path: Path) -> None:
    body = _noisy(_ct(256))
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.write_bytes(_orthanc(body))
    done = decode_file("orthanc-zlib", str(raw), str(out))
    assert out.read_bytes() == body and done.sha256 == hashlib.sha256(body).hexdigest()
    two = gzip.compress(body[:1000]) + gzip.compress(body[1000:])  # concatenated members
    raw.write_bytes(two)
    assert decode_file("gzip", str(raw), str(out)).size == len(body) and out.read_bytes() == body
    for broken, why in ((_orthanc(body)[:-3000], "cut short"),
                        (_orthanc(body) + b"junk", "unexpected bytes"),
                        (struct.pack("<Q", 7) + zlib.compress(body), "declares 7 bytes")):
        raw.write_bytes(broken)
        with pytest.raises(DecodeError, match=why):
            decode_file("orthanc-zlib", str(raw), str(out))
        assert not out.exists()


@pytest.fixture
def broken_bucket(s3: SeaweedServer, bucket: str) -> Iterator[dict[str, bytes]]:
    noisy = _noisy(_ct(256, seed=1))
    damaged = bytearray(_orthanc(_noisy(_ct(256, seed=2))))
    damaged[-200] ^= 0xFF  # past what the inventory reads: only the whole stream shows it
    objects = {
        "good.dcm.gz": gzip.compress(_ct(seed=3).body()),
        # past the small-object loop (1 MiB) and past --large-object below: the other two paths
        "mid.dcm": _orthanc(_ct(768, seed=5).body()),
        "big.dcm.gz": gzip.compress(_ct(1024, seed=6).body()),
        "gzip-without-suffix": gzip.compress(noisy),
        "cut-short.dcm": _orthanc(_ct(seed=4).body())[:300],
        "damaged.dcm": bytes(damaged),
        "secret.dcm.enc": b"A1" + b"\x07\x00\x00\x00" + os.urandom(2000),
    }
    for key, data in objects.items():
        s3.client().put_object(Bucket=bucket, Key=key, Body=data)
    yield objects


def test_broken_envelopes_are_clear_per_object_failures(cli: Any, bucket: str, db: Path, tmp_path: Path,
                                                        broken_bucket: dict[str, bytes]) -> None:
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    kinds = {r["key"]: r for r in rows(db, "SELECT * FROM objects")}
    assert kinds["good.dcm.gz"]["kind"] == kinds["gzip-without-suffix"]["kind"] == "dicom"
    assert kinds["damaged.dcm"]["kind"] == "dicom"  # its header inflates cleanly
    assert kinds["cut-short.dcm"]["kind"] == "unreadable"
    assert "cut short" in kinds["cut-short.dcm"]["reason"]
    assert kinds["secret.dcm.enc"]["kind"] == "unreadable"
    assert "without the key" in kinds["secret.dcm.enc"]["reason"]
    assert not any(r["kind"] == "other" for r in kinds.values())
    archive = tmp_path / "archive"
    assert 2**20 < len(broken_bucket["mid.dcm"]) < 1_500_000 < len(broken_bucket["big.dcm.gz"])
    result = cli("migrate", "--to", str(archive), "--db", str(db), "--json", "--large-object", "1500000")
    assert result.exit_code == 3, result.output
    done = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    for key in ("good.dcm.gz", "gzip-without-suffix", "big.dcm.gz", "mid.dcm"):
        assert done[key]["state"] == "verified", dict(done[key])
        plain = (archive / done[key]["path"]).read_bytes()
        if key == "mid.dcm":
            assert done[key]["encoding"] == "orthanc-zlib"
            assert plain == zlib.decompress(broken_bucket[key][8:])
        else:
            assert done[key]["encoding"] == "gzip" and plain == gzip.decompress(broken_bucket[key])
            assert "gzip-crc32" in done[key]["checks"]
    bad = done["damaged.dcm"]
    assert bad["state"] == "quarantined" and "corrupt" in bad["reason"], dict(bad)
    assert (archive / bad["path"]).read_bytes() == broken_bucket["damaged.dcm"]  # kept as it was
    for key in ("cut-short.dcm", "secret.dcm.enc"):
        assert done[key]["state"] == "quarantined" and done[key]["path"].startswith("_quarantine/")


def test_a_schema_6_database_gets_the_envelope_columns(tmp_path: Path) -> None:
    import sqlite3

    from cloudexit.state.db import APP_ID, SCHEMA_VERSION, State
    from cloudexit.state.schema import MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for version in range(1, 7):
        conn.executescript(MIGRATIONS[version])
    conn.execute("INSERT INTO objects(key, size, first_seen_round, last_seen_round, kind) "
                 "VALUES ('a.dcm', 1, 1, 1, 'dicom')")
    conn.execute(f"PRAGMA application_id={APP_ID}")
    conn.execute("PRAGMA user_version=6")
    conn.commit()
    conn.close()
    with State(path) as state:
        assert state.schema_version() == SCHEMA_VERSION
        row = state.query("SELECT encoding, plain_size, pacs_metadata FROM objects")[0]
        assert tuple(row) == (None, None, None)
        state.query("SELECT encoding, raw_sha256, file_size FROM transfers")


def test_a_delta_round_decodes_the_new_version(cli: Any, s3: SeaweedServer, bucket: str, db: Path,
                                               tmp_path: Path) -> None:
    first, second = _ct(seed=7).body(), _ct(seed=8).body()
    s3.client().put_object(Bucket=bucket, Key="a.dcm.gz", Body=gzip.compress(first))
    archive = tmp_path / "archive"
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert cli("migrate", "--to", str(archive), "--db", str(db), "-q").exit_code == 0
    (before,) = rows(db, "SELECT * FROM transfers")
    # The PACS rewrites the object: the next round decodes the new version.
    s3.client().put_object(Bucket=bucket, Key="a.dcm.gz", Body=_orthanc(second))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert cli("migrate", "--resume", "--db", str(db), "-q").exit_code == 0
    (after,) = rows(db, "SELECT * FROM transfers")
    assert after["state"] == "verified" and after["encoding"] == "orthanc-zlib" and after["changes"] == 1
    assert after["raw_sha256"] == hashlib.sha256(_orthanc(second)).hexdigest() != before["raw_sha256"]
    assert (archive / after["path"]).read_bytes() == second
    assert after["sha256"] == hashlib.sha256(second).hexdigest()


def test_kill_9_mid_run_then_resume(s3_env: SeaweedServer, bucket: str, db: Path, tmp_path: Path,
                                    orthanc_storage: OrthancStorage, fault_proxy: Any) -> None:
    """kill -9 of migrate (engine and workers) once some decoded instances are committed, then
    --resume: every instance ends verified once, decoded, with no temp file left behind."""
    import signal
    import subprocess
    import sys
    import time

    upload_orthanc(s3_env, bucket, orthanc_storage, "legacy")
    cmd, at = [sys.executable, "-m", "cloudexit.cli"], ["--db", str(db)]
    subprocess.run(cmd + ["inventory", f"s3://{bucket}", "-q", *at], check=True, timeout=120)
    fault_proxy.delay(0.3, method="GET")  # slow GETs: the kill lands mid-run
    archive = tmp_path / "archive"
    run = cmd + ["migrate", "--endpoint-url", fault_proxy.endpoint_url, "--processes", "1",
                 "--threads", "2", "-q", *at]
    proc = subprocess.Popen(run + ["--to", str(archive)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and not done and proc.poll() is None:
        if db.exists():
            try:
                done = len(rows(db, "SELECT key FROM transfers WHERE state = 'verified' "
                                    "AND encoding IS NOT NULL"))
            except Exception:  # noqa: BLE001 - the schema may not be there yet
                done = 0
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total = len(rows(db, "SELECT key FROM transfers"))
    assert 0 < done and len(rows(db, "SELECT key FROM transfers WHERE state = 'verified'")) < total
    fault_proxy.reset_counters()
    result = subprocess.run(run + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    instances = rows(db, "SELECT t.*, o.sop_uid FROM transfers t JOIN objects o ON o.key = t.key "
                         "WHERE o.kind = 'dicom'")
    assert len(instances) == len(orthanc_storage.instances)
    for r in instances:
        assert r["state"] == "verified" and r["encoding"] == "orthanc-zlib", dict(r)
        assert (archive / r["path"]).read_bytes() == orthanc_storage.instances[r["sop_uid"]]
    # no temp file left (the archive's own claim, lock and ledger are not temp files)
    assert not [p for p in archive.rglob(".cloudexit-*") if not p.name.startswith(".cloudexit-archive")]
    check = subprocess.run(cmd + ["verify", "--deep", "-q", *at], capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stderr
