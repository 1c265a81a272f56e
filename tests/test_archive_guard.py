"""The archive folder's guard: one owner per folder (or members who joined on purpose), files
never replaced by other bytes, no folders outside DEST through planted symlinks, private
intermediate folders. Real SeaweedFS, real files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.stores.claim import LEDGER, MARKER
from cloudexit.stores.filesystem import Placer, PlacementConflict


def _upload_twins(s3: SeaweedServer, name: str, flip: bool) -> list[tuple[str, bytes]]:
    """Three small CT objects into bucket `name`; `flip`: same keys and UIDs, other bytes (the
    last pixel byte changed), as a second PACS holding the same studies would."""
    client = s3.client()
    client.create_bucket(Bucket=name)
    out = []
    for o in synthetic.generate(synthetic.Profile.ct_bench(3, matrix=16)):
        body = o.body()
        if flip:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        client.put_object(Bucket=name, Key=o.key, Body=body)
        out.append((o.key, body))
    return out


def _at_once(fn, n: int = 8) -> None:
    """Run fn(0..n-1) on n threads released together."""
    barrier = threading.Barrier(n)

    def go(i: int) -> None:
        barrier.wait()
        fn(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _files(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*")
            if p.is_file() and not p.name.startswith(".cloudexit-")}


@pytest.mark.slow
def test_a_second_migration_never_replaces_the_first_ones_files(cli, s3, tmp_path: Path) -> None:
    """Two state DBs, two buckets with the same UIDs and other bytes, one archive folder: the
    second is refused (naming the owner); joined on purpose, its copies go to quarantine and the
    first migration's verified files stay as they were, which both DBs' records show."""
    name = f"guard-{os.getpid()}"
    a_objects = _upload_twins(s3, f"{name}-a", flip=False)
    _upload_twins(s3, f"{name}-b", flip=True)
    db_a, db_b, dest = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "archive"
    for bucket, db in ((f"{name}-a", db_a), (f"{name}-b", db_b)):
        assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert cli("migrate", "--to", str(dest), "--db", str(db_a), "-q").exit_code == 0
    first = _files(dest)
    assert sorted(first.values()) == sorted(body for _, body in a_objects)
    marker = json.loads((dest / MARKER).read_text())
    assert stat.S_IMODE((dest / MARKER).stat().st_mode) == 0o600
    assert marker["members"][0]["source"] == f"s3://{name}-a"

    refused = cli("migrate", "--to", str(dest), "--db", str(db_b))
    assert refused.exit_code == 1, refused.output
    assert f"belongs to the migration of s3://{name}-a" in refused.output
    assert "--join-archive" in refused.output and "Traceback" not in refused.output
    assert _files(dest) == first
    assert rows(db_b, "SELECT count(*) AS n FROM migration_runs")[0]["n"] == 0

    joined = cli("migrate", "--to", str(dest), "--db", str(db_b), "--join-archive")
    assert joined.exit_code == 3, joined.output  # finished, with objects in quarantine
    for rel, body in first.items():
        assert (dest / rel).read_bytes() == body, rel  # never replaced
    b_rows = rows(db_b, "SELECT * FROM transfers")
    assert {r["state"] for r in b_rows} == {"quarantined"}
    for r in b_rows:
        assert r["path"].startswith("_quarantine/archive-conflicts/")
        assert r["reason"].startswith("archive conflict:")
        assert hashlib.sha256((dest / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    assert len([e for e in rows(db_b, "SELECT kind FROM events") if e["kind"] == "migrate.archive-conflict"]) == 3
    marker = json.loads((dest / MARKER).read_text())
    assert [m["joined"] for m in marker["members"]] == [False, True]
    ledger = [json.loads(line) for line in (dest / LEDGER).read_text().splitlines()]
    assert {e["path"] for e in ledger} == set(first)

    # A's verify (no --deep) finds nothing wrong (its files are intact), and A's DB now records
    # the conflicts about its files, from the archive's ledger.
    check = cli("verify", "--db", str(db_a), "--json")
    assert check.exit_code == 0, check.output
    report = json.loads(check.output)["destinations"][0]
    assert report["counts"]["archive_conflicts_noted"] == 3
    assert report["counts"]["files_other_migrations"] == 3
    noted = rows(db_a, "SELECT detail FROM events WHERE kind = 'archive.conflict-noted'")
    assert {json.loads(e["detail"])["path"] for e in noted} == set(first)
    again = cli("verify", "--db", str(db_a), "-q")
    assert again.exit_code == 0
    assert len(rows(db_a, "SELECT id FROM events WHERE kind = 'archive.conflict-noted'")) == 3

    # What happened before the guard: the file replaced by other bytes of the same size. A quick
    # verify (size and modification time, no re-hash) catches it.
    victim = next(iter(first))
    (dest / victim).write_bytes(b"\0" * len(first[victim]))
    caught = cli("verify", "--db", str(db_a), "--json")
    assert caught.exit_code == 3
    findings = json.loads(caught.output)["destinations"][0]["findings"]
    assert [(f["problem"], f["path"]) for f in findings if f["level"] == "file"] == [("mtime", victim)]


def test_placement_never_replaces_other_bytes_even_in_a_race(tmp_path: Path) -> None:
    """Eight threads place different bytes at one path at once: exactly one lands, the others
    are refused, and the file holds the winner's bytes."""
    placer = Placer(str(tmp_path), fsync=False)
    final = str(tmp_path / "a" / "x.dcm")
    placer.prepare(final)
    outcomes: list[tuple[str, int]] = []
    temps = {}
    for i in range(8):
        temps[i] = (str(tmp_path / "a" / f".cloudexit-{i}.part"),)
        fd = placer.open_temp(temps[i][0], truncate=True)
        os.write(fd, bytes([i]) * 100)
        temps[i] += (fd,)

    def place(i: int) -> None:
        temp, fd = temps[i]
        try:
            placer.place(fd, temp, final, sha256=hashlib.sha256(bytes([i]) * 100).hexdigest())
            outcomes.append(("placed", i))
        except PlacementConflict:
            outcomes.append(("refused", i))
            placer.discard(temp)
        finally:
            os.close(fd)

    _at_once(place)
    placed = [i for what, i in outcomes if what == "placed"]
    assert len(placed) == 1 and len(outcomes) == 8
    assert Path(final).read_bytes() == bytes([placed[0]]) * 100
    assert os.listdir(tmp_path / "a") == ["x.dcm"]
    # The same bytes again are accepted (nothing replaced); this migration's own earlier file
    # (its recorded mtime) is replaced by a newer version.
    same = str(tmp_path / "a" / ".cloudexit-same.part")
    fd = placer.open_temp(same, truncate=True)
    os.write(fd, bytes([placed[0]]) * 100)
    assert placer.place(fd, same, final, sha256=hashlib.sha256(bytes([placed[0]]) * 100).hexdigest()) is False
    os.close(fd)
    newer = str(tmp_path / "a" / ".cloudexit-newer.part")
    fd = placer.open_temp(newer, truncate=True)
    os.write(fd, b"newer")
    mtime = os.stat(final).st_mtime_ns
    assert placer.place(fd, newer, final, sha256="0" * 64, replaceable=mtime) is True
    os.close(fd)
    assert Path(final).read_bytes() == b"newer"


