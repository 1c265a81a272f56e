"""What the listing writes to `objects` (cloudexit/state/listed.py): the rows of a page, and the
study and SOP indexes a first listing builds once, at its end, on SeaweedFS."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from dbutil import rows as _rows

from cloudexit.core.config import InventoryConfig, SourceConfig
from cloudexit.core.paths import key_flags
from cloudexit.inventory import Inventory, compile_key_pattern
from cloudexit.s3.source import ListedObject, Source
from cloudexit.state import listed
from cloudexit.state.db import State
from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

KEYS = ["1.2.840.1/1.2.840.1.1/1.2.840.1.1.1.dcm", "a/b.dcm", "a/./b", "a/../b", "/a", "a//b",
        "C:x", "a\\b", "bell\x07", "scan\u202egpj.exe", "a" * 256, "", "..x/y", "影像/张三/1.dcm"]


def test_page_rows_flag_unsafe_keys_and_wait_for_headers_without_a_pattern() -> None:
    objects = [ListedObject(k, 1, "e", "2026-01-01T00:00:00Z", "STANDARD") for k in KEYS]
    rows, pending = listed.page_rows(objects, 3, "now", None)
    assert [r[7] for r in rows] == [",".join(key_flags(k)) or None for k in KEYS]
    assert rows[0][7] is None and rows[2][7] == "dot-segment"
    assert pending == len(KEYS) and {r[6] for r in rows} == {"pending"}


def test_page_rows_take_the_uids_the_pattern_names() -> None:
    objects = [ListedObject(k, 5, "e", "t", "STANDARD") for k in
               ("1.2.3/1.2.3.4/1.2.3.4.5.dcm", "notes/readme.txt")]
    rows, pending = listed.page_rows(objects, 7, "now", compile_key_pattern("{study}/{series}/{sop}.dcm"))
    assert pending == 1
    assert rows[0][6] == "dicom" and rows[0][11:] == ("1.2.3", "1.2.3.4", "1.2.3.4.5", "key-pattern")
    assert rows[1][6] == "pending" and rows[1][11:] == (None, None, None, None)
    rows, _ = listed.page_rows(objects[:1], 7, "now", compile_key_pattern("*/*/{sop}.dcm"))
    assert rows[0][11:] == (None, None, "1.2.3.4.5", "key-pattern")


def _indexes(db: Path) -> set[str]:
    return {r["name"] for r in _rows(db, "SELECT name FROM sqlite_master WHERE type = 'index' "
                                         "AND tbl_name = 'objects'")}


class _Interrupt:
    """A progress callback that stops the round (as Ctrl-C would) once a page is committed."""

    def __init__(self) -> None:
        self.armed = True

    def __call__(self, progress) -> None:
        if self.armed and progress.listed:
            raise KeyboardInterrupt


def _round(state: State, s3: SeaweedServer, bucket: str, progress=None) -> object:
    config = InventoryConfig(key_pattern="{study}/{series}/{sop}.dcm", list_workers=2, workers=2)
    return Inventory(state, Source(f"s3://{bucket}", SourceConfig(s3.endpoint_url)), config,
                     progress=progress).run()


def test_first_listing_builds_the_study_and_sop_indexes_at_its_end(s3_env: SeaweedServer, bucket: str,
                                                                   tmp_path: Path) -> None:
    s3 = s3_env
    profile = synthetic.Profile(patients=2, studies_per_patient=1, ct_slices_per_series=3,
                                ct_matrix=8, cr_per_study=0, multiframe_objects=0, awkward=False,
                                layouts=("uid",))
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(profile))
    db = tmp_path / "s.db"
    deferred = set(listed.DEFERRED_OBJECT_INDEXES)
    with State(db, create=True) as state:
        assert deferred <= _indexes(db)  # a new DB has them (schema v1)
        with pytest.raises(KeyboardInterrupt):
            _round(state, s3, bucket, _Interrupt())
        # The first round, interrupted after a page: rows committed, the indexes not built yet.
        assert _rows(db, "SELECT count(*) AS n FROM objects")[0]["n"] > 0
        assert not deferred & _indexes(db) and "objects_pending" in _indexes(db)
        summary = _round(state, s3, bucket)  # resumed: completes, and builds them
    assert summary.resumed and summary.new == len(truth)
    assert deferred <= _indexes(db)
    conn = sqlite3.connect(db)
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT key FROM objects WHERE sop_uid = ?", ("1",)).fetchall()
    conn.close()
    assert "objects_sop" in str(plan)
    assert {r["key"]: r["sop_uid"] for r in _rows(db, "SELECT key, sop_uid FROM objects")} == {
        o.key: o.sop_uid for o in truth}
    # A later round keeps them: the table is not empty, so keys may already be there.
    with State(db) as state:
        with pytest.raises(KeyboardInterrupt):
            _round(state, s3, bucket, _Interrupt())
        assert deferred <= _indexes(db)
        again = _round(state, s3, bucket)
    assert (again.new, again.changed, again.deleted, again.unchanged) == (0, 0, 0, len(truth))
    rounds = _rows(db, "SELECT list_requests FROM inventory_rounds")
    tasks = _rows(db, "SELECT sum(pages) AS pages FROM list_tasks GROUP BY round ORDER BY round")
    assert [r["list_requests"] for r in rounds] == [t["pages"] for t in tasks]
