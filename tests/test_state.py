"""The state DB itself: creation, identity, the event log's hash chain."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cloudexit.core.errors import StateError
from cloudexit.state.db import State


def test_event_chain_detects_edits_and_removals(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with State(path, create=True) as state:
        for i in range(5):
            state.log("test.event", n=i)
        assert state.verify_event_chain() == []
    conn = sqlite3.connect(path)
    conn.execute("UPDATE events SET detail = '{\"n\": 99}' WHERE id = 2")
    conn.commit()
    with State(path) as state:
        assert state.verify_event_chain() == ["event 2 (test.event): content altered"]
    conn.execute("UPDATE events SET detail = '{\"n\": 1}' WHERE id = 2")
    conn.execute("DELETE FROM events WHERE id = 3")
    conn.commit()
    conn.close()
    with State(path) as state:
        problems = state.verify_event_chain()
        assert problems == ["event 4: does not follow the event before it "
                            "(an event was removed or inserted)"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    State(path, create=True).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StateError, match="newer cloudexit"):
        State(path)


def test_patient_key_is_random_per_migration_and_outside_the_db(tmp_path: Path) -> None:
    with State(tmp_path / "a.db", create=True) as a, State(tmp_path / "b.db", create=True) as b:
        key_a, key_b = a.patient_key().key, b.patient_key().key
        assert key_a and key_b and key_a != key_b
        assert a.meta("salt") is None and a.key_path == tmp_path / "a.db.key"
        assert key_a.encode() not in (tmp_path / "a.db").read_bytes()
