"""The state DB as a file: an auditor's read-only copy, foreign files passed as --db, a full
disk under the DB, damaged pages, and the backups cloudexit keeps.

Read-only mounts and full disks are real: a small tmpfs mounted for the test (root only).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dbutil import rows as _rows
from test_audit import migrated, run  # noqa: F401 - a migrated tiny PACS, shared with the audit tests
from test_inventory import tiny_pacs  # noqa: F401 - fixture

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small filesystem (needs root)")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@contextmanager
def small_fs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:  # root in a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fingerprint(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def _fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of `folder` until `leave` bytes are left."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free - leave
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(free, 0))
    return filler


# -- item: a read-only state DB can be read -------------------------------------------------------
@ROOT
def test_read_only_copy_can_be_read_and_is_never_written(migrated, tmp_path: Path) -> None:  # noqa: F811
    m = migrated
    expected = json.loads(run("status", "--db", m["db"], "--json").output)
    with small_fs(tmp_path / "ro", "64m") as ro:
        db = ro / "cloudexit.db"
        shutil.copy(m["db"], db)  # the DB alone, as an auditor gets it (no key file)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = _fingerprint(ro)

        r = run("status", "--db", db, "--json")
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)
        assert (got["objects"], got["patients"], got["migration"]["done"]) == (
            expected["objects"], expected["patients"], expected["migration"]["done"])
        assert got["patient_key"]["available"] is False  # no key with the copy: said, not fatal

        r = run("verify", "--db", db, "--json")
        assert r.exit_code in (0, 3), r.output
        assert json.loads(r.stdout)["recorded"] is False and "NOT recorded" in r.stderr

        r = run("audit", "--db", db, "--out", tmp_path / "audit-ro")
        assert r.exit_code == 3, r.output  # as the audit on the writable DB: exceptions to review
        assert (tmp_path / "audit-ro" / "audit.html").exists() and "NOT recorded" in r.output

        r = run("audit", "verify", m["out"], "--db", db)
        assert r.exit_code == 0 and r.output.startswith("OK"), r.output

        for args in (("migrate", "--resume"), ("inventory", f"s3://{m['bucket']}")):
            r = run(*args, "--db", db)
            assert r.exit_code == 1, r.output
            assert "read-only" in r.output and "must write" in r.output and "Traceback" not in r.output
        assert _fingerprint(ro) == before


@ROOT
def test_read_only_file_in_read_only_folder_as_another_user(migrated, tmp_path: Path) -> None:  # noqa: F811
    """0400 in a 0500 folder, read by a user who may not write either (root may). verify,
    which needs the archive, is covered on the read-only mount above."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    can = subprocess.run([*NOBODY, sys.executable, "-c", "import cloudexit.cli"], capture_output=True)
    if can.returncode:  # a checkout inside a 0700 folder (mktemp -d) is closed to other users
        pytest.skip("user nobody cannot read this checkout or its venv (a folder above it is 0700)")
    import tempfile

    outer = Path(tempfile.mkdtemp(prefix="auditor-", dir="/tmp"))  # pytest's own folders are 0700
    outer.chmod(0o755)
    folder = outer / "copy"
    folder.mkdir()
    audit = shutil.copytree(migrated["out"], outer / "audit")
    subprocess.run(["chown", "-R", "65534:65534", str(audit)], check=True)
    db = folder / "cloudexit.db"
    shutil.copy(migrated["db"], db)
    db.chmod(0o400)
    os.chown(db, 65534, 65534)
    folder.chmod(0o500)
    os.chown(folder, 65534, 65534)
    before = _fingerprint(folder)
    env = {**os.environ, "TMPDIR": "/tmp"}
    for args in (["status"], ["audit", "verify", str(audit)]):
        r = subprocess.run([*NOBODY, sys.executable, "-m", "cloudexit.cli", *args, "--db", str(db)],
                           capture_output=True, text=True, env=env, timeout=120, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*NOBODY, sys.executable, "-m", "cloudexit.cli", "migrate", "--resume", "--db", str(db)],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 1 and "read-only" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _fingerprint(folder) == before
    folder.chmod(0o700)
    shutil.rmtree(outer)


def test_foreign_or_empty_file_is_refused_untouched(cli, tmp_path: Path, bucket: str) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "empty.db").write_bytes(b"")
    (folder / "notes.db").write_text("not a database\n")
    for name, mode in (("other.db", "DELETE"), ("other-wal.db", "WAL")):
        conn = sqlite3.connect(folder / name)
        conn.execute(f"PRAGMA journal_mode={mode}")
        conn.execute("CREATE TABLE patients (id TEXT)")
        conn.commit()
        conn.close()
    before = _fingerprint(folder)
    for name in sorted(before):
        db = str(folder / name)
        for args in (("status",), ("inventory", f"s3://{bucket}"), ("migrate", "--to", str(tmp_path / "a")),
                     ("verify",), ("audit", "--out", str(tmp_path / "audit")), ("plan", "--bandwidth", "1MB/s")):
            r = cli(*args, "--db", db)
            assert r.exit_code == 1, (name, args, r.output)
            assert ("not a cloudexit state database" in r.output or "empty file" in r.output), (name, args, r.output)
        assert _fingerprint(folder) == before, name  # no byte, no mtime, no -wal or -shm beside
        assert not (tmp_path / "audit").exists()


