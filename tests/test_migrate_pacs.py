"""migrate with several `--to`: download once into the archive, verify, deliver to a real PACS
(Orthanc by C-STORE and by STOW-RS), record every destination per object, then `verify` both."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows

from click.testing import CliRunner

from cloudexit.testing import synthetic
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.stores.dicomfile import dataset_sha256
from orthanc import OrthancServer


@pytest.fixture
def inventoried(cli: Any, s3: SeaweedServer, bucket: str, db: Path) -> list[synthetic.SyntheticObject]:
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")
    assert result.exit_code in (0, 3), result.output
    return objects


def _new_instances(pacs: OrthancServer, since: int) -> int:
    changes = pacs.rest("GET", f"/changes?since={since}&limit=1000")
    return sum(1 for c in changes["Changes"] if c["ChangeType"] == "NewInstance")


def _check_delivered(db: Path, dest: str, objects: list[synthetic.SyntheticObject],
                     pacs: OrthancServer) -> None:
    by_key = {r["key"]: r for r in rows(db, "SELECT * FROM transfers WHERE dest = ?", (dest,))}
    dicom = [o for o in objects if o.kind == "dicom"]
    # Non-DICOM objects stay in the archive only; every DICOM object has its row for the PACS.
    assert set(by_key) == {o.key for o in dicom}
    pair = [o.key for o in dicom if o.case == "dup-sop-conflict"]
    shared = {o.sop_uid for o in dicom if o.case == "dup-sop-conflict"}
    assert len(pair) == 2 and len(shared) == 1
    # The archive's kept copy of the shared SOP Instance UID went to the PACS; the quarantined
    # one is recorded as not delivered.
    assert sorted(by_key[k]["state"] for k in pair) == ["quarantined", "stored"], [dict(by_key[k]) for k in pair]
    others = [r for k, r in by_key.items() if k not in pair]
    assert {r["state"] for r in others} == {"stored"}, {r["key"]: r["reason"] for r in others}
    sops = {o.sop_uid for o in dicom}
    assert pacs.instance_count() == len(sops) == len(pacs.rest("GET", "/instances"))
    for sop in sops:
        assert pacs.find_instance(sop or ""), sop


@pytest.mark.slow
def test_migrate_into_archive_and_cstore(cli: Any, inventoried: list[synthetic.SyntheticObject],
                                         db: Path, tmp_path: Path, pacs: OrthancServer) -> None:
    archive = tmp_path / "archive"
    result = cli("migrate", "--to", str(archive), "--to", pacs.dicom_url, "--db", str(db), "--json")
    assert result.exit_code == 3, result.output  # truncated object and a conflict copy quarantined
    summary = json.loads(result.output)
    (counts,) = summary["deliveries"].values()
    assert counts.get("quarantined") == 1 and counts.get("failed", 0) == 0 and "queued" not in counts
    assert "conflict" not in counts
    _check_delivered(db, pacs.dicom_url, inventoried, pacs)
    # Every object is also in the archive, downloaded once.
    assert summary["fetched_this_run"] == summary["total"] == len(inventoried)
    archived = {r["key"] for r in rows(db, "SELECT key FROM transfers WHERE dest LIKE 'file://%' "
                                           "AND state IN ('verified', 'quarantined', 'duplicate')")}
    assert {o.key for o in inventoried if o.kind == "dicom"} <= archived

    check = cli("verify", "--db", str(db), "--json")
    assert check.exit_code == 0, check.output
    doc = json.loads(check.output)
    kinds = {d["kind"]: d for d in doc["destinations"]}
    assert set(kinds) == {"filesystem", "dicom"}
    assert all(d["status"] == "passed" for d in doc["destinations"]), doc["destinations"]

    # Again: nothing downloaded, nothing sent, Orthanc receives no new instance.
    last = int(pacs.rest("GET", "/changes?last")["Last"])
    before = pacs.instance_count()
    again = cli("migrate", "--resume", "--db", str(db), "--json")
    assert again.exit_code == 3, again.output  # the quarantined copies still count
    repeat = json.loads(again.output)
    assert repeat["fetched_this_run"] == 0 and repeat["delivered_this_run"] == 0
    assert pacs.instance_count() == before and _new_instances(pacs, last) == 0


@pytest.mark.slow
def test_pacs_added_later_by_stowrs(cli: Any, inventoried: list[synthetic.SyntheticObject],
                                    db: Path, tmp_path: Path, pacs: OrthancServer) -> None:
    archive = tmp_path / "archive"
    first = cli("migrate", "--to", str(archive), "--db", str(db), "-q")
    assert first.exit_code == 3, first.output
    # A PACS added on a later run: delivered from the archive, nothing downloaded again.
    result = cli("migrate", "--to", str(archive), "--to", pacs.dicomweb_url, "--db", str(db), "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.output)
    assert summary["fetched_this_run"] == 0 and summary["requests"]["GET"] == 0
    _check_delivered(db, pacs.dicomweb_url, inventoried, pacs)
    check = cli("verify", "--db", str(db), "--json")
    assert check.exit_code == 0, check.output
    assert {d["kind"] for d in json.loads(check.output)["destinations"]} == {"filesystem", "dicomweb"}


def test_first_to_must_be_a_folder(cli: Any, inventoried: list[synthetic.SyntheticObject], db: Path,
                                   tmp_path: Path, pacs: OrthancServer) -> None:
    out = CliRunner().invoke(main, ["migrate", "--to", pacs.dicom_url, "--to", str(tmp_path / "a"),
                                    "--db", str(db)])
    assert out.exit_code != 0 and "first --to must be a folder" in out.output
    out = CliRunner().invoke(main, ["migrate", "--to", str(tmp_path / "a"), "--to", str(tmp_path / "b"),
                                    "--db", str(db)])
    assert out.exit_code != 0 and "one folder only" in out.output


@pytest.mark.slow
def test_pacs_down_then_back(cli: Any, inventoried: list[synthetic.SyntheticObject], db: Path,
                             tmp_path: Path, pacs: OrthancServer) -> None:
    """The PACS does not answer when the run starts: the archive fills, deliveries wait, probe,
    and go out once it is back; nothing lost."""
    pacs.stop()
    timer = threading.Timer(3.0, pacs.start)
    timer.start()
    try:
        result = cli("migrate", "--to", str(tmp_path / "archive"), "--to", pacs.dicom_url,
                     "--calling-aet", "CLOUDEXIT", "--db", str(db), "--json")
    finally:
        timer.join()
    assert result.exit_code == 3, result.output
    _check_delivered(db, pacs.dicom_url, inventoried, pacs)
    kinds = [r["kind"] for r in rows(db, "SELECT kind FROM events WHERE kind LIKE 'migrate.pacs_%' ORDER BY id")]
    assert kinds[:1] == ["migrate.pacs_down"] and "migrate.pacs_up" in kinds


@pytest.mark.slow
def test_audit_counts_non_dicom_as_migrated_with_a_pacs_destination(cli, s3, bucket: str, db: Path,
                                                                    tmp_path: Path, pacs) -> None:
    """Non-DICOM objects go to the archive only; the audit must not call them unfinished."""
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    result = cli("migrate", "--db", str(db), "--to", str(tmp_path / "archive"), "--to", pacs.dicom_url)
    assert result.exit_code == 3, result.output  # the quarantined truncated object and the conflict
    out = tmp_path / "audit"
    cli("audit", "--db", str(db), "--out", str(out))
    facts = json.loads((out / "audit.json").read_text())
    assert facts["exceptions"]["not_migrated"]["count"] == 0


@pytest.mark.parametrize("via", ["dicom", "dicomweb"])
@pytest.mark.slow
def test_quarantined_copy_never_reaches_a_pacs_that_overwrites(
        cli: Any, inventoried: list[synthetic.SyntheticObject], db: Path, tmp_path: Path,
        overwriting_pacs: OrthancServer, via: str) -> None:
    """Two objects share a SOP Instance UID with different content: the archive keeps the first
    and quarantines the second. A PACS that keeps the last copy sent (OverwriteInstances) must
    never be sent the quarantined one, and `verify --sample` compares the PACS's copy with the
    kept one, whatever the sample size."""
    pacs = overwriting_pacs
    dest = pacs.dicom_url if via == "dicom" else pacs.dicomweb_url
    archive = tmp_path / "archive"
    result = cli("migrate", "--to", str(archive), "--to", dest, "--db", str(db), "--json")
    assert result.exit_code == 3, result.output  # the quarantined copies
    pair = {o.key for o in inventoried if o.case == "dup-sop-conflict"}
    (sop,) = {o.sop_uid for o in inventoried if o.case == "dup-sop-conflict"}
    kept = rows(db, "SELECT key, path FROM transfers WHERE dest LIKE 'file://%' AND state = 'verified' "
                    "AND key IN (?, ?)", tuple(pair))
    (held,) = rows(db, "SELECT key, path, conflict_with FROM transfers WHERE dest LIKE 'file://%' "
                       "AND state = 'quarantined' AND key IN (?, ?)", tuple(pair))
    assert len(kept) == 1 and held["conflict_with"] == kept[0]["key"]
    by_key = {r["key"]: r for r in rows(db, "SELECT * FROM transfers WHERE dest = ? AND key IN (?, ?)",
                                        (dest, *pair))}
    assert by_key[kept[0]["key"]]["state"] == "stored"
    withheld = by_key[held["key"]]
    assert withheld["state"] == "quarantined" and withheld["conflict_with"] == kept[0]["key"], dict(withheld)
    assert "not delivered" in withheld["reason"]
    # The PACS holds the kept bytes (its own file meta aside).
    kept_file, held_file = archive / kept[0]["path"], archive / held["path"]
    assert dataset_sha256(data=pacs.stored_file(sop)) == dataset_sha256(str(kept_file))
    assert dataset_sha256(str(held_file)) != dataset_sha256(str(kept_file))
    check = cli("verify", "--db", str(db), "--to", dest, "--sample", "1", "--json")
    assert check.exit_code == 0, check.output

    # Someone else sends the quarantined copy: the PACS now holds other bytes for that UID.
    pacs.rest("POST", "/instances", held_file.read_bytes())
    assert dataset_sha256(data=pacs.stored_file(sop)) == dataset_sha256(str(held_file))
    check = cli("verify", "--db", str(db), "--to", dest, "--sample", "1", "--json")
    assert check.exit_code != 0, check.output
    doc = json.loads(check.output)
    (report,) = [d for d in doc["destinations"] if d["dest"] == dest]
    bad = [s for s in report["samples"] if s["sop_uid"] == sop]
    assert bad and bad[0]["result"] == "differs" and bad[0]["key"] == kept[0]["key"], report["samples"]
