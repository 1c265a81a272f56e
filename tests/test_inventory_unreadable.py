"""Objects no retry of the inventory can read: in an archive storage class (the fault proxy
emulates GLACIER and DEEP_ARCHIVE, as SeaweedFS records the class but serves the object), or
encrypted with a customer-provided key (SSE-C: real, SeaweedFS refuses a GET without the key)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.testing import synthetic


def _profile() -> synthetic.Profile:
    return synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=3, ct_matrix=32,
                             cr_per_study=1, cr_matrix=32, multiframe_objects=0, layouts=("uid",),
                             awkward=False)


def test_archived_objects_are_left_to_migrate_and_exit_0(cli, s3, bucket: str, db: Path,
                                                         fault_proxy) -> None:
    objects = [o for o in synthetic.upload(s3.client(), bucket, synthetic.generate(_profile()))
               if o.kind == "dicom"]
    fault_proxy.archive(f"^{objects[0].key}$", "GLACIER")
    fault_proxy.archive(f"^{objects[1].key}$", "DEEP_ARCHIVE")
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 0, result.output
    assert "2 object(s) are in an archive storage class (1 DEEP_ARCHIVE, 1 GLACIER)" in result.stderr
    assert "`cloudexit migrate` restores them" in result.stderr
    assert "run inventory again" not in result.output
    pending = {r["key"] for r in rows(db, "SELECT key FROM objects WHERE kind = 'pending'")}
    assert pending == {objects[0].key, objects[1].key}


def test_customer_key_objects_are_named_with_what_to_do(cli, s3, bucket: str, db: Path) -> None:
    client = s3.client()
    synthetic.upload(client, bucket, synthetic.generate(_profile()))
    secret = "sse-c/locked.dcm"
    client.put_object(Bucket=bucket, Key=secret, Body=b"DICM" * 64, SSECustomerAlgorithm="AES256",
                      SSECustomerKey=os.urandom(32))
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--retries", "2")
    assert result.exit_code == 3, result.output
    assert "1 object(s) are encrypted with a customer-provided key (SSE-C)" in result.stderr
    assert secret in result.stderr and "run inventory again to retry" not in result.stderr
    doc = json.loads(cli("inventory", f"s3://{bucket}", "--db", str(db), "--retries", "2", "--json").stdout)
    assert doc["round"]["customer_key"] == 1 and doc["round"]["failed"] == []


@pytest.mark.slow
def test_expedited_restores_fall_back_to_standard_for_deep_archive(cli, s3, bucket: str, db: Path,
                                                                   tmp_path: Path, fault_proxy) -> None:
    objects = [o for o in synthetic.upload(s3.client(), bucket, synthetic.generate(_profile()))
               if o.kind == "dicom"]
    glacier, deep = objects[0], objects[1]
    fault_proxy.archive(f"^{glacier.key}$", "GLACIER")
    fault_proxy.archive(f"^{deep.key}$", "DEEP_ARCHIVE")
    endpoint = ("--endpoint-url", fault_proxy.endpoint_url)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), *endpoint, "-q").exit_code == 0
    result = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), *endpoint,
                 "--restore-tier", "expedited", "--restore-poll", "1")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "no Expedited restore for DEEP_ARCHIVE" in line]
    assert len(notes) == 1 and "1 object(s) are restored with Standard" in notes[0]
    # What went on the wire, and what the state DB says was asked for.
    assert fault_proxy.restore_tier(bucket, deep.key) == "Standard"
    assert fault_proxy.restore_tier(bucket, glacier.key) == "Expedited"
    tiers = {r["key"]: r["tier"] for r in rows(db, "SELECT key, tier FROM restores")}
    assert tiers == {deep.key: "Standard", glacier.key: "Expedited"}
