"""Rows of the files inside zip archives (`objects.container`, `objects.member`, schema 12).

A member is an object of its own, keyed `<zip key>!/<name>` (`zipped.member_key`), with the
zip's ETag (a changed zip changes every member), size 0 (the zip's row holds the bytes the
bucket bills; the member's decoded size is `plain_size`) and `encoding` 'zip'. The listing never
sees members: an inventory round that finds their zip unchanged carries them into the round
(`carry`), one that re-reads a changed zip replaces them (`record`), and the round's sweep marks
the members of a deleted or changed zip deleted like any object no longer listed.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from cloudexit.core.paths import key_flags
from cloudexit.dicom.containers import ZIP_NOT_READ
from cloudexit.dicom.header import Header
from cloudexit.dicom.zipped import Member, member_key

_UPSERT = """
INSERT INTO objects (key, size, etag, last_modified, storage_class, status, change, change_round,
    kind, reason, key_flags, study_uid, series_uid, sop_uid, sop_class_uid, modality, study_date,
    transfer_syntax, patient_hash, header_source, header_bytes, first_seen_round, last_seen_round,
    updated_at, encoding, plain_size, container, member)
VALUES (:key, 0, :etag, :last_modified, :storage_class, 'present', 'new', :round, :kind, :reason,
    :flags, :study_uid, :series_uid, :sop_uid, :sop_class_uid, :modality, :study_date,
    :transfer_syntax, :patient_hash, 'header', 0, :round, :round, :at, 'zip', :plain_size,
    :container, :member)
ON CONFLICT(key) DO UPDATE SET
    change = CASE WHEN objects.etag IS NOT excluded.etag THEN 'changed'
                  WHEN objects.status = 'deleted' THEN 'new' ELSE objects.change END,
    change_round = CASE WHEN objects.etag IS NOT excluded.etag OR objects.status = 'deleted'
                        THEN excluded.change_round ELSE objects.change_round END,
    etag = excluded.etag, last_modified = excluded.last_modified,
    storage_class = excluded.storage_class, status = 'present', kind = excluded.kind,
    reason = excluded.reason, study_uid = excluded.study_uid, series_uid = excluded.series_uid,
    sop_uid = excluded.sop_uid, sop_class_uid = excluded.sop_class_uid,
    modality = excluded.modality, study_date = excluded.study_date,
    transfer_syntax = excluded.transfer_syntax, patient_hash = excluded.patient_hash,
    header_source = 'header', last_seen_round = excluded.last_seen_round,
    updated_at = excluded.updated_at, encoding = 'zip', plain_size = excluded.plain_size,
    container = excluded.container, member = excluded.member
WHERE objects.container IS excluded.container OR objects.status = 'deleted'
"""
# (never over a bucket object whose key is spelled like the member: `refuse_clashes`)

# Present bucket objects (not members) keyed `<zip key>!/<name>` ('0' follows '/'; `<zip key>!/`
# alone, a folder marker some stores list, names no file).
_CLASHING = ("SELECT {what} FROM objects o WHERE o.key > {zip} || '!/' AND o.key < {zip} || '!0' "
             "AND o.status = 'present' AND o.container IS NULL")
ZIP_CLASH = "zip archive whose files cannot be told apart from bucket objects"

# SQL predicates over an `objects` row: a zip archive of the bucket (its files read or not), and
# one whose files are recorded as members (`is_zip`).
ZIP_ARCHIVE = "encoding IS 'zip' AND container IS NULL"
ZIP_UNPACKED = "encoding IS 'zip' AND kind IS 'other' AND container IS NULL"

# An object's bytes as stored in the bucket, for breakdowns over DICOM rows (by modality, study
# year): a member's are its compressed bytes inside its zip (the zip's row is never in such a
# breakdown: it is no DICOM row, so its bytes are not counted twice).
def stored_bytes(row: str = "") -> str:
    """STORED_BYTES over the `objects` row named `row` (a query joining another table)."""
    r = f"{row}." if row else ""
    return f"CASE WHEN {r}container IS NULL THEN {r}size ELSE coalesce(json_extract({r}member, '$.csize'), 0) END"


STORED_BYTES = stored_bytes()


def zip_counts(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(zip archives, those among them not unpacked, files inside them) among the present
    objects: what status, plan and audit say (core/i18n.py `zipped_words`), counted here once."""
    archives, bad = conn.execute(f"SELECT count(*), coalesce(sum(NOT ({ZIP_UNPACKED})), 0) FROM objects "
                                 f"WHERE status = 'present' AND {ZIP_ARCHIVE}").fetchone()
    files = conn.execute("SELECT count(*) FROM objects WHERE container IS NOT NULL "  # objects_container
                         "AND status = 'present'").fetchone()[0]
    return archives, bad, files


