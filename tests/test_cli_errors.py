"""Errors every command can meet on the way out: one line, the right exit code, never a Python
traceback; with --json, the error as JSON on stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from click.testing import CliRunner, Result

from cloudexit.testing import synthetic
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer


def _profile() -> synthetic.Profile:
    return synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=2, ct_matrix=32,
                             cr_per_study=1, cr_matrix=32, multiframe_objects=0, layouts=("uid",))


def _invoke(env: dict[str, Any], *args: str) -> Result:
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def migrated(s3: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """A bucket inventoried and migrated once: (environment, state DB, bucket)."""
    bucket = f"errors-{os.getpid()}"
    synthetic.upload(s3.client(), bucket, synthetic.generate(_profile()))
    env = {**s3.env(), "AWS_PROFILE": None, "CLOUDEXIT_DB": None}
    db = tmp_path_factory.mktemp("errors") / "cloudexit.db"
    assert _invoke(env, "inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    done = _invoke(env, "migrate", "--to", str(db.parent / "archive"), "--db", str(db), "-q")
    assert done.exit_code in (0, 3), done.output
    return env, db, bucket


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder nothing can be written into. As root, permissions do not stop writes, so a
    read-only tmpfs is mounted; without root, a folder mode 0500 does it."""
    folder = tmp_path_factory.mktemp("read-only")
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                       capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot mount a read-only tmpfs (needs CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _target(kind: str, read_only: Path, tmp: Path) -> Path:
    """A folder of `kind` to write into: read-only, under a regular file, or missing."""
    if kind == "read-only":
        return read_only / "out"
    if kind == "under-a-file":
        (tmp / "a-file").write_text("not a folder")
        return tmp / "a-file" / "out"
    return tmp / "missing" / "deeper"


def _playbook(tmp: Path, bucket: str, env: dict[str, Any], out: Path) -> Path:
    book = tmp / "book.yaml"
    book.write_text(f"""playbook: 1
name: errors
source:
  url: s3://{bucket}
  endpoint: {env["AWS_ENDPOINT_URL"]}
  provider: aws-s3
targets: [{tmp / "pb-archive"}]
pricing:
  provider: aws-s3
  bandwidth: 100Mbit/s
steps:
  - inventory
  - plan:
      out: [{out / "plan.md"}]
""")
    return book


# Each command with a file it writes: (name, arguments given the target folder, whether it needs
# the migrated state DB copied beside the test).
COMMANDS: dict[str, Callable[[Path, Path, str, dict[str, Any], Path], list[str]]] = {
    "plan --out": lambda out, db, bucket, env, tmp: [
        "plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "100Mbit/s",
        "--out", str(out / "plan.html")],
    "audit --out": lambda out, db, bucket, env, tmp: ["audit", "--db", str(db), "--out", str(out / "audit")],
    "decommission --manifest": lambda out, db, bucket, env, tmp: [
        "decommission", "--db", str(db), "--manifest", str(out / "manifest.csv")],
    "inventory --db": lambda out, db, bucket, env, tmp: [
        "inventory", f"s3://{bucket}", "--db", str(out / "new.db")],
    "migrate --to": lambda out, db, bucket, env, tmp: [
        "migrate", "--db", str(db), "--to", str(out / "archive"), "--yes"],
    "demo --workdir": lambda out, db, bucket, env, tmp: ["demo", "--size", "tiny", "--workdir", str(out / "demo")],
    "run (playbook plan out)": lambda out, db, bucket, env, tmp: [
        "run", str(_playbook(tmp, bucket, env, out)), "--db", str(tmp / "pb.db")],
}


@pytest.mark.parametrize("kind", ["read-only", "under-a-file", "missing"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_unwritable_and_missing_output_paths(command: str, kind: str, migrated: tuple[dict[str, Any], Path, str],
                                             read_only: Path, tmp_path: Path) -> None:
    if command == "demo --workdir" and kind == "missing":
        pytest.skip("the whole demo in a new folder is covered by the demo's own test")
    env, shared_db, bucket = migrated
    db = tmp_path / "cloudexit.db"
    shutil.copy(shared_db, db)
    out = _target(kind, read_only, tmp_path)
    args = COMMANDS[command](out, db, bucket, env, tmp_path)
    result = _invoke(env, *args)
    assert "Traceback" not in result.output, result.output
    if kind == "missing":
        # A missing folder is created, owner-only, as the audit folder always was.
        assert result.exit_code in (0, 3), result.output
        assert (tmp_path / "missing").stat().st_mode & 0o777 == 0o700
        assert out.stat().st_mode & 0o777 == 0o700
        return
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert str(read_only if kind == "read-only" else tmp_path / "a-file") in errors[0]
    assert "hint:" in result.output
    with_json = _invoke(env, *args, "--json")
    answer = json.loads(with_json.stdout)
    assert answer["exit"] == with_json.exit_code == 1
    assert answer["error"] and answer["hint"]


def test_every_error_is_json_with_json(tmp_path: Path) -> None:
    """A usage error from click, a library error and a state error: one JSON object each."""
    for args, code in ((["status", "--db", str(tmp_path / "none.db"), "--json"], 1),
                       (["status", "--no-such-option", "--json"], 2),
                       (["migrate", "--db", str(tmp_path / "none.db"), "--json"], 1),
                       (["audit", "--db", str(tmp_path / "none.db"), "--json"], 2)):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        answer = json.loads(result.stdout)
        assert set(answer) == {"error", "hint", "exit"}, args
        assert answer["exit"] == result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_migrate_into_a_second_folder_says_so_and_asks_for_yes(migrated: tuple[dict[str, Any], Path, str],
                                                               tmp_path: Path) -> None:
    env, shared_db, _bucket = migrated
    db = tmp_path / "cloudexit.db"
    shutil.copy(shared_db, db)
    second = tmp_path / "second-archive"
    refused = _invoke(env, "migrate", "--db", str(db), "--to", str(second))
    assert refused.exit_code == 2, refused.output
    assert "downloaded again" in refused.output and "--yes" in refused.output
    assert "--resume" in refused.output and str(shared_db.parent / "archive") in refused.output
    assert not second.exists()
    again = _invoke(env, "migrate", "--db", str(db), "--to", str(second), "--yes", "-q")
    assert again.exit_code in (0, 3), again.output
    assert any(second.rglob("*.dcm"))
    # The same folder as before needs no --yes (a PACS added to the archive run, or a repeat).
    same = _invoke(env, "migrate", "--db", str(db), "--to", str(second), "-q")
    assert same.exit_code in (0, 3), same.output


def test_a_failed_first_inventory_leaves_no_state_db(cli: Callable[..., Result], tmp_path: Path) -> None:
    db = tmp_path / "state" / "cloudexit.db"
    result = cli("inventory", f"s3://no-such-bucket-{os.getpid()}", "--db", str(db))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not db.exists() and not list(db.parent.glob("cloudexit.db*"))
    assert "no state database" in cli("status", "--db", str(db)).output


def test_status_before_any_inventory_says_what_to_run(tmp_path: Path) -> None:
    from cloudexit.state.db import State

    db = tmp_path / "cloudexit.db"
    State(db, create=True).close()  # e.g. left by an older version after a failed first run
    result = CliRunner().invoke(main, ["status", "--db", str(db)], catch_exceptions=False)
    assert "Inventory: None" not in result.output
    assert "none has completed yet; run `cloudexit inventory" in result.output


def test_verify_says_what_the_migration_recorded_for_an_object_not_delivered(
        migrated: tuple[dict[str, Any], Path, str], tmp_path: Path) -> None:
    import sqlite3

    env, shared_db, _bucket = migrated
    db = tmp_path / "cloudexit.db"
    shutil.copy(shared_db, db)
    conn = sqlite3.connect(db)  # as a migration that gave up on one object records it
    key = conn.execute("SELECT key FROM transfers WHERE state = 'verified' ORDER BY seq LIMIT 1").fetchone()[0]
    conn.execute("UPDATE transfers SET state = 'failed', reason = 'HTTP 500 after 5 attempts' WHERE key = ?",
                 (key,))
    conn.commit()
    conn.close()
    result = _invoke(env, "verify", "--db", str(db))
    assert result.exit_code == 3, result.output
    assert "None" not in result.output, result.output
    assert f"object not-delivered: {key} (the migration recorded it as failed); HTTP 500" in result.output
