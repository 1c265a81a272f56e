"""What a listing writes to `objects`: one row per listed key, upserted, and the indexes a first
listing builds once at its end.

The inventory's writer thread (cloudexit/inventory.py) commits each page with its resume point;
this module holds the SQL and the per-key work, which is most of the listing's CPU after the
page parser (docs/performance.md, "Target 5").
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import Any

from cloudexit.core.paths import key_flags
from cloudexit.state.schema import DEFERRED_OBJECT_INDEXES

UPSERT = """
INSERT INTO objects (key, size, etag, last_modified, storage_class, status, change, change_round,
                     kind, key_flags, first_seen_round, last_seen_round, updated_at,
                     study_uid, series_uid, sop_uid, header_source)
VALUES (?, ?, ?, ?, ?, 'present', 'new', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
    change = CASE
        WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size THEN 'changed'
        WHEN objects.status = 'deleted' THEN 'new'
        WHEN objects.last_seen_round = excluded.last_seen_round THEN objects.change
        ELSE 'unchanged' END,
    change_round = CASE
        WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
             OR objects.status = 'deleted' THEN excluded.change_round
        ELSE objects.change_round END,
    kind = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.kind ELSE objects.kind END,
    study_uid = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.study_uid ELSE objects.study_uid END,
    series_uid = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.series_uid ELSE objects.series_uid END,
    sop_uid = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.sop_uid ELSE objects.sop_uid END,
    header_source = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.header_source ELSE objects.header_source END,
    size = excluded.size, etag = excluded.etag, last_modified = excluded.last_modified,
    storage_class = excluded.storage_class, status = 'present', key_flags = excluded.key_flags,
    last_seen_round = excluded.last_seen_round, updated_at = excluded.updated_at,
    container = NULL, member = NULL
"""
# A listed key is a bucket object, even one spelled like a zip's member (`<zip key>!/<name>`,
# cloudexit/state/members.py): the row stops being the member (the etag differs: read again).

_UIDS = ("study", "series", "sop")


def page_rows(objects: Sequence[Any], rnd: int, stamp: str,
              pattern: re.Pattern[str] | None) -> tuple[list[tuple[Any, ...]], int]:
    """The `UPSERT` rows of one listing page (`ListedObject`s), and how many wait for a header
    read (no `--key-pattern`, or a key it does not match)."""
    flags = [",".join(f) or None for f in map(key_flags, [o.key for o in objects])]
    if pattern is None:
        return [(o.key, o.size, o.etag, o.last_modified, o.storage_class, rnd, "pending", f, rnd,
                 rnd, stamp, None, None, None, None) for o, f in zip(objects, flags)], len(flags)
    slots = [pattern.groupindex.get(name, 0) for name in _UIDS]  # 0: the pattern lacks it
    search, pending = pattern.search, 0
    rows: list[tuple[Any, ...]] = []
    for o, f in zip(objects, flags):
        m = search(o.key)
        if m is None:
            pending += 1
            rows.append((o.key, o.size, o.etag, o.last_modified, o.storage_class, rnd, "pending",
                         f, rnd, rnd, stamp, None, None, None, None))
        else:
            study, series, sop = m.group(*slots)
            rows.append((o.key, o.size, o.etag, o.last_modified, o.storage_class, rnd, "dicom", f,
                         rnd, rnd, stamp, study if slots[0] else None,
                         series if slots[1] else None, sop, "key-pattern"))
    return rows, pending


def defer_indexes(tx: sqlite3.Connection) -> bool:
    """Drop the indexes a first listing builds at its end, if `objects` is empty; True if so.

    On an empty table every listed key is new; kept up to date row by row, these indexes took
    as much time as the rest of the insert (UIDs arrive in no order), while one sort of the
    finished table is cheap. A round interrupted without them resumes without them; other
    commands answer without them, only slower (migrate waits for the round anyway).
    """
    if tx.execute("SELECT 1 FROM objects LIMIT 1").fetchone() is not None:
        return False
    for name in DEFERRED_OBJECT_INDEXES:
        tx.execute(f"DROP INDEX IF EXISTS {name}")
    return True


def build_indexes(tx: sqlite3.Connection) -> None:
    """The indexes `defer_indexes` dropped, built from the table (nothing if they exist)."""
    for ddl in DEFERRED_OBJECT_INDEXES.values():
        tx.execute(ddl)
