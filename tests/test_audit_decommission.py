"""The audit after delta rounds and a real `cloudexit decommission --execute` on SeaweedFS: the
decommission readiness it reports is exactly what decommission deletes, each delta round's
counts are the bucket's changes, and the proof of deletion is the store's answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows

from cloudexit.testing import synthetic
from cloudexit.app import open_source
from cloudexit.decommission import execute, plan
from cloudexit.core.errors import ConfirmationMismatch
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.state.db import State

SMALL = synthetic.Profile(patients=2, studies_per_patient=1, ct_slices_per_series=3, ct_matrix=32,
                          cr_per_study=1, cr_matrix=32, multiframe_objects=0, awkward=False)


def keys_in(s3: SeaweedServer, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def audit(cli: Any, db: Path, out: Path) -> dict[str, Any]:
    result = cli("audit", "--db", str(db), "--out", str(out))
    assert result.exit_code in (0, 3), result.output
    return json.loads((out / "audit.json").read_text())


def manifest_decisions(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return {r["key"]: r["decommission"] for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_delta_round_readiness_and_proof_of_deletion(cli, s3, bucket, db: Path, tmp_path: Path) -> None:
    client = s3.client()
    objects = synthetic.upload(client, bucket, synthetic.generate(SMALL))
    archive = tmp_path / "archive"
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    round1 = keys_in(s3, bucket)
    # Deletions from a series that keeps an object (SeaweedFS lists an emptied folder as a key).
    ct = next(o for o in objects if o.modality == "CT")
    series = [o for o in objects if o.series_uid == ct.series_uid]
    assert len(series) >= 3
    gone_before_copy = series[0].key  # deleted after the inventory: the migration finds it missing
    deleted = series[1].key
    rewritten = next(o for o in objects if o.key not in (gone_before_copy, deleted))
    client.delete_object(Bucket=bucket, Key=gone_before_copy)
    assert cli("migrate", "--to", str(archive), "--db", str(db), "-q").exit_code == 3
    assert cli("verify", "--db", str(db), "-q").exit_code in (0, 3)

    # Between the rounds: two new objects, one rewritten, one deleted.
    new = {"late/a.txt": b"a referral letter", "late/b.txt": b"a report scanned late"}
    for key, body in new.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.put_object(Bucket=bucket, Key=rewritten.key, Body=rewritten.body() + b"\0" * 16)
    client.delete_object(Bucket=bucket, Key=deleted)
    round2 = keys_in(s3, bucket)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    result = cli("migrate", "--resume", "--db", str(db), "-q")
    assert result.exit_code in (0, 3), result.output

    first = audit(cli, db, tmp_path / "audit-1")
    [delta] = first["delta_rounds"]["rounds"]
    assert set(new) <= round2 - round1 and round1 - round2 == {gone_before_copy, deleted}
    assert (delta["round"], delta["new"], delta["changed"], delta["deleted"]) == (
        2, len(round2 - round1), 1, len(round1 - round2))
    assert delta["recorded"] and delta["finished_at"]
    # Copied after round 2: the new objects and the rewritten one.
    assert delta["moved"] == len(round2 - round1) + 1 and delta["left"] == 0
    assert delta["moved_bytes"] == sum(len(b) for b in new.values()) + rewritten.size + 16
    assert delta["migration_runs"]
    assert first["deletion"]["executed"] is False and first["deletion"]["still_present"] is None

    # The audit's "safe to delete" is what decommission would delete: the copies verified after
    # they landed; the new and rewritten ones landed after the verify, so they stay.
    decisions = manifest_decisions(tmp_path / "audit-1")
    with State(db) as state:
        source = open_source(state)
        dry = plan(state, source)
        to_delete = {r.key for r in dry.to_delete}  # the plan's rows are read from the open state DB
        listed = {r.key for r in dry.rows}
    assert listed == keys_in(s3, bucket)
    assert to_delete == {k for k in listed if decisions.get(k) == "safe: verified"}
    # The verify counted the study of the missing object short: none of that study goes.
    short = {o.key for o in objects if o.study_uid == series[0].study_uid} - {gone_before_copy, deleted}
    assert to_delete and to_delete == {o.key for o in objects} - short - {gone_before_copy, rewritten.key, deleted}
    assert {decisions[k] for k in short - {rewritten.key}} == {"keep: verify_problem"}
    late = (*new, rewritten.key)
    assert {k: decisions[k] for k in late} == {k: "keep: landed_after_verify" for k in late}
    assert first["decommission"]["totals"]["safe"]["objects"] == len(to_delete)

    # Execute: a wrong token first (refused), then the dry run's, with one object overwritten
    # while the batches go (the store refuses that one: its ETag is no longer the verified one).
    victim = max(to_delete)
    before = keys_in(s3, bucket)
    with State(db) as state:
        with pytest.raises(ConfirmationMismatch):
            execute(state, source, "0000-0000-0000-0000")

        def overwrite(done: int, total: int) -> None:
            if done == 2:
                client.put_object(Bucket=bucket, Key=victim, Body=b"new content, never migrated")

        done = execute(state, source, dry.token, batch_size=2, progress=overwrite)
    assert [k for k, _, _ in done.failed] == [victim]
    after = keys_in(s3, bucket)
    gone = before - after
    assert gone == to_delete - {victim}

    second = audit(cli, db, tmp_path / "audit-2")
    d = second["deletion"]
    assert d["executed"] and d["dry_runs"] == 1 and len(d["refused"]) == 1
    [run] = d["runs"]
    assert run["token"] == dry.token and run["status"] == "partial" and run["versioning"] == "off"
    assert run["operator"] and run["host"] and run["started_at"] <= run["finished_at"]
    assert run["deleted"] == len(gone) and run["failed"] == 1 and run["delete_markers"] == 0
    assert run["deleted_bytes"] == sum(o.size for o in objects if o.key in gone)
    assert run["confirmed"] == len(gone) and run["unconfirmed"] == 0
    assert run["errors"] == [{"code": "PreconditionFailed", "objects": 1}]
    assert run["batches"] == len(run["batch_answers"]) == (len(to_delete) + 1) // 2
    recorded = rows(db, "SELECT batch, request_id FROM deletions ORDER BY batch")
    assert [(b["batch"], b["request_id"]) for b in run["batch_answers"]] == sorted(
        {(r["batch"], r["request_id"]) for r in recorded})
    assert all(b["request_id"] for b in run["batch_answers"])
    assert sum(b["objects"] for b in run["batch_answers"]) == len(to_delete)
    assert run["kept"] == len(listed) - len(to_delete)
    still = d["still_present"]
    # Still in the cloud: what was kept (verified after the verify, or never), and the victim.
    assert sum(c["objects"] for c in still["kept_by_reason"].values()) + still["failed"] == len(after)
    assert d["totals"] == {"deleted": len(gone), "deleted_bytes": run["deleted_bytes"], "delete_markers": 0,
                           "failed": 1, "confirmed": len(gone), "unconfirmed": 0,
                           "batches": run["batches"], "refused": 1}

    for lang, word in (("en", "Proof of deletion"), ("zh", "删除证明")):
        out = tmp_path / f"audit-{lang}"
        assert cli("audit", "--db", str(db), "--out", str(out), "--lang", lang).exit_code in (0, 3)
        html = (out / "audit.html").read_text()
        assert word in html and dry.token in html
        assert f'data-v="{len(gone)}"' in html and run["batch_answers"][0]["request_id"] in html
