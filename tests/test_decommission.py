"""`cloudexit decommission` on the real SeaweedFS: a bucket inventoried, migrated and verified
through the CLI, then deleted, only what is verified, unversioned and versioned (SeaweedFS 4.x
supports versioning, delete markers, ListObjectVersions and ETag-conditional DeleteObjects)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows

from cloudexit import decommission
from cloudexit.testing import synthetic
from cloudexit.app import open_source
from cloudexit.decommission import execute, manifest_rows, plan
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.state.db import State

SMALL = synthetic.Profile(patients=2, studies_per_patient=1, ct_slices_per_series=3, ct_matrix=32,
                          cr_per_study=1, cr_matrix=32, multiframe_objects=0, awkward=False)
TOKEN = re.compile(r"--confirm ([0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4})")




def keys_in(s3: SeaweedServer, bucket: str) -> dict[str, str]:
    out = {}
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["ETag"].strip('"') for o in page.get("Contents", [])})
    return out


def migrate_and_verify(cli: Any, bucket: str, db: Path, archive: Path, verify: bool = True) -> None:
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    result = cli("migrate", "--to", str(archive), "--db", str(db), "-q")
    assert result.exit_code in (0, 3), result.output
    if verify:
        result = cli("verify", "--db", str(db), "-q")
        assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_dry_run_then_execute_deletes_only_what_is_verified(cli, s3, bucket, db: Path, tmp_path: Path) -> None:
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile(
        patients=1, studies_per_patient=2, ct_slices_per_series=3, ct_matrix=32, cr_per_study=1,
        cr_matrix=32, multiframe_objects=0, awkward=True)))
    migrate_and_verify(cli, bucket, db, tmp_path / "archive")
    s3.client().put_object(Bucket=bucket, Key="late/new-study.dcm", Body=b"arrived after the inventory")
    before = keys_in(s3, bucket)

    dry = cli("decommission", "--db", str(db))
    assert dry.exit_code == 3, dry.output  # something stays: the unreadable object, the conflict, the late one
    assert "Nothing deleted (dry run)" in dry.output and "free-exit programs" in dry.output
    token = TOKEN.search(dry.output).group(1)  # type: ignore[union-attr]
    manifest = db.parent / "decommission-manifest.csv"
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert keys_in(s3, bucket) == before  # a dry run deletes nothing
    plan_rows = {r["key"]: r for r in manifest_rows(manifest)}
    assert set(plan_rows) == set(before)
    assert plan_rows["late/new-study.dcm"]["action"] == "keep"
    assert plan_rows["late/new-study.dcm"]["reason"].startswith("not inventoried")
    truncated = next(o for o in objects if o.case == "truncated")
    assert plan_rows[truncated.key]["action"] == "keep"
    assert plan_rows[truncated.key]["reason"].startswith("quarantined")
    delete = {k for k, r in plan_rows.items() if r["action"] == "delete"}
    states = {r["key"]: r["state"] for r in rows(db, "SELECT key, state FROM transfers")}
    assert delete and all(states[k] in ("verified", "duplicate") for k in delete)
    assert all(plan_rows[k]["sha256"] and plan_rows[k]["how"] == "if-match" for k in delete)

    wrong = cli("decommission", "--db", str(db), "--execute", "--confirm", "0000-0000-0000-0000")
    assert wrong.exit_code == 2
    assert "does not match what would be deleted now" in wrong.output
    assert keys_in(s3, bucket) == before

    # The command the dry run suggests is pasted as printed (it names the --db).
    suggested = dry.output.split("objects above:\n", 1)[1].splitlines()[0].split()
    assert suggested[:3] == ["cloudexit", "decommission", "--db"] and token in suggested
    done = cli(*suggested[1:], "--batch-size", "4")
    assert done.exit_code == 3, done.output  # deleted, but some objects stay
    assert set(keys_in(s3, bucket)) == set(before) - delete
    recorded = rows(db, "SELECT * FROM deletions ORDER BY id")
    assert {r["key"] for r in recorded} == delete
    assert all(r["outcome"] == "deleted" and r["confirmed_at"] and r["version_id"] is None for r in recorded)
    assert all(json.loads(r["response"])["Key"] == r["key"] for r in recorded)
    assert {r["batch"] for r in recorded} == set(range(1, (len(delete) + 3) // 4 + 1))
    assert {r["etag"] for r in recorded} == {before[k] for k in delete}
    with State(db) as state:
        assert state.verify_event_chain() == []
        kinds = [r["kind"] for r in state.query("SELECT kind FROM events WHERE kind LIKE 'decommission.%'")]
    assert kinds[:2] == ["decommission.planned", "decommission.refused"]
    assert kinds.count("decommission.batch") == (len(delete) + 3) // 4 and kinds[-1] == "decommission.finished"

    # Everything left is unverified: a second dry run deletes nothing more.
    again = cli("decommission", "--db", str(db), "--json")
    assert again.exit_code == 3 and json.loads(again.output)["to_delete"] == 0


@pytest.mark.slow
def test_an_object_overwritten_mid_run_is_not_deleted(cli, s3, bucket, db: Path, tmp_path: Path) -> None:
    synthetic.upload(s3.client(), bucket, synthetic.generate(SMALL))
    migrate_and_verify(cli, bucket, db, tmp_path / "archive")
    with State(db) as state:
        source = open_source(state)
        p = plan(state, source)
        victim = p.to_delete[-1].key
        replaced: list[str] = []

        def overwrite(done: int, total: int) -> None:
            if not replaced:  # after the first batch: a new version lands under a key still to go
                s3.client().put_object(Bucket=bucket, Key=victim, Body=b"new content, never migrated")
                replaced.append(victim)

        result = execute(state, source, p.token, batch_size=2, progress=overwrite)
    assert [k for k, _, _ in result.failed] == [victim]
    assert "PreconditionFailed" in result.failed[0][2]
    assert keys_in(s3, bucket) == {victim: keys_in(s3, bucket)[victim]}
    (row,) = rows(db, "SELECT * FROM deletions WHERE key = ?", (victim,))
    assert row["outcome"] == "failed" and row["error_code"] == "PreconditionFailed"
    assert rows(db, "SELECT status FROM decommission_runs WHERE mode = 'execute'")[0]["status"] == "partial"


@pytest.mark.slow
def test_nothing_goes_without_a_verify_after_it_landed(cli, s3, bucket, db: Path, tmp_path: Path) -> None:
    synthetic.upload(s3.client(), bucket, synthetic.generate(SMALL))
    migrate_and_verify(cli, bucket, db, tmp_path / "archive", verify=False)
    dry = cli("decommission", "--db", str(db), "--json")
    assert dry.exit_code == 3
    doc = json.loads(dry.output)
    assert doc["to_delete"] == 0 and list(doc["kept_by_reason"]) == ["not re-verified"]
    assert "cloudexit verify" in manifest_rows(doc["manifest"])[0]["reason"]


@pytest.mark.parametrize("page", [None, 2])
@pytest.mark.slow
def test_versioned_bucket_markers_then_all_versions(cli, s3, bucket, db: Path, tmp_path: Path, page: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with the listing decided two keys at a time and the plan read back two rows at a time
    (the paging that keeps a bucket of millions of versions out of memory)."""
    if page:
        monkeypatch.setattr(decommission, "_KEY_BATCH", page)
        monkeypatch.setattr(decommission.Rows, "_PAGE", page)
    client = s3.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    objects = synthetic.upload(client, bucket, synthetic.generate(SMALL))
    rewritten = objects[0]
    # An older version of one object: content the migration never saw.
    client.put_object(Bucket=bucket, Key=rewritten.key, Body=b"first upload, corrected later")
    client.put_object(Bucket=bucket, Key=rewritten.key, Body=rewritten.body())
    migrate_and_verify(cli, bucket, db, tmp_path / "archive")

    dry = cli("decommission", "--db", str(db))
    assert dry.exit_code == 3, dry.output  # the noncurrent version stays
    assert "versioning: Enabled" in dry.output and "delete marker" in dry.output
    token = TOKEN.search(dry.output).group(1)  # type: ignore[union-attr]
    done = cli("decommission", "--db", str(db), "--execute", "--confirm", token)
    assert done.exit_code == 3 and "STILL EXISTS" in done.output
    marked = rows(db, "SELECT * FROM deletions")
    assert len(marked) == len(objects) and {r["outcome"] for r in marked} == {"delete-marker"}
    assert all(r["marker_version_id"] and r["confirmed_at"] for r in marked)
    assert keys_in(s3, bucket) == {}  # hidden...
    versions = client.list_object_versions(Bucket=bucket)
    # ...but every byte is still there: the key rewritten has its first upload, the corrected
    # content and the upload again (same bytes as the first, so verified too).
    assert len(versions["Versions"]) == len(objects) + 2

    dry = cli("decommission", "--db", str(db), "--all-versions", "--json")
    doc = json.loads(dry.output)
    # Each verified version (two of the rewritten key), and the delete markers of the keys that go
    # entirely: the rewritten key keeps its marker, its never-migrated version stays hidden.
    assert doc["to_delete"] == 2 * len(objects)
    old = [r for r in manifest_rows(doc["manifest"]) if r["action"] == "keep" and r["delete_marker"] == "0"]
    assert len(old) == 1 and old[0]["key"] == rewritten.key and old[0]["reason"].startswith("older content")
    done = cli("decommission", "--db", str(db), "--all-versions", "--execute", "--confirm", doc["token"],
               "--json")
    assert done.exit_code == 3, done.output
    assert json.loads(done.output)["deleted"] == 2 * len(objects)
    versions = client.list_object_versions(Bucket=bucket)
    assert [v["Key"] for v in versions.get("Versions", [])] == [rewritten.key]
    assert [m["Key"] for m in versions["DeleteMarkers"]] == [rewritten.key]
    by_version = rows(db, "SELECT * FROM deletions WHERE version_id IS NOT NULL")
    assert len(by_version) == 2 * len(objects) and all(r["confirmed_at"] for r in by_version)