def record(tx: sqlite3.Connection, zip_key: str, etag: str, round_id: int, stamp: str,
           members: list[tuple[Member, Header, str | None]]) -> None:
    """Write the members of a zip just read (member, its header, its patient hash)."""
    zip_row = tx.execute("SELECT last_modified, storage_class FROM objects WHERE key = ?",
                         (zip_key,)).fetchone()
    modified, storage_class = (zip_row[0], zip_row[1]) if zip_row else (None, None)
    rows = []
    for m, h, patient in members:
        key = member_key(zip_key, m.name)
        flags = key_flags(key)
        rows.append({
            "key": key, "etag": etag, "last_modified": modified, "storage_class": storage_class,
            "round": round_id, "kind": h.kind, "reason": h.reason,
            "flags": ",".join(flags) if flags else None, "study_uid": h.study_uid,
            "series_uid": h.series_uid, "sop_uid": h.sop_uid, "sop_class_uid": h.sop_class_uid,
            "modality": h.modality, "study_date": h.study_date,
            "transfer_syntax": h.transfer_syntax, "patient_hash": patient, "at": stamp,
            "plain_size": m.usize, "container": zip_key, "member": json.dumps(m.to_json())})
    tx.executemany(_UPSERT, rows)


def carry(tx: sqlite3.Connection, round_id: int) -> None:
    """Members of a zip this round listed unchanged are seen too (before the round's sweep)."""
    tx.execute(
        "UPDATE objects SET last_seen_round = :r, "
        "change = CASE WHEN change_round IS :r THEN change ELSE 'unchanged' END "
        "WHERE container IS NOT NULL AND status = 'present' AND last_seen_round < :r AND EXISTS "
        "(SELECT 1 FROM objects z WHERE z.key = objects.container AND z.status = 'present' "
        "AND z.last_seen_round = :r AND z.etag IS objects.etag AND z.encoding = 'zip')",
        {"r": round_id})


def refuse_clashes(tx: sqlite3.Connection, round_id: int, stamp: str) -> None:
    """S3 keys may hold '!': a bucket object keyed `<zip key>!/<name>` has the key a member of
    that zip would be recorded under. The object stays the bucket's (the listing's upsert and
    `record` see to it); the zip is refused with the reason (kept as stored, like any unreadable
    object) and its members leave the round, so nothing is copied under an ambiguous name."""
    clashing = _CLASHING.format(what="min(o.key)", zip="z.key")
    found = tx.execute(
        f"SELECT z.key, ({clashing}) FROM objects z WHERE z.status = 'present' AND z.encoding = 'zip' "
        "AND z.kind = 'other' AND z.container IS NULL AND EXISTS "
        f"({_CLASHING.format(what='1', zip='z.key')})").fetchall()
    for zip_key, key in found:
        tx.execute("UPDATE objects SET kind = 'unreadable', updated_at = ?, reason = ? WHERE key = ?", (
            stamp, f"{ZIP_CLASH}: the bucket also holds {key!r}, the name its file "
            f"{key[len(zip_key) + 2:]!r} would be recorded under; the archive is kept as stored in "
            "_quarantine/ (rename that object: the inventory round after the one that no longer "
            "lists it reads the zip's files)", zip_key))
        tx.execute("UPDATE objects SET status = 'deleted', change = 'deleted', change_round = ?, "
                   "updated_at = ? WHERE container = ? AND status = 'present'", (round_id, stamp, zip_key))


def is_zip(row: Any) -> bool:
    """The row of a zip archive whose files are recorded as members."""
    return row["encoding"] == "zip" and row["kind"] == "other" and row["container"] is None


def read_again(tx: sqlite3.Connection) -> int:
    """Zips whose files were never read (in an archive storage class at inventory time; migrate
    found them zips once restored, or a bucket object clashed with them and is gone): this
    round reads them. Returns how many."""
    return tx.execute("UPDATE objects SET kind = 'pending' WHERE status = 'present' AND encoding = 'zip' "
                      "AND kind = 'unreadable' AND container IS NULL AND (reason LIKE ? OR "
                      f"(reason LIKE ? AND NOT EXISTS ({_CLASHING.format(what='1', zip='objects.key')})))",
                      (ZIP_NOT_READ + "%", ZIP_CLASH + "%")).rowcount


# -- migrate --------------------------------------------------------------------------------------
ZIP_SKIPPED = ("zipped study: its files are migrated as members; the zip itself is kept only "
               "with migrate --keep-containers")
_ZIPS = f"SELECT key FROM objects WHERE {ZIP_UNPACKED}"


def sync_containers(tx: sqlite3.Connection, dest: str, keep: bool) -> None:
    """The zips' own rows: queued with --keep-containers (copied as stored, like any non-DICOM
    object), otherwise skipped (their members carry them)."""
    if keep:
        tx.execute(f"UPDATE transfers SET state = 'queued', reason = NULL, not_checked = NULL WHERE dest = ? "
                   f"AND state = 'skipped' AND key IN ({_ZIPS})", (dest,))
    else:
        # not_checked says it too: the audit groups transfers by it, and a zip whose files were
        # migrated is no skipped object
        tx.execute(f"UPDATE transfers SET state = 'skipped', reason = ?, not_checked = ? WHERE dest = ? "
                   f"AND state IN ('queued', 'skipped') AND key IN ({_ZIPS})", (ZIP_SKIPPED, ZIP_SKIPPED, dest))


def task_member(row: Any) -> dict[str, Any] | None:
    """What a worker needs to fetch a member (None: not a member of a zip)."""
    if not row["member"]:
        return None
    return {**json.loads(row["member"]), "container": row["container"]}
