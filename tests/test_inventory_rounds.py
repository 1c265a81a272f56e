"""Each inventory round's new/changed/deleted counts, as `status` shows them in the delta history."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cloudexit.testing import synthetic
from cloudexit.state.db import SCHEMA_VERSION, State


@pytest.mark.slow
def test_round_counts_survive_later_rounds_and_old_dbs_are_filled(cli, s3, bucket: str, db: Path,
                                                                   tmp_path: Path) -> None:
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert cli("migrate", "--db", str(db), "--to", str(tmp_path / "archive"), "-q").exit_code in (0, 3)
    client = s3.client()
    victim = next(o for o in truth if o.kind == "dicom" and o.case == "normal")
    client.put_object(Bucket=bucket, Key=victim.key, Body=b"no longer DICOM")
    client.put_object(Bucket=bucket, Key="new/arrival.txt", Body=b"hello")
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0

    def history() -> dict[int, tuple[int, int, int]]:
        delta = json.loads(cli("status", "--db", str(db), "--json").stdout)["delta"]
        return {r["round"]: (r["new"], r["changed"], r["deleted"]) for r in delta["rounds"]}

    # Round 1 found every object new, even though round 2 has since marked one as changed.
    assert history() == {1: (len(truth), 0, 0), 2: (1, 1, 0)}
    text = cli("status", "--db", str(db)).output
    assert "inventory round 1 " in text and f"{len(truth)} new" in text

    # A state DB from before schema 9: the counts come back from each round's event.
    conn = sqlite3.connect(db)
    for column in ("new_objects", "changed_objects", "deleted_objects"):
        conn.execute(f"ALTER TABLE inventory_rounds DROP COLUMN {column}")
    for table, column in (("objects", "encoding"), ("objects", "plain_size"), ("objects", "pacs_metadata"),
                          ("transfers", "encoding"), ("transfers", "raw_sha256"), ("transfers", "file_size")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")  # schema 10's, after it
    for table in ("link_series", "link_outages"):  # schema 11's
        conn.execute(f"DROP TABLE {table}")
    conn.execute("DROP INDEX objects_container")  # schema 12's
    for column in ("container", "member"):
        conn.execute(f"ALTER TABLE objects DROP COLUMN {column}")
    conn.execute("ALTER TABLE transfers DROP COLUMN worker")  # schema 13's
    conn.execute("PRAGMA user_version = 8")
    conn.commit()
    conn.close()
    with State(db) as state:
        assert state.schema_version() == SCHEMA_VERSION
    assert history() == {1: (len(truth), 0, 0), 2: (1, 1, 0)}