def test_usage_errors(cli, s3, bucket, db: Path, tmp_path: Path) -> None:
    result = cli("decommission", "--db", str(db), "--confirm", "abcd")
    assert result.exit_code == 2 and "--confirm goes with --execute" in result.output
    result = cli("decommission", "--db", str(db), "--execute")
    assert result.exit_code == 2 and "needs the confirmation token" in result.output
    s3.client().put_object(Bucket=bucket, Key="a.dcm", Body=b"x")
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    result = cli("decommission", "--db", str(db))
    assert result.exit_code == 2 and "nothing to decommission" in result.output


@pytest.mark.slow
def test_object_lock_is_read_in_the_dry_run(cli, s3, db: Path, tmp_path: Path) -> None:
    """A bucket with Object Lock (SeaweedFS supports it): a COMPLIANCE and a GOVERNANCE retention
    that has not ended and a legal hold keep three verified objects; the dry run promises only the
    free one, lists the locked ones apart with their retain-until date, and --execute deletes
    exactly what it promised."""
    client = s3.client()
    bucket = f"locked-{os.getpid()}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    until = datetime.now(UTC) + timedelta(days=30)
    past = datetime.now(UTC) + timedelta(seconds=2)
    client.put_object(Bucket=bucket, Key="compliance.bin", Body=b"c" * 100, ObjectLockMode="COMPLIANCE",
                      ObjectLockRetainUntilDate=until)
    client.put_object(Bucket=bucket, Key="governance.bin", Body=b"g" * 100, ObjectLockMode="GOVERNANCE",
                      ObjectLockRetainUntilDate=until)
    client.put_object(Bucket=bucket, Key="hold.bin", Body=b"h" * 100, ObjectLockLegalHoldStatus="ON")
    client.put_object(Bucket=bucket, Key="free.bin", Body=b"f" * 100)
    client.put_object(Bucket=bucket, Key="ended.bin", Body=b"e" * 100, ObjectLockMode="GOVERNANCE",
                      ObjectLockRetainUntilDate=past)  # retention ended by the time of the dry run
    migrate_and_verify(cli, bucket, db, tmp_path / "archive")
    while datetime.now(UTC) <= past:
        time.sleep(0.2)

    dry = cli("decommission", "--db", str(db), "--all-versions")
    assert dry.exit_code == 3, dry.output
    assert "under Object Lock: 3 verified versions" in dry.output, dry.output
    day = until.strftime("%Y-%m-%d")
    assert f"COMPLIANCE retention until {day}" in dry.output and f"GOVERNANCE retention until {day}" in dry.output
    assert "legal hold on" in dry.output
    doc = json.loads(cli("decommission", "--db", str(db), "--all-versions", "--json").output)
    assert doc["to_delete"] == 2 and doc["locked"] == 3 and doc["kept"] == 3
    plan_rows = {r["key"]: r for r in manifest_rows(doc["manifest"])}
    assert {k for k, r in plan_rows.items() if r["action"] == "delete"} == {"free.bin", "ended.bin"}
    assert all(plan_rows[k]["reason"].startswith("object lock: ")
               for k in ("compliance.bin", "governance.bin", "hold.bin"))

    done = cli("decommission", "--db", str(db), "--all-versions", "--execute", "--confirm", doc["token"], "--json")
    assert done.exit_code == 3, done.output  # the locked ones stay, nothing failed
    result = json.loads(done.output)
    assert result["deleted"] == 2 and result["failed"] == [], result
    assert set(keys_in(s3, bucket)) == {"compliance.bin", "governance.bin", "hold.bin"}


@pytest.mark.slow
def test_a_key_hidden_by_a_delete_marker_is_named_so(cli, s3, bucket, db: Path, tmp_path: Path) -> None:
    """Deleted (a delete marker) before the inventory: no inventory lists it, so the manifest must
    not call it new since the last inventory."""
    client = s3.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    objects = synthetic.upload(client, bucket, synthetic.generate(SMALL))
    hidden = objects[0]
    client.delete_object(Bucket=bucket, Key=hidden.key)
    migrate_and_verify(cli, bucket, db, tmp_path / "archive")
    doc = json.loads(cli("decommission", "--db", str(db), "--json").output)
    (row,) = [r for r in manifest_rows(doc["manifest"]) if r["key"] == hidden.key and r["delete_marker"] == "0"]
    assert row["action"] == "keep" and row["reason"].startswith("hidden by a delete marker")
    assert "since the last inventory" not in row["reason"]
    assert "hidden by a delete marker" in doc["kept_by_reason"]