# -- item: a full disk under the state DB ---------------------------------------------------------
@ROOT
@pytest.mark.slow
def test_full_disk_under_the_db_stops_cleanly_and_resumes(cli, tiny_pacs, s3: SeaweedServer,  # noqa: F811
                                                          tmp_path: Path) -> None:
    bucket, _ = tiny_pacs
    with small_fs(tmp_path / "small", "8m") as small:
        db = small / "state" / "cloudexit.db"
        assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
        assert Path(f"{db}.backup-1").stat().st_mode & 0o777 == 0o600  # the end-of-round backup

        # New objects to record, and no room left for them.
        more = list(synthetic.upload(s3.client(), bucket, (
            o for o in synthetic.generate(synthetic.Profile.tiny(seed=7)) if o.kind == "dicom")))
        filler = _fill(small, leave=48 * 1024)
        r = cli("inventory", f"s3://{bucket}", "--db", str(db))
        assert r.exit_code == 1, r.output
        assert "disk is full" in r.output and str(small) in r.output and "free" in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3, r.output

        filler.unlink()
        r = cli("inventory", f"s3://{bucket}", "--db", str(db))
        assert r.exit_code == 0, r.output
        assert {x["key"] for x in _rows(db, "SELECT key FROM objects")} >= {o.key for o in more}

        # migrate: the same clean stop, then --resume finishes.
        archive = tmp_path / "archive"
        filler = _fill(small, leave=256 * 1024)  # the run starts, then its commits find no room
        r = cli("migrate", "--to", str(archive), "--db", str(db), "--processes", "1", "--threads", "2")
        assert r.exit_code == 1, r.output
        assert "disk is full" in r.output and str(small) in r.output, r.output
        filler.unlink()
        assert _rows(db, "SELECT status FROM migration_runs")[0][0] == "running"  # stopped mid-run
        before = Path(f"{db}.backup-1").stat().st_mtime_ns
        r = cli("migrate", "--resume", "--db", str(db), "--processes", "1", "--threads", "2",
                "--backup-every", "0.0001")  # a backup at every turn of the loop
        assert r.exit_code == 3, r.output  # the synthetic PACS's truncated object and SOP conflict
        assert Path(f"{db}.backup-1").stat().st_mtime_ns > before
        copy = sqlite3.connect(f"{db}.backup-1")
        assert copy.execute("SELECT count(*) FROM migration_runs").fetchone()[0] == 1  # taken during migrate
        copy.close()
        left = _rows(db, "SELECT count(*) FROM transfers WHERE state IN ('queued', 'fetching')")[0][0]
        assert left == 0


# -- item: damaged pages --------------------------------------------------------------------------
def test_damaged_db_says_what_quick_check_found_and_which_backup_to_restore(cli, tiny_pacs,  # noqa: F811
                                                                             db: Path) -> None:
    bucket, _ = tiny_pacs
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    backup = Path(f"{db}.backup-1")
    assert backup.exists() and backup.stat().st_mode & 0o777 == 0o600
    # A second round: the backup before becomes -2, the last two are kept.
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    assert Path(f"{db}.backup-2").exists() and not Path(f"{db}.backup-3").exists()
    copy = sqlite3.connect(backup)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT count(*) FROM objects").fetchone()[0] > 0
    copy.close()

    # Damage the pages of the objects table (not the header: SQLite still opens the file).
    conn = sqlite3.connect(db)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'objects'").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(db, "r+b") as fh:
        fh.seek((root - 1) * page + 8)
        fh.write(os.urandom(page - 16))
    r = cli("status", "--db", str(db))
    assert r.exit_code == 1, r.output
    assert "is damaged" in r.output and "PRAGMA quick_check says" in r.output, r.output
    assert f"cp {backup} {db}" in r.output and "Traceback" not in r.output

    # Restored as the hint says, it works again.
    shutil.copy(backup, db)
    assert cli("status", "--db", str(db)).exit_code == 0

    # Text that is not UTF-8 (a bit flipped inside a value): the same one error, not a traceback.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = CAST(x'73333a2f2fff' AS TEXT) WHERE key = 'source_url'")
    conn.commit()
    conn.close()
    r = cli("status", "--db", str(db))
    assert r.exit_code == 1 and "is damaged" in r.output and "Could not decode" in r.output, r.output
    assert "Traceback" not in r.output
