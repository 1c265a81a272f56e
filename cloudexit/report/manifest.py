"""manifest.csv: one line per object and destination, built by SQLite and streamed (bounded
memory), each with the object's decommission decision; the walk also adds up the report's
groups on the way (see groups.groups_of_walk)."""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from cloudexit.report.exceptions import EXCEPTIONS
from cloudexit.report.groups import LIST_LIMIT, STALE, Rule
from cloudexit.report.redact import Redactor
from cloudexit.state.db import State
from cloudexit.state.members import stored_bytes

MANIFEST_COLUMNS = (
    "key", "size", "etag", "last_modified", "storage_class", "source_checksums", "source_status",
    "kind", "study_uid", "series_uid", "sop_uid", "modality", "study_date", "patient_hash",
    "destination", "state", "path", "sha256", "md5", "checks", "not_checked", "reason",
    "conflict_with", "attempts", "started_at", "verified_at",
    # an object in an envelope (containers.py): how it was stored, and the raw object's SHA-256
    # when the file is its decoded instance; Orthanc's metadata attachments say what they are
    "encoding", "raw_sha256", "pacs_metadata",
    "worker",  # migrate --cluster: the dask worker that fetched it (empty: the coordinator's machine)
    "decommission",
)
PHI_COLUMNS = ("patient_id", "patient_name")


def _csv_text(column: str) -> str:
    """A text column from outside (keys, headers, listings) as a CSV field built by SQLite:
    quoted, quotes doubled; NULL stays NULL (printf's %s writes it as an empty field)."""
    return f"""'"' || replace({column}, '"', '""') || '"'"""


def _csv_ours(column: str) -> str:
    """Text cloudexit wrote (checks, states): quoted, holds no quote characters."""
    return f"""'"' || {column} || '"'"""


# What each manifest line adds to the report's groups (see groups.grouped): the object's columns and
# its transfer's, each as one JSON array (one Python string per line, decoded once per group).
_WALK_OBJECT = ("json_array(o.status, o.kind, coalesce(o.modality, ''), coalesce(substr(o.study_date, 1, 4), ''), "
                "coalesce(o.storage_class, 'STANDARD'), o.key_flags IS NOT NULL, o.container IS NOT NULL)")
_WALK_TRANSFER = (
    f"CASE WHEN t.key IS NOT NULL THEN json_array(t.dest, t.state, t.conflict_with IS NOT NULL, t.changes > 0, "
    f"{STALE}, coalesce(o.storage_class, 'STANDARD'), t.checks, t.not_checked) END")


def manifest_sql(rule: Rule, include_phi: bool = False, redact_keys: bool = False) -> tuple[str, dict[str, Any]]:
    """The manifest query: SQLite formats each line but its last field in one printf() call (one
    function call per row instead of a coalesce and a concatenation per field: a third less CPU
    at 1M rows); the last, the decision, comes as a column of its own, with what the line adds
    to the report's groups (manifest_lines); the file's destination and path only when the patients'
    names are to be read from it."""
    decision, _, params = rule.sql()
    # --redact-keys: keys, paths and the reasons quoting them through cloudexit.redact (SQL
    # functions registered on the connection by manifest_lines).
    key, path, conflict, reason = (("redact_key(o.key)", "redact_path(t.path)", "redact_key(t.conflict_with)",
                                    "redact_text(t.reason, t.conflict_with, t.path)") if redact_keys
                                   else ("o.key", "t.path", "t.conflict_with", "t.reason"))
    fields = (
        _csv_text(key), "o.size", _csv_text("o.etag"), _csv_text("o.last_modified"),
        _csv_text("o.storage_class"), _csv_text("o.checksums"), "o.status", "o.kind",
        _csv_text("o.study_uid"), _csv_text("o.series_uid"), _csv_text("o.sop_uid"), _csv_text("o.modality"),
        _csv_text("o.study_date"), "o.patient_hash", _csv_text("t.dest"),
        _csv_ours("coalesce(t.state, 'not migrated')"), _csv_text(path), "t.sha256",
        "t.md5", _csv_ours("t.checks"), _csv_text("t.not_checked"), _csv_text(reason),
        _csv_text(conflict), "t.attempts", "t.started_at", "t.verified_at",
        "coalesce(t.encoding, o.encoding)", "t.raw_sha256", "o.pacs_metadata", _csv_text("t.worker"),
    )
    template = ",".join(["%s"] * len(fields)) + ","
    return (f"SELECT printf('{template}', " + ", ".join(fields) + f") AS line, {_csv_ours(decision)}, "
            f"{'t.dest, t.path' if include_phi else 'NULL, NULL'}, o.rowid, o.size, {stored_bytes('o')}, "
            f"{_WALK_OBJECT}, {_WALK_TRANSFER}, coalesce(t.size, 0), "
            "t.sha256 IS NOT NULL, CASE WHEN t.key IS NOT NULL AND "
            f"{EXCEPTIONS['changed'][0]} THEN json_array(t.dest, t.seq, t.rowid) END "
            "FROM objects o LEFT JOIN transfers t ON t.key = o.key ORDER BY o.key, t.dest"), params


