"""One list of destinations for the audit, verify, decommission and status (each asked the DB
its own way before: the audit sorted deliveries without a run by name, verify took whatever order
SQLite's DISTINCT gave, decommission and status added the destinations only a verify checked)."""

from __future__ import annotations

from pathlib import Path

from cloudexit import decommission, verify
from cloudexit.report import status
from cloudexit.report.facts import audit_facts
from cloudexit.state.db import State
from cloudexit.state.destinations import destinations

SECOND, FIRST = "file:///srv/second", "file:///srv/first"
# PACS deliveries ride an archive run (no run of their own); keys sorted the other way round
# from the destinations' names, so a scan in key order would list them backwards.
DELIVERIES = {"a": "dicomweb+https://z.example/dicom-web", "b": "dicom://B@pacs:104"}
VERIFY_ONLY = "dicom://CHECKED@other:104"


def make(path: Path) -> State:
    state = State(path, create=True)
    with state.transaction() as tx:
        tx.execute("INSERT INTO inventory_rounds(started_at, finished_at, status) VALUES ('t0', 't0', 'complete')")
        for run, dest in ((1, SECOND), (2, FIRST), (3, SECOND)):  # first use decides the order
            tx.execute("INSERT INTO migration_runs(id, started_at, finished_at, status, dest, options) "
                       "VALUES (?, '2025-01-02T00:00:00+00:00', '2025-01-02T01:00:00+00:00', 'complete', ?, '{}')", (run, dest))
        for key, dest in [*DELIVERIES.items(), ("c", FIRST), ("d", SECOND)]:
            tx.execute("INSERT INTO objects(key, size, etag, kind, study_uid, first_seen_round, last_seen_round) "
                       "VALUES (?, 1, 'e', 'dicom', 'st', 1, 1)", (key,))
            tx.execute("INSERT INTO transfers(key, dest, seq, state, etag, path) VALUES (?, ?, 0, 'stored', 'e', ?)",
                       (key, dest, f"p/{key}"))
        tx.execute("INSERT INTO verify_runs(started_at, finished_at, dest, kind, options, status) "
                   "VALUES ('2025-01-03T00:00:00+00:00', '2025-01-03T01:00:00+00:00', ?, 'dicom', '{}', 'passed')", (VERIFY_ONLY,))
    return state


def test_every_stage_lists_the_same_destinations_in_the_same_order(tmp_path: Path) -> None:
    delivered = [SECOND, FIRST, "dicom://B@pacs:104", "dicomweb+https://z.example/dicom-web"]
    with make(tmp_path / "d.db") as state:
        assert destinations(state) == delivered
        assert destinations(state, verified=True) == [*delivered, VERIFY_ONLY]
        # What a migration delivered to: the audit, and `cloudexit verify` without --to.
        assert [d["dest"] for d in audit_facts(state)["destinations"]] == delivered
        assert verify.destinations(state) == delivered
        # Decommission and the delta figures also want a copy where a verify looked.
        assert decommission.default_destinations(state) == [*delivered, VERIFY_ONLY]
        delta = status.delta_summary(state)
        assert delta is not None and [d["dest"] for d in delta["destinations"]] == [*delivered, VERIFY_ONLY]


def test_a_db_from_before_verify_has_destinations_and_no_verify_runs(tmp_path: Path) -> None:
    with make(tmp_path / "old.db") as state:
        state.conn.execute("DROP TABLE verify_runs")
        assert destinations(state, verified=True) == destinations(state)
