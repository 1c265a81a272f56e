"""Inventory against a real S3 server (SeaweedFS): ground truth, resume, changes, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from dbutil import rows as _rows

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer




@pytest.fixture
def tiny_pacs(s3: SeaweedServer, bucket: str) -> tuple[str, list[synthetic.SyntheticObject]]:
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    return bucket, objects


def test_inventory_matches_ground_truth(cli, tiny_pacs, db: Path) -> None:
    bucket, truth = tiny_pacs
    result = cli("inventory", f"s3://{bucket}", "--db", str(db))
    assert result.exit_code == 0, result.output

    rows = {r["key"]: r for r in _rows(db, "SELECT * FROM objects")}
    assert set(rows) == {o.key for o in truth}
    for obj in truth:
        row = rows[obj.key]
        assert row["kind"] == obj.kind, (obj.key, obj.case, row["reason"])
        assert row["size"] == obj.size
        if obj.kind == "dicom":
            assert (row["study_uid"], row["series_uid"], row["sop_uid"]) == (
                obj.study_uid, obj.series_uid, obj.sop_uid), obj.case
            assert row["modality"] == obj.modality
            assert row["transfer_syntax"] == obj.transfer_syntax
            assert row["study_date"] == obj.study_date
            assert row["patient_hash"] and row["patient_hash"] != obj.patient_id
        if obj.kind != "dicom":
            assert row["reason"], obj.case

    # A header longer than the first 64 KiB read was read by growing the range.
    big = next(o for o in truth if o.case == "big-header")
    assert rows[big.key]["header_bytes"] > 64 * 1024
    # Each small object was read exactly once, whole.
    for obj in truth:
        if 0 < obj.size <= 64 * 1024:
            assert rows[obj.key]["header_bytes"] == obj.size, obj.case
    # Small reads only: the inventory did not download whole images.
    multiframe = next(o for o in truth if o.case == "multiframe")
    assert rows[multiframe.key]["header_bytes"] <= 64 * 1024

    status = cli("status", "--db", str(db), "--json")
    totals = json.loads(status.stdout)
    dicom = [o for o in truth if o.kind == "dicom"]
    assert totals["objects"] == len(truth)
    assert totals["bytes"] == sum(o.size for o in truth)
    assert totals["dicom_instances"] == len({o.sop_uid for o in dicom})
    assert totals["studies"] == len({o.study_uid for o in dicom})
    assert totals["series"] == len({o.series_uid for o in dicom})
    assert totals["patients"] == len({o.patient_id for o in dicom})
    assert totals["non_dicom"] == sum(o.kind == "other" for o in truth)
    assert totals["unreadable"] == sum(o.kind == "unreadable" for o in truth)
    assert totals["duplicate_sop_uids"] == 1
    modalities = {m["name"]: m["objects"] for m in totals["by_modality"]}
    assert modalities == dict(Counter(o.modality for o in dicom))
    assert totals["inventory"]["header_bytes"] == sum(r["header_bytes"] for r in rows.values())


def test_no_patient_identity_in_db_or_output(cli, tiny_pacs, db: Path) -> None:
    bucket, truth = tiny_pacs
    result = cli("inventory", f"s3://{bucket}", "--db", str(db))
    status = cli("status", "--db", str(db), "--json")
    ids = {o.patient_id for o in truth if o.patient_id}
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir())
    for pid in ids:
        assert pid.encode() not in raw
        assert pid not in result.output and pid not in status.output
    for name in synthetic.PATIENT_NAMES if hasattr(synthetic, "PATIENT_NAMES") else []:
        assert name.encode("utf-8") not in raw


def test_state_files_are_private(cli, tiny_pacs, tmp_path: Path) -> None:
    bucket, _ = tiny_pacs
    db = tmp_path / "new-dir" / "m.db"
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    assert db.stat().st_mode & 0o777 == 0o600
    assert db.parent.stat().st_mode & 0o777 == 0o700


def test_rerun_records_new_changed_and_deleted(cli, s3, tiny_pacs, db: Path) -> None:
    bucket, truth = tiny_pacs
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0

    client = s3.client()
    dicom = [o for o in truth if o.kind == "dicom" and o.case == "normal"]
    changed, deleted = dicom[0], dicom[1]
    client.put_object(Bucket=bucket, Key=changed.key, Body=b"no longer DICOM")
    client.delete_object(Bucket=bucket, Key=deleted.key)
    client.put_object(Bucket=bucket, Key="new/arrival.txt", Body=b"hello")

    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["round"]
    assert (summary["new"], summary["changed"], summary["deleted"]) == (1, 1, 1)
    assert summary["unchanged"] == len(truth) - 2

    rows = {r["key"]: r for r in _rows(db, "SELECT * FROM objects")}
    assert rows[changed.key]["kind"] == "other" and rows[changed.key]["change"] == "changed"
    assert rows[deleted.key]["status"] == "deleted"
    assert rows["new/arrival.txt"]["change"] == "new"
    # A third run on an unchanged bucket: nothing new, nothing counted twice.
    again = json.loads(cli("inventory", f"s3://{bucket}", "--db", str(db), "--json").stdout)
    assert (again["round"]["new"], again["round"]["changed"], again["round"]["deleted"]) == (0, 0, 0)
    assert again["inventory"]["objects"] == len(truth)


@pytest.mark.slow
def test_every_key_of_many_folders_is_listed(cli, s3, bucket: str, db: Path) -> None:
    """Regression: range bounds made up between folders skipped whole studies on SeaweedFS."""
    profile = synthetic.Profile(patients=70, studies_per_patient=2, ct_slices_per_series=2,
                                ct_matrix=8, cr_per_study=0, multiframe_objects=0, awkward=False,
                                layouts=("uid",))
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(profile), workers=16)
    assert len({o.study_uid for o in truth}) == 140
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "--key-pattern",
               "{study}/{series}/{sop}.dcm").exit_code == 0
    listed = {r["key"] for r in _rows(db, "SELECT key FROM objects")}
    assert listed == {o.key for o in truth}


def test_prefix_limits_the_inventory(cli, tiny_pacs, db: Path) -> None:
    bucket, truth = tiny_pacs
    prefix = truth[0].key.split("/")[0] + "/"
    assert cli("inventory", f"s3://{bucket}/{prefix}", "--db", str(db)).exit_code == 0
    keys = {r["key"] for r in _rows(db, "SELECT key FROM objects")}
    assert keys == {o.key for o in truth if o.key.startswith(prefix)}


def test_hostile_keys_are_recorded_and_flagged(cli, s3, bucket: str, db: Path) -> None:
    client = s3.client()
    hostile = {
        "C:\\Windows\\x.dcm": {"absolute"},  # SeaweedFS stores it as C:/Windows/x.dcm
        "ctl\x01char.dcm": {"control-char"},
        "..dots/ok.dcm": set(),  # a name starting with dots is not a dot segment
        "影像/张三 study/1.dcm": set(),
        "a/" + "L" * 250 + "/" + "M" * 250: set(),
    }
    for key in hostile:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    rows = {r["key"]: r for r in _rows(db, "SELECT key, key_flags, kind FROM objects")}
    stored = {k.replace("\\", "/"): flags for k, flags in hostile.items()}
    assert set(rows) == set(stored)
    for key, flags in stored.items():
        assert set(filter(None, (rows[key]["key_flags"] or "").split(","))) == flags, key
        assert rows[key]["kind"] == "other"


def test_key_pattern_reads_only_a_sample(cli, s3, bucket: str, db: Path) -> None:
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(
        synthetic.Profile.ct_bench(60, matrix=16)))
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json",
                 "--key-pattern", "{study}/{series}/{sop}.dcm")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["inventory"]["dicom_instances"] == 60
    assert out["inventory"]["inventory"]["get_requests"] == 20  # the sample, nothing more
    rows = _rows(db, "SELECT sop_uid, header_source FROM objects")
    assert {r["sop_uid"] for r in rows} == {o.sop_uid for o in truth}


def test_wrong_key_pattern_is_caught_by_the_sample(cli, s3, bucket: str, db: Path) -> None:
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.ct_bench(30, matrix=16)))
    result = cli("inventory", f"s3://{bucket}", "--db", str(db),
                 "--key-pattern", "{series}/{study}/{sop}.dcm")
    assert result.exit_code == 2
    assert "--key-pattern does not match the DICOM header" in result.stderr
    # Without the pattern every header is read and the UIDs come out right.
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    assert _rows(db, "SELECT count(*) AS n FROM objects WHERE header_source = 'header'")[0]["n"] == 30


@pytest.mark.parametrize("pattern", ["{sop}/{sop}.dcm", "{study}/{study}/{sop}.dcm"])
def test_a_key_pattern_naming_a_uid_twice_is_one_usage_error(cli, bucket: str, db: Path,
                                                             pattern: str) -> None:
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--key-pattern", pattern)
    assert result.exit_code == 2 and "names {" in result.stderr and "twice" in result.stderr, result.output


# -- bad input --------------------------------------------------------------------------------
def test_wrong_credentials(cli, bucket: str, db: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    result = cli("inventory", f"s3://{bucket}", "--db", str(db))
    assert result.exit_code == 1
    assert "credentials were refused by http://127.0.0.1:" in result.stderr
    assert "not-the-secret" not in result.output


def test_missing_bucket(cli, db: Path) -> None:
    result = cli("inventory", "s3://no-such-bucket-here", "--db", str(db))
    assert result.exit_code == 1
    assert "bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:" in result.stderr


def test_unreachable_endpoint(cli, bucket: str, db: Path) -> None:
    from cloudexit.testing.s3server import free_port

    started = time.monotonic()
    result = cli("inventory", f"s3://{bucket}", "--db", str(db),
                 "--endpoint-url", f"http://127.0.0.1:{free_port()}", "--retries", "3")
    assert result.exit_code == 1
    assert "cannot reach http://127.0.0.1:" in result.stderr and "after 3 attempts" in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_throttling_and_server_errors_are_retried(cli, tiny_pacs, fault_proxy, db: Path) -> None:
    bucket, truth = tiny_pacs
    fault_proxy.status(503, method="GET", query="list-type", times=3)  # SlowDown on listing
    fault_proxy.status(503, method="GET", key=r"\.dcm$", times=10)  # and on header reads
    fault_proxy.status(500, method="GET", key=r"\.dcm$", times=5)  # InternalError too
    fault_proxy.drop(method="GET", key=r"\.dcm$", times=3)  # and connections reset
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json",
                 "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 0, result.output
    assert sum(1 for r in fault_proxy.requests if r.fault) == 21
    totals = json.loads(result.stdout)["inventory"]
    assert totals["objects"] == len(truth)
    assert totals["unreadable"] == sum(o.kind == "unreadable" for o in truth)
    assert totals["pending"] == 0


def test_persistent_errors_leave_objects_pending_and_exit_3(cli, tiny_pacs, fault_proxy,
                                                            db: Path) -> None:
    bucket, truth = tiny_pacs
    victim = next(o for o in truth if o.case == "normal")
    fault_proxy.status(500, method="GET", key=re.escape(victim.key) + "$")
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--retries", "2",
                 "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 3
    assert "1 object(s) could not be read; run inventory again to retry" in result.stderr
    assert victim.key in result.stderr
    fault_proxy.clear()
    again = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json",
                "--endpoint-url", fault_proxy.endpoint_url)
    assert again.exit_code == 0
    assert json.loads(again.stdout)["inventory"]["pending"] == 0


def test_not_an_s3_url(cli, db: Path) -> None:
    result = cli("inventory", "/srv/pacs", "--db", str(db))
    assert result.exit_code == 2
    assert "not an S3 URL" in result.stderr and "s3://BUCKET" in result.stderr


def test_db_of_another_bucket_is_refused(cli, s3, tiny_pacs, db: Path) -> None:
    bucket, _ = tiny_pacs
    other = bucket + "-other"
    s3.client().create_bucket(Bucket=other)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    before = db.read_bytes()
    result = cli("inventory", f"s3://{other}", "--db", str(db))
    assert result.exit_code == 1
    assert f"belongs to the migration of s3://{bucket}" in result.stderr
    assert "use another --db" in result.stderr
    assert _rows(db, "SELECT count(DISTINCT key) AS n FROM objects")[0]["n"] > 0
    assert len(db.read_bytes()) == len(before)


def test_foreign_file_is_refused(cli, tmp_path: Path, bucket: str) -> None:
    foreign = tmp_path / "notes.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    result = cli("inventory", f"s3://{bucket}", "--db", str(foreign))
    assert result.exit_code == 1
    assert "is not a cloudexit state database" in result.stderr
    text = tmp_path / "text.db"
    text.write_text("hello, not sqlite at all " * 100)
    result = cli("status", "--db", str(text))
    assert result.exit_code == 1 and "not a cloudexit state database" in result.stderr


def test_status_without_db_says_what_to_do(cli, tmp_path: Path) -> None:
    result = cli("status", "--db", str(tmp_path / "none.db"))
    assert result.exit_code == 1
    assert "run `cloudexit inventory s3://BUCKET` first" in result.stderr
    assert not (tmp_path / "none.db").exists()


# -- resume -----------------------------------------------------------------------------------
def _inventory_process(s3: SeaweedServer, bucket: str, db: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **s3.env()}
    return subprocess.Popen(
        [sys.executable, "-m", "cloudexit.cli", "inventory", f"s3://{bucket}", "--db", str(db),
         "-q", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def many_keys(s3: SeaweedServer) -> tuple[str, list[synthetic.SyntheticObject]]:
    """1,800 small DICOM objects in two layouts, shared by tests that only read them."""
    bucket = f"many-keys-{os.getpid()}"
    profile = synthetic.Profile(patients=4, studies_per_patient=3, ct_slices_per_series=150,
                                ct_matrix=8, cr_per_study=0, multiframe_objects=0, awkward=False,
                                layouts=("uid", "dcm4chee"))
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(profile), workers=16)
    assert len(truth) == 1800
    return bucket, truth


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.slow
def test_interrupted_inventory_resumes_without_double_counting(s3_env, many_keys, db: Path,
                                                               sig) -> None:
    s3 = s3_env
    bucket, truth = many_keys
    proc = _inventory_process(s3, bucket, db, "--workers", "2", "--list-workers", "2")
    deadline = time.monotonic() + 60
    classified = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            classified = _rows(db, "SELECT count(*) AS n FROM objects WHERE kind != 'pending'")[0]["n"]
        except sqlite3.Error:
            classified = 0
        if classified >= 200:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "inventory finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(30)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, proc.stderr.read() if proc.stderr else ""
    before = {r["key"]: r["header_bytes"] for r in
              _rows(db, "SELECT key, header_bytes FROM objects WHERE kind != 'pending'")}
    assert 200 <= len(before) < len(truth)

    resumed = _inventory_process(s3, bucket, db, "--json")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()
    rounds = _rows(db, "SELECT * FROM inventory_rounds")
    assert len(rounds) == 1 and rounds[0]["resumed"] == 1 and rounds[0]["status"] == "complete"

    rows = {r["key"]: r for r in _rows(db, "SELECT * FROM objects")}
    assert set(rows) == {o.key for o in truth}
    assert all(r["kind"] == "dicom" for r in rows.values())
    # Headers committed before the interruption were not read again.
    for key, nbytes in before.items():
        assert rows[key]["header_bytes"] == nbytes
    status = json.loads(out)["inventory"]
    assert status["objects"] == status["dicom_instances"] == len(truth)
    # The first round went without the study and SOP indexes; the resumed round built them.
    indexes = {r["name"] for r in _rows(db, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"objects_study", "objects_sop"} <= indexes


def test_objects_changed_or_deleted_while_their_header_is_read(cli, tiny_pacs, fault_proxy, db: Path) -> None:
    """A 412 on a header GET means the object changed since it was listed (injected by the fault
    proxy: SeaweedFS serves what it listed): its new version is recorded and read; one that
    keeps changing is left pending after 3 tries; one deleted before the HEAD is recorded deleted."""
    bucket, truth = tiny_pacs
    once, always, gone = [o for o in truth if o.case == "normal"][:3]
    fault_proxy.status(412, "PreconditionFailed", method="GET", key=re.escape(once.key) + "$", times=1)
    for key in (always.key, gone.key):
        fault_proxy.status(412, "PreconditionFailed", method="GET", key=re.escape(key) + "$")
    fault_proxy.status(404, "NoSuchKey", method="HEAD", key=re.escape(gone.key) + "$")
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 3, result.output
    assert f"{always.key!r}: object keeps changing while being read" in result.stderr
    found = {r["key"]: r for r in _rows(db, "SELECT * FROM objects")}
    assert (found[once.key]["kind"], found[once.key]["change"]) == ("dicom", "changed")
    assert found[once.key]["sop_uid"] == once.sop_uid
    assert found[always.key]["kind"] == "pending"
    assert found[gone.key]["status"] == "deleted"
    assert fault_proxy.count("HEAD", key=always.key) == 4