def manifest_lines(conn: State | sqlite3.Connection, rule: Rule, include_phi: bool = False,
                   walked: dict[tuple[str, str, str | None], list[int]] | None = None,
                   changed: dict[str, list[tuple[int, int]]] | None = None,
                   redact: Redactor | None = None) -> Iterator[tuple[str, int]]:
    """manifest.csv without its header: one line per object and destination (an object in no
    destination: one line), in key order. SQLite builds each line; this only streams them.

    `walked`: also adds up, per (decision, object columns, transfer columns), the lines, objects
    (an object's first line), their bytes and bytes as stored (groups.py), the transfers' bytes and SHA-256 digests: the
    report's groups without a second pass over the tables (groups_of_walk); and in `changed`, per
    destination, the first LIST_LIMIT "changed" exceptions by `seq` (see Groups)."""
    if isinstance(conn, State):
        conn = conn.conn
    if redact is not None:
        redact.register(conn)
    cur = conn.execute(*manifest_sql(rule, include_phi, redact is not None))
    last = None
    while True:
        rows = cur.fetchmany(2000)
        if not rows:
            return
        if walked is not None:
            for _, decision, _, _, rowid, size, stored, okey, tkey, tsize, sha, flagged in rows:
                if flagged is not None and changed is not None:
                    dest, seq, trowid = json.loads(flagged)
                    heap = changed.setdefault(dest, [])
                    if len(heap) < LIST_LIMIT:
                        heapq.heappush(heap, (-seq, -trowid))
                    elif (-seq, -trowid) > heap[0]:
                        heapq.heapreplace(heap, (-seq, -trowid))
                first = rowid != last
                last = rowid
                g = walked.get((decision, okey, tkey))
                if g is None:
                    walked[decision, okey, tkey] = ([1, 1, size, stored, tsize, sha] if first
                                                    else [1, 0, 0, 0, tsize, sha])
                else:
                    g[0] += 1
                    if first:
                        g[1] += 1
                        g[2] += size
                        g[3] += stored
                    g[4] += tsize
                    g[5] += sha
        if include_phi:
            yield "".join(f"{r[0]}{r[1]},{_csv_field(pid)},{_csv_field(name)}\n"
                          for r in rows for pid, name in [read_patient(r[2], r[3])]), len(rows)
        else:
            yield "\n".join([r[0] + r[1] for r in rows]) + "\n", len(rows)


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if text else ""


def read_patient(dest: str | None, path: str | None) -> tuple[str, str]:
    """(Patient ID, Patient Name) from the archived file, for --include-phi; blanks if unknown."""
    if not dest or not path or not dest.startswith("file://"):
        return "", ""
    full = os.path.join(dest[len("file://"):], path)
    try:
        import pydicom

        ds = pydicom.dcmread(full, stop_before_pixels=True, force=True,
                             specific_tags=["SpecificCharacterSet", "PatientID", "PatientName"])
        return str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or "")
    except Exception:  # noqa: BLE001 - a damaged or foreign file: no identity to show
        return "", ""