@pytest.mark.slow
def test_a_planted_symlink_makes_no_folder_outside_dest(cli, s3, tmp_path: Path) -> None:
    """DEST/<study> is a symlink to a folder outside: nothing is created there, the objects
    fail with a clear reason, the run ends normally."""
    name = f"guard-link-{os.getpid()}"
    objects = _upload_twins(s3, name, flip=False)
    db, dest, outside = tmp_path / "s.db", tmp_path / "archive", tmp_path / "outside"
    assert cli("inventory", f"s3://{name}", "--db", str(db), "-q").exit_code == 0
    study = rows(db, "SELECT DISTINCT study_uid FROM objects")[0]["study_uid"]
    dest.mkdir()
    outside.mkdir()
    (dest / study).symlink_to(outside)
    result = cli("migrate", "--to", str(dest), "--db", str(db), "-q")
    assert result.exit_code == 3, result.output
    assert list(outside.iterdir()) == []
    t = rows(db, "SELECT state, reason FROM transfers")
    assert len(t) == len(objects) and {r["state"] for r in t} == {"failed"}
    assert all("resolves outside the archive" in r["reason"] for r in t)


def test_folders_created_for_the_db_and_the_audit_are_private(tmp_path: Path) -> None:
    from cloudexit.report.audit import prepare_out
    from cloudexit.state.db import State

    old = os.umask(0o022)
    try:
        with State(tmp_path / "d1" / "d2" / "cloudexit.db", create=True):
            pass
        prepare_out(tmp_path / "o1" / "o2" / "audit", force=False)
    finally:
        os.umask(old)
    for folder in ("d1", "d1/d2", "o1", "o1/o2", "o1/o2/audit"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder


def test_claims_at_once_leave_one_owner(tmp_path: Path) -> None:
    """Eight migrations claim one new folder at the same moment: one owns it, seven are refused."""
    from cloudexit.stores.claim import ArchiveClaimed, claim, read_marker

    outcomes: list[tuple[str, object]] = []

    def take(i: int) -> None:
        try:
            claim(tmp_path, f"m{i}", f"s3://bucket-{i}", f"/db/{i}.db", at="now")
            outcomes.append(("owner", i))
        except ArchiveClaimed as exc:
            outcomes.append(("refused", str(exc)))

    _at_once(take)
    owners = [i for what, i in outcomes if what == "owner"]
    assert len(owners) == 1 and len(outcomes) == 8
    marker = read_marker(tmp_path)
    assert marker is not None and marker["owner"] == f"m{owners[0]}"
    assert all(f"s3://bucket-{owners[0]}" in str(text) for what, text in outcomes if what == "refused")
    joined = claim(tmp_path, "late", "s3://late", "/db/late.db", join=True, at="later")
    assert [m["migration_id"] for m in joined["members"]] == [f"m{owners[0]}", "late"]
