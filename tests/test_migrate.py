"""migrate on the real SeaweedFS: placement, verification, resume, changes, status."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.stores.claim import LOCK, MARKER, RESERVED
from cloudexit.stores.filesystem import safe_key_path




def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def tiny_pacs(s3: SeaweedServer, bucket: str) -> tuple[str, list[synthetic.SyntheticObject]]:
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    return bucket, objects


@pytest.fixture
def inventoried(cli, tiny_pacs, db: Path) -> tuple[str, list[synthetic.SyntheticObject]]:
    bucket, objects = tiny_pacs
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")
    assert result.exit_code in (0, 3), result.output
    return bucket, objects


def expected_paths(objects: list[synthetic.SyntheticObject]) -> dict[str, str]:
    """Where each ground-truth object must land with the default layout."""
    out: dict[str, str] = {}
    seen_sops: set[str] = set()
    for o in objects:
        if o.kind == "other":
            out[o.key] = f"_non-dicom/{safe_key_path(o.key)}"
        elif o.kind == "unreadable":
            out[o.key] = f"_quarantine/unreadable/{safe_key_path(o.key)}"
        elif o.case == "dup-sop-conflict" and o.sop_uid in seen_sops:
            out[o.key] = "conflict"
        else:
            out[o.key] = f"{o.study_uid}/{o.series_uid}/{o.sop_uid}.dcm"
        if o.sop_uid:
            seen_sops.add(o.sop_uid)
    return out


def test_migrate_places_and_verifies_every_object(cli, inventoried, db: Path, tmp_path: Path) -> None:
    bucket, objects = inventoried
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(db))
    # The synthetic PACS holds a truncated DICOM and a SOP Instance UID conflict: exit 3.
    assert result.exit_code == 3, result.output
    assert "quarantined" in result.output
    transfers = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    assert set(transfers) == {o.key for o in objects}
    on_disk = files_under(dest)
    by_dup = [o for o in objects if o.case == "dup-sop-conflict"]
    for o, where in zip(objects, expected_paths(objects).values()):
        row = transfers[o.key]
        body = o.body()
        assert row["sha256"] == hashlib.sha256(body).hexdigest(), o.key
        assert on_disk[row["path"]] == body, o.key
        checks = row["checks"].split(",")
        assert "size" in checks
        assert ("etag-multipart" if o.multipart else "md5") in checks, (o.key, checks)
        if o.kind == "dicom":
            assert "dicom-sop-uid" in checks
        if where == "conflict":
            assert row["path"].startswith("_quarantine/conflicts/")
            assert row["state"] == "quarantined" and "conflict" in row["reason"]
            assert row["conflict_with"] == by_dup[0].key
        else:
            assert row["path"] == where, o.key
            assert row["state"] == ("quarantined" if o.kind == "unreadable" else "verified"), o.key
    # Exactly the objects and the archive's marker (and its lock), nothing else (no temp
    # files), nothing outside DEST.
    assert set(on_disk) & RESERVED == {MARKER, LOCK}
    assert sorted(set(on_disk) - RESERVED) == sorted(r["path"] for r in transfers.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "state"]
    for p in dest.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    run = rows(db, "SELECT * FROM migration_runs")[0]
    assert run["status"] == "partial"
    assert run["get_requests"] >= len(objects)
    assert run["bytes_downloaded"] == sum(o.size for o in objects)


def test_second_pass_fetches_nothing(cli, inventoried, db: Path, tmp_path: Path, fault_proxy) -> None:
    dest = tmp_path / "archive"
    assert cli("migrate", "--to", str(dest), "--db", str(db), "-q").exit_code == 3
    fault_proxy.reset_counters()
    result = cli("migrate", "--resume", "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url, "-q")
    assert result.exit_code == 3
    # Only the endpoint checks (a boto3 and a signed LIST), no object GET or HEAD.
    assert fault_proxy.count("GET") == 2
    assert all(s.key == "" for s in fault_proxy.requests)


@pytest.mark.slow
def test_files_already_in_place_are_verified_without_a_get(cli, inventoried, db: Path, tmp_path: Path,
                                                           fault_proxy) -> None:
    """A crash between rename and commit leaves the file at its final path: verified locally."""
    dest = tmp_path / "archive"
    assert cli("migrate", "--to", str(dest), "--db", str(db), "-q").exit_code == 3
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE transfers SET state = 'fetching', sha256 = NULL")
        conn.execute("UPDATE migration_runs SET status = 'running', pid = 999999")
    conn.close()
    fault_proxy.reset_counters()
    result = cli("migrate", "--resume", "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url, "-q")
    assert result.exit_code == 3, result.output
    assert not [(s.key, s.query) for s in fault_proxy.requests if s.method == "GET" and s.key]
    assert rows(db, "SELECT count(*) AS n FROM transfers WHERE sha256 IS NULL AND state != 'duplicate'")[0]["n"] == 0


def test_layout_keys_and_skip_non_dicom(cli, inventoried, db: Path, tmp_path: Path) -> None:
    bucket, objects = inventoried
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(db), "--layout", "keys",
                 "--non-dicom", "skip", "-q")
    assert result.exit_code == 3, result.output
    transfers = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    for o in objects:
        row = transfers[o.key]
        if o.kind == "other":
            assert row["state"] == "skipped"
            continue
        if o.kind == "dicom" and row["conflict_with"] is None:
            assert row["path"] == safe_key_path(o.key)
        full = (dest / row["path"]).resolve()
        assert str(full).startswith(str(dest.resolve()) + os.sep)
        assert full.read_bytes() == o.body()
    hostile = [o for o in objects if o.case == "hostile-key"]
    assert hostile and all(transfers[o.key]["state"] == "verified" for o in hostile)
    assert not (dest / "_non-dicom").exists()


@pytest.mark.slow
def test_changed_and_deleted_objects(cli, s3, inventoried, db: Path, tmp_path: Path) -> None:
    bucket, objects = inventoried
    client = s3.client()
    normal = [o for o in objects if o.case == "normal" and o.kind == "dicom" and not o.multipart]
    changed, deleted = normal[0], normal[1]
    # Re-sent after inventory: same key, same UIDs, new bytes (a different ETag).
    body = changed.body()
    new_body = body[:-1] + bytes([body[-1] ^ 0xFF])
    client.put_object(Bucket=bucket, Key=changed.key, Body=new_body)
    client.delete_object(Bucket=bucket, Key=deleted.key)
    # A provider checksum recorded for the old version must not be held against the new one.
    stale = '{"x-amz-checksum-crc32": "AAAAAA=="}'
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE objects SET checksums = ? WHERE key = ?", (stale, changed.key))
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(db), "-q")
    assert result.exit_code == 3
    assert rows(db, "SELECT checksums FROM objects WHERE key = ?", (changed.key,))[0]["checksums"] != stale
    t = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    assert t[changed.key]["state"] == "verified"
    assert t[changed.key]["changes"] == 1
    assert (dest / t[changed.key]["path"]).read_bytes() == new_body
    assert t[changed.key]["sha256"] == hashlib.sha256(new_body).hexdigest()
    assert t[deleted.key]["state"] == "missing"
    events = [r["kind"] for r in rows(db, "SELECT kind FROM events")]
    assert "migrate.changed" in events and "migrate.missing" in events
    # Changed again after being verified: a new inventory round, then only that object moves.
    newer = new_body[:-2] + b"\x00\x00"
    client.put_object(Bucket=bucket, Key=changed.key, Body=newer)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code in (0, 3)
    before = rows(db, "SELECT sum(get_requests) AS g FROM migration_runs")[0]["g"]
    result = cli("migrate", "--to", str(dest), "--db", str(db), "-q")
    assert result.exit_code == 3
    after = rows(db, "SELECT sum(get_requests) AS g FROM migration_runs")[0]["g"]
    assert after - before == 1  # only the one changed object (the endpoint check is a LIST)
    assert (dest / t[changed.key]["path"]).read_bytes() == newer


@pytest.mark.slow
def test_unfinished_run_blocks_a_new_one_and_resume_finishes(s3_env, inventoried, db: Path,
                                                             tmp_path: Path, cli) -> None:
    dest = tmp_path / "archive"
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(dest),
                             "--db", str(db), "--bwlimit", "1M", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if db.exists() and rows(db, "SELECT count(*) AS n FROM sqlite_master WHERE name = 'transfers'")[0]["n"] \
                and rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'verified'")[0]["n"] >= 3:
            break
        time.sleep(0.2)
    # While it runs: a second run is refused, the bandwidth can be changed live.
    busy = cli("migrate", "--to", str(dest), "--db", str(db))
    assert busy.exit_code == 1 and "running in this state DB now" in busy.output
    live = cli("migrate", "--bwlimit", "2M", "--db", str(db))
    assert live.exit_code == 0 and "now uses --bwlimit '2M'" in live.output
    status = cli("status", "--db", str(db))
    assert "live (pid" in status.output and "studies not complete" in status.output
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    refused = cli("migrate", "--to", str(tmp_path / "other"), "--db", str(db))
    assert refused.exit_code == 1
    assert "is unfinished (interrupted)" in refused.output and "objects done" in refused.output
    assert "cloudexit migrate --resume" in refused.output
    done = cli("migrate", "--resume", "--db", str(db), "-q")
    assert done.exit_code == 3
    counts = {r["state"]: r["n"] for r in rows(db, "SELECT state, count(*) AS n FROM transfers GROUP BY 1")}
    assert set(counts) <= {"verified", "quarantined", "duplicate"}
    assert not [p for p in dest.rglob(".cloudexit-*") if p.name not in RESERVED]  # no temp files
    assert rows(db, "SELECT bwlimit FROM migration_runs")[0]["bwlimit"] == "2M"


def test_status_shows_the_migration_by_study(cli, inventoried, db: Path, tmp_path: Path) -> None:
    assert cli("migrate", "--to", str(tmp_path / "a"), "--db", str(db), "-q").exit_code == 3
    out = cli("status", "--db", str(db)).output
    assert "Migration run 1 into file://" in out and ": partial" in out
    assert "studies not complete" in out  # the studies with a quarantined object are listed
    data = json.loads(cli("status", "--db", str(db), "--json").output)
    m = data["migration"]
    assert m["by_state"]["quarantined"] == 2
    assert m["usage"]["requests"]["GET"] >= m["objects"]
    assert m["studies_total"] == 3
    # One definition per number: a study with a quarantined object is not "complete"; the three
    # groups add up, and the listed studies are exactly the ones that are not complete.
    listed = m["studies_in_progress"]
    assert m["studies_complete"] + m["studies_with_exceptions"] + m["studies_unfinished"] == 3
    assert m["studies_with_exceptions"] == sum(1 for s in listed if s["problems"]) >= 1
    assert m["studies_complete"] == 3 - len(listed)
    assert (f"studies 3: {m['studies_complete']} complete (every object verified), "
            f"{m['studies_with_exceptions']} finished with exceptions") in out


def test_migrate_needs_an_inventory_and_a_destination(cli, db: Path, tmp_path: Path) -> None:
    result = cli("migrate", "--to", str(tmp_path / "a"), "--db", str(db))
    assert result.exit_code == 1 and "no state database" in result.output
    db.parent.mkdir(parents=True, exist_ok=True)
    from cloudexit.state.db import State

    State(db, create=True).close()
    result = cli("migrate", "--db", str(db))
    assert result.exit_code == 2 and "--to DEST starts a run" in result.output
    result = cli("migrate", "--resume", "--db", str(db))
    assert result.exit_code == 2 and "nothing to resume" in result.output
    result = cli("migrate", "--to", "s3://elsewhere", "--db", str(db))
    assert result.exit_code == 2 and "unknown destination" in result.output


def test_wrong_credentials_stop_before_anything(cli, inventoried, db: Path, tmp_path: Path,
                                                monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    result = cli("migrate", "--to", str(tmp_path / "a"), "--db", str(db))
    assert result.exit_code == 1
    assert "credentials" in result.output and "wrong-secret" not in result.output
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.dcm"))


def test_v1_database_migrates_forward(tmp_path: Path) -> None:
    from cloudexit.state.db import APP_ID, SCHEMA_VERSION, State
    from cloudexit.state.schema import MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[1].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO objects(key, size, first_seen_round, last_seen_round) VALUES ('a', 1, 1, 1)")
    conn.execute("INSERT INTO meta(key, value) VALUES ('salt', 'x')")
    conn.execute(f"PRAGMA application_id={APP_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    with State(path) as state:
        assert state.schema_version() == SCHEMA_VERSION >= 2
        assert state.scalar("SELECT key FROM objects") == "a"
        assert state.scalar("SELECT count(*) FROM transfers") == 0
        assert state.scalar("SELECT count(*) FROM migration_runs") == 0
