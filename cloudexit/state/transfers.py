"""The SQL the migrate engine issues on `transfers`, `transfer_ranges`, `migration_runs` and
`restores`.

One row of `transfers` per (key, destination): the archive folder (`file://...`) and each PACS
(`dicom://...`, `dicomweb+...`); see docs/state-db.md. Functions take an open transaction
(`tx`) or the `State`; the engine alone calls them, on its own thread (one writer).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterable, Sequence

from cloudexit.core.states import DONE

# A PACS refusal worth another try on the next run (0xA7xx: out of resources; HTTP 5xx/429).
TRANSIENT_REASONS = ("0xA7%", "HTTP 5%", "HTTP 429%")

Tx = sqlite3.Connection


def rows(tx: Tx, sql: str, params: Any = ()) -> sqlite3.Cursor:
    """`tx.execute` with rows by name."""
    cur = tx.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(sql, params)


# -- migration_runs -------------------------------------------------------------------------------
def runs(state: Any) -> list[sqlite3.Row]:
    return list(state.query("SELECT * FROM migration_runs ORDER BY id"))


def last_run(state: Any) -> sqlite3.Row | None:
    found: list[sqlite3.Row] = state.query("SELECT * FROM migration_runs ORDER BY id DESC LIMIT 1")
    return found[0] if found else None


def run_row(state: Any, run_id: int) -> sqlite3.Row:
    found: list[sqlite3.Row] = state.query("SELECT * FROM migration_runs WHERE id = ?", (run_id,))
    return found[0]


def other_dests(state: Any, dest: str) -> list[str]:
    return [r["dest"] for r in state.query(
        "SELECT DISTINCT dest FROM migration_runs WHERE dest != ? ORDER BY id", (dest,))]


def has_run_into(state: Any, dest: str) -> bool:
    return bool(state.scalar("SELECT 1 FROM migration_runs WHERE dest = ?", (dest,)))


def resume_run(tx: Tx, run_id: int, pid: int, host: str, stamp: str, bwlimit: str | None, options: str) -> None:
    tx.execute("UPDATE migration_runs SET status = 'running', resumed = resumed + 1, "
               "pid = ?, host = ?, heartbeat_at = ?, waiting_since = NULL, "
               "stop_reason = NULL, bwlimit = ?, options = ? WHERE id = ?",
               (pid, host, stamp, bwlimit, options, run_id))


def new_run(tx: Tx, dest: str, options: str, bwlimit: str | None, pid: int, host: str, stamp: str) -> int:
    cur = tx.execute(
        "INSERT INTO migration_runs(started_at, status, dest, options, bwlimit, pid, host, "
        "heartbeat_at) VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
        (stamp, dest, options, bwlimit, pid, host, stamp))
    return int(cur.lastrowid or 0)


def set_bwlimit(tx: Tx, run_id: int, text: str | None) -> None:
    tx.execute("UPDATE migration_runs SET bwlimit = ? WHERE id = ?", (text, run_id))


def bwlimit(state: Any, run_id: int) -> str | None:
    value = state.scalar("SELECT bwlimit FROM migration_runs WHERE id = ?", (run_id,))
    return None if value is None else str(value)


def add_run_figures(tx: Tx, run_id: int, stamp: str, get: int, head: int, list_: int, restores: int,
                    nbytes: int, retries: int, verified_bytes: int, verified_objects: int,
                    resumed_bytes: int) -> None:
    """What the engine counted since the last commit, and the heartbeat."""
    tx.execute(
        "UPDATE migration_runs SET get_requests = get_requests + ?, head_requests = head_requests + ?, "
        "list_requests = list_requests + ?, restore_requests = restore_requests + ?, "
        "bytes_downloaded = bytes_downloaded + ?, retries = retries + ?, heartbeat_at = ?, "
        "bytes_verified = bytes_verified + ?, objects_verified = objects_verified + ?, "
        "bytes_resumed = bytes_resumed + ? WHERE id = ?",
        (get, head, list_, restores, nbytes, retries, stamp, verified_bytes, verified_objects,
         resumed_bytes, run_id))


def set_waiting(tx: Tx, run_id: int, since: str | None, outage_over: bool = False) -> None:
    """The link went down (`since`), or came back (None; one outage more)."""
    if since is not None:
        tx.execute("UPDATE migration_runs SET waiting_since = ? WHERE id = ?", (since, run_id))
    else:
        tx.execute("UPDATE migration_runs SET waiting_since = NULL, link_outages = link_outages + ? "
                   "WHERE id = ?", (1 if outage_over else 0, run_id))


def end_run(tx: Tx, run_id: int, status: str, finished_at: str | None, stop_reason: str | None,
            stamp: str) -> None:
    tx.execute("UPDATE migration_runs SET status = ?, finished_at = ?, stop_reason = ?, "
               "waiting_since = NULL, heartbeat_at = ? WHERE id = ?",
               (status, finished_at, stop_reason, stamp, run_id))


# -- transfers: counts and queries ---------------------------------------------------------------
def counts(state: Any, dest: str) -> dict[str, int]:
    found = state.query("SELECT state, count(*) AS n, coalesce(sum(size), 0) AS b FROM transfers "
                        "WHERE dest = ? GROUP BY state", (dest,))
    out = {r["state"]: r["n"] for r in found}
    out["_bytes_done"] = sum(r["b"] for r in found if r["state"] in DONE)
    out["_bytes_total"] = sum(r["b"] for r in found if r["state"] != "missing")
    return out


def has_state(state: Any, dest: str, state_name: str) -> bool:
    return bool(state.scalar("SELECT 1 FROM transfers WHERE dest = ? AND state = ? LIMIT 1",
                             (dest, state_name)))


def failures(state: Any, dest: str, states: Sequence[str], limit: int = 50) -> list[sqlite3.Row]:
    marks = ",".join("?" * len(states))
    return list(state.query(f"SELECT key, state, reason FROM transfers WHERE dest = ? AND state IN ({marks}) "
                            "ORDER BY seq LIMIT ?", (dest, *states, limit)))


def queued_after(state: Any, dest: str, cursor: int, limit: int) -> list[sqlite3.Row]:
    """Queued rows to dispatch, in the order of work, with what a task needs from `objects`."""
    return list(state.query(
        "SELECT t.key, t.seq, t.etag, t.size, t.kind, t.path, t.attempts, t.range_size, t.mtime_ns, "
        "t.part_sizes, o.sop_uid, o.study_uid, o.series_uid, o.checksums, o.encoding, o.member, o.container "
        "FROM transfers t "
        "JOIN objects o ON o.key = t.key WHERE t.dest = ? AND t.state = 'queued' AND t.seq > ? "
        "ORDER BY t.seq LIMIT ?", (dest, cursor, limit)))


def done_ranges(state: Any, key: str, dest: str, etag: str) -> dict[int, int]:
    """A large object's ranges on disk: index -> bytes (NULL, from older DBs: the whole range)."""
    return {r[0]: r[1] if r[1] is not None else 2**62 for r in state.query(
        "SELECT idx, bytes FROM transfer_ranges WHERE key = ? AND dest = ? AND etag = ?", (key, dest, etag))}


def changes(tx: Tx, key: str, dest: str) -> int:
    return int(tx.execute("SELECT changes FROM transfers WHERE key = ? AND dest = ?", (key, dest)).fetchone()[0])


# -- transfers: the archive's state changes -------------------------------------------------------
def mark_fetching(tx: Tx, dest: str, run_id: int, first_seq: int, last_seq: int, stamp: str) -> None:
    """Intent: every queued row of this seq range is handed to a worker."""
    tx.execute("UPDATE transfers SET state = 'fetching', run_id = ?, attempts = attempts + 1, "
               "started_at = ?, updated_at = ? WHERE dest = ? AND state = 'queued' AND seq BETWEEN ? AND ?",
               (run_id, stamp, stamp, dest, first_seq, last_seq))


def set_range_size(tx: Tx, key: str, dest: str, range_size: int) -> None:
    tx.execute("UPDATE transfers SET range_size = ? WHERE key = ? AND dest = ?", (range_size, key, dest))


def record_ranges(tx: Tx, dest: str, ranges: Iterable[tuple[str, str, int, int]]) -> None:
    """(key, etag, index, bytes on disk) of large objects; a range never shrinks."""
    tx.executemany("INSERT INTO transfer_ranges(key, dest, etag, idx, bytes) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT(key, dest, etag, idx) DO UPDATE SET bytes = max(bytes, excluded.bytes)",
                   [(k, dest, e, i, b) for k, e, i, b in ranges])


def drop_ranges(tx: Tx, key: str, dest: str) -> None:
    tx.execute("DELETE FROM transfer_ranges WHERE key = ? AND dest = ?", (key, dest))


DONE_ROW = ("UPDATE transfers SET state = ?, path = ?, sha256 = ?, md5 = ?, checks = ?, not_checked = ?, "
            "reason = ?, verified_at = ?, updated_at = ?, run_id = ?, mtime_ns = ?, fold_path = ? "
            "WHERE key = ? AND dest = ?")


def record_done(tx: Tx, done: Sequence[tuple[Any, ...]]) -> None:
    """Landed objects: (state, path, sha256, md5, checks, not_checked, reason, verified_at,
    updated_at, run_id, mtime_ns, fold_path, key, dest) each."""
    tx.executemany(DONE_ROW, done)


def record_worker(tx: Tx, key: str, dest: str, worker: str) -> None:
    """The cluster worker (cloudexit/cluster) whose attempt this row's state came from."""
    tx.execute("UPDATE transfers SET worker = ? WHERE key = ? AND dest = ?", (worker, key, dest))


def workers(db: Any, dest: str | None = None) -> list[dict[str, Any]]:
    """Per cluster worker: objects it placed, their bytes, objects whose last attempt failed on
    it, and when it last reported (`status --json`)."""
    where, params = ("WHERE worker IS NOT NULL", []) if dest is None else (
        "WHERE worker IS NOT NULL AND dest = ?", [dest])
    return [{"worker": r[0], "objects": r[1], "bytes": r[2] or 0, "errors": r[3], "last_seen": r[4]}
            for r in db.execute(
                "SELECT worker, sum(state IN ('verified', 'quarantined')), "
                "sum(CASE WHEN state IN ('verified', 'quarantined') THEN size ELSE 0 END), "
                f"sum(state = 'failed'), max(updated_at) FROM transfers {where} GROUP BY worker ORDER BY worker",
                params).fetchall()]


def record_part_sizes(tx: Tx, key: str, dest: str, recorded: str | None) -> None:
    tx.execute("UPDATE transfers SET part_sizes = ? WHERE key = ? AND dest = ?", (recorded, key, dest))


def record_decoded(tx: Tx, key: str, dest: str, encoding: str, raw_sha256: str, size: int) -> None:
    """The file is the decoded instance: the raw object is recorded beside it."""
    tx.execute("UPDATE transfers SET encoding = ?, raw_sha256 = ?, file_size = ? WHERE key = ? AND dest = ?",
               (encoding, raw_sha256, size, key, dest))


def set_state(tx: Tx, key: str, dest: str, state_name: str, stamp: str, reason: str | None = None,
              only_if: str | None = None) -> None:
    """One row's state (and reason, when given); `only_if`: only from that state."""
    sql = "UPDATE transfers SET state = ?, updated_at = ?"
    params: list[Any] = [state_name, stamp]
    if reason is not None:
        sql += ", reason = ?"
        params.append(reason)
    sql += " WHERE key = ? AND dest = ?"
    params += [key, dest]
    if only_if is not None:
        sql += " AND state = ?"
        params.append(only_if)
    tx.execute(sql, params)


def requeue_fetching(tx: Tx, dest: str, keys: Iterable[str], stamp: str) -> None:
    """Rows handed to workers that did not finish (a stop): queued again."""
    tx.executemany("UPDATE transfers SET state = 'queued', updated_at = ? "
                   "WHERE key = ? AND dest = ? AND state = 'fetching'", [(stamp, k, dest) for k in keys])


def new_version(tx: Tx, key: str, dest: str, etag: str, size: int, stamp: str) -> None:
    """Changed at the source during the migration: read its header again (state inspect)."""
    tx.execute("UPDATE transfers SET state = 'inspect', etag = ?, size = ?, path = NULL, "
               "changes = changes + 1, updated_at = ? WHERE key = ? AND dest = ?", (etag, size, stamp, key, dest))


def path_of_restoring(tx: Tx, key: str, dest: str) -> tuple[str | None] | None:
    row = tx.execute("SELECT path FROM transfers WHERE key = ? AND dest = ? AND state = 'restoring'",
                     (key, dest)).fetchone()
    return None if row is None else (row[0],)


def new_identity(tx: Tx, key: str, dest: str, etag: str, size: int) -> None:
    tx.execute("UPDATE transfers SET etag = ?, size = ?, changes = changes + 1 WHERE key = ? AND dest = ?",
               (etag, size, key, dest))


def placed(tx: Tx, key: str, dest: str, state_name: str, kind: str, path: str | None, conflict: str | None,
           etag: str, size: int, stamp: str, fold: str | None) -> None:
    """An object whose header was read (again): where it goes, and queued (or skipped)."""
    tx.execute("UPDATE transfers SET state = ?, kind = ?, path = ?, conflict_with = ?, etag = ?, "
               "size = ?, updated_at = ?, fold_path = ? WHERE key = ? AND dest = ?",
               (state_name, kind, path, conflict, etag, size, stamp, fold, key, dest))


def clear_path(tx: Tx, key: str, dest: str) -> None:
    """Before a new path is given out: this row's own path must not count as taken."""
    tx.execute("UPDATE transfers SET path = NULL WHERE key = ? AND dest = ?", (key, dest))


# -- the archive's work queue: paths and the inventory ----------------------------------------------
def sop_holder(tx: Tx, dest: str, sop_uid: str, key: str) -> str | None:
    """The key that holds this SOP Instance UID's canonical path at `dest` (another key)."""
    row = tx.execute(
        "SELECT t.key FROM objects x CROSS JOIN transfers t ON t.key = x.key AND t.dest = ? "
        "WHERE x.sop_uid = ? AND x.key != ? AND x.kind = 'dicom' AND t.conflict_with IS NULL "
        "AND t.state != 'missing' LIMIT 1", (dest, sop_uid, key)).fetchone()
    return None if row is None else str(row[0])


def fold_holder(tx: Tx, dest: str, folded: str, key: str) -> str | None:
    """Another key whose path this destination takes as the same name (case, Unicode form)."""
    row = tx.execute("SELECT key FROM transfers WHERE dest = ? AND fold_path = ? AND key != ? LIMIT 1",
                     (dest, folded, key)).fetchone()
    return None if row is None else str(row[0])


def path_and_below(tx: Tx, dest: str, path: str) -> list[tuple[str, str]]:
    """(key, path) of the rows at `path` or below it (two at most: one probe of the path index)."""
    return [(r[0], r[1]) for r in tx.execute(
        "SELECT key, path FROM transfers WHERE dest = ? AND path >= ? AND path < ? "
        "AND (path = ? OR substr(path, ?, 1) = '/') LIMIT 2", (dest, path, path + "0", path, len(path) + 1))]


def key_at(tx: Tx, dest: str, path: str) -> str | None:
    row = tx.execute("SELECT key FROM transfers WHERE dest = ? AND path = ?", (dest, path)).fetchone()
    return None if row is None else str(row[0])


def requeue_for_run(tx: Tx, dest: str, stamp: str, non_dicom: str) -> int:
    """At the start of a run: rows a killed run left in flight, and failed ones, queued again;
    non-DICOM rows skipped or queued as `non_dicom` says; rows of deleted objects missing.
    Returns how many were found deleted."""
    tx.execute("UPDATE transfers SET state = 'queued', updated_at = ? WHERE dest = ? AND state = 'fetching'",
               (stamp, dest))
    tx.execute("UPDATE transfers SET state = CASE WHEN path IS NULL THEN 'inspect' ELSE 'queued' END, "
               "updated_at = ? WHERE dest = ? AND state = 'failed'", (stamp, dest))
    tx.execute("UPDATE transfers SET state = 'queued' WHERE dest = ? AND state = 'skipped' AND ? = 'copy'",
               (dest, non_dicom))
    tx.execute("UPDATE transfers SET state = 'skipped' WHERE dest = ? AND state = 'queued' "
               "AND kind = 'other' AND ? = 'skip'", (dest, non_dicom))
    return int(tx.execute(
        "UPDATE transfers SET state = 'missing', reason = 'deleted at the source (found by inventory)', "
        "updated_at = ? WHERE dest = ? AND state NOT IN ('verified', 'duplicate', 'quarantined', 'missing') "
        "AND key IN (SELECT key FROM objects WHERE status = 'deleted')", (stamp, dest)).rowcount)


def changed_at_source(tx: Tx, dest: str) -> list[sqlite3.Row]:
    """Objects whose inventoried version is not the one this row fetched or queued."""
    return rows(tx, "SELECT o.*, t.state AS t_state, t.etag AS t_etag, t.sha256 AS t_sha256, t.path AS t_path "
                "FROM transfers t JOIN objects o ON o.key = t.key WHERE t.dest = ? AND "
                "o.status = 'present' AND t.etag IS NOT o.etag", (dest,)).fetchall()


def reset_to_version(tx: Tx, key: str, dest: str, state_name: str, o: sqlite3.Row, path: str | None,
                     conflict: str | None, stamp: str, fold: str | None) -> None:
    """Forget what was fetched of an older version: the row starts again for `o`'s."""
    tx.execute(
        "UPDATE transfers SET state = ?, etag = ?, size = ?, kind = ?, path = ?, conflict_with = ?, "
        "sha256 = NULL, md5 = NULL, checks = NULL, reason = NULL, changes = changes + 1, "
        "encoding = NULL, raw_sha256 = NULL, file_size = NULL, "
        "updated_at = ?, fold_path = ? WHERE key = ? AND dest = ?",
        (state_name, o["etag"], o["size"], o["kind"], path, conflict, stamp, fold, key, dest))


def new_objects(tx: Tx, dest: str, order: str) -> tuple[int, sqlite3.Cursor]:
    """Inventoried objects without a row at `dest`, numbered in the order of work: (the highest
    seq so far, rows with `rn` and `twin`). Call `end_new_objects` when done with the rows."""
    base = int(tx.execute("SELECT coalesce(max(seq), 0) FROM transfers WHERE dest = ?", (dest,)).fetchone()[0])
    tx.execute("DROP TABLE IF EXISTS temp.cx_new")
    tx.execute(
        f"CREATE TEMP TABLE cx_new AS SELECT o.key AS key, row_number() OVER (ORDER BY {order}) AS rn "
        "FROM objects o WHERE o.status = 'present' AND NOT EXISTS "
        "(SELECT 1 FROM transfers t WHERE t.key = o.key AND t.dest = ?)", (dest,))
    # `twin`: another DICOM object has the same SOP Instance UID (an index probe here, so the
    # conflict query runs only for those).
    return base, rows(tx, "SELECT o.*, n.rn, o.kind = 'dicom' AND EXISTS (SELECT 1 FROM objects x "
                          "WHERE x.sop_uid = o.sop_uid AND x.key != o.key AND x.kind = 'dicom') AS twin "
                          "FROM temp.cx_new n JOIN objects o ON o.key = n.key ORDER BY n.rn")


def end_new_objects(tx: Tx) -> None:
    tx.execute("DROP TABLE temp.cx_new")


def insert_row(tx: Tx, o: sqlite3.Row, dest: str, seq: int, state_name: str, path: str | None,
               conflict: str | None, stamp: str, fold: str | None) -> None:
    tx.execute("INSERT INTO transfers(key, dest, seq, state, etag, size, kind, path, conflict_with, "
               "updated_at, fold_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (o["key"], dest, seq, state_name, o["etag"], o["size"], o["kind"], path, conflict, stamp, fold))


def conflicts(state: Any, dest: str) -> list[sqlite3.Row]:
    """Verified rows that share a SOP Instance UID (or a folded name) with a canonical holder."""
    return list(state.query(
        "SELECT t.key, t.sha256, t.path, t.conflict_with, c.sha256 AS canon_sha, c.state AS canon_state, "
        "c.path AS canon_path FROM transfers t JOIN transfers c ON c.key = t.conflict_with AND c.dest = t.dest "
        "WHERE t.dest = ? AND t.state = 'verified' AND t.conflict_with IS NOT NULL", (dest,)))


def mark_duplicate(tx: Tx, key: str, dest: str, reason: str, stamp: str) -> None:
    tx.execute("UPDATE transfers SET state = 'duplicate', path = NULL, reason = ?, updated_at = ? "
               "WHERE key = ? AND dest = ?", (reason, stamp, key, dest))


def awaiting_restore(state: Any, dest: str, limit: int) -> list[sqlite3.Row]:
    """Rows waiting for a restore that none was asked for yet (or one of an older version)."""
    return list(state.query(
        "SELECT t.key, t.etag, o.storage_class FROM transfers t JOIN objects o ON o.key = t.key "
        "LEFT JOIN restores r ON r.key = t.key WHERE t.dest = ? AND t.state = 'restoring' "
        "AND (r.key IS NULL OR (r.status = 'restored' AND r.etag IS NOT t.etag)) LIMIT ?", (dest, limit)))


def to_inspect(state: Any, dest: str, limit: int) -> list[sqlite3.Row]:
    """Rows whose object's header must be read before it has a path."""
    return list(state.query("SELECT t.key, t.etag, t.size FROM transfers t WHERE t.dest = ? "
                            "AND t.state = 'inspect' LIMIT ?", (dest, limit)))


# -- restores: one row per key, the last restore asked for ----------------------------------------
def is_restored(state: Any, key: str, etag: str | None) -> bool:
    """This version of the object was restored (a copy is readable)."""
    return bool(state.scalar("SELECT 1 FROM restores WHERE key = ? AND status = 'restored' AND etag IS ?",
                             (key, etag)))


def requested_restores(state: Any) -> list[sqlite3.Row]:
    """Restores asked for and not known to be done: key, etag."""
    return list(state.query("SELECT key, etag FROM restores WHERE status = 'requested'"))


def record_restore(tx: Tx, key: str, etag: str, storage_class: str | None, tier: str, days: int, status: str,
                   stamp: str, reason: str | None) -> None:
    """A restore request's answer (`requested`, `restored` or `failed`), replacing the key's last."""
    tx.execute(
        "INSERT INTO restores(key, etag, storage_class, tier, days, status, requested_at, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET etag = excluded.etag, "
        "status = excluded.status, requested_at = excluded.requested_at, reason = excluded.reason",
        (key, etag, storage_class, tier, days, status, stamp, reason))


def restore_checked(tx: Tx, key: str, stamp: str, done: bool, expiry: str | None) -> None:
    """A HEAD looked at a requested restore; `done`: the copy is readable until `expiry`."""
    tx.execute("UPDATE restores SET checked_at = ?, checks = checks + 1 WHERE key = ?", (stamp, key))
    if done:
        tx.execute("UPDATE restores SET status = 'restored', restored_at = ?, expiry = ? WHERE key = ?",
                   (stamp, expiry, key))


def forget_restore(tx: Tx, key: str) -> None:
    """The object is archived again: a restore done (or failed) before no longer counts."""
    tx.execute("DELETE FROM restores WHERE key = ? AND status != 'requested'", (key,))


# -- PACS destinations: one row per DICOM object and PACS, fed by the archive's verified files --------
def add_pacs_rows(tx: Tx, archive: str, dest: str, stamp: str) -> int:
    """A row at PACS `dest` for every DICOM object the archive will hold; how many were added."""
    return int(tx.execute(
        "INSERT INTO transfers(key, dest, seq, state, etag, size, kind, updated_at) "
        "SELECT a.key, ?, a.seq, 'queued', x.etag, x.size, x.kind, ? FROM transfers a "
        "JOIN objects x ON x.key = a.key WHERE a.dest = ? AND x.kind = 'dicom' AND x.status = 'present' "
        "AND NOT EXISTS (SELECT 1 FROM transfers p WHERE p.key = a.key AND p.dest = ?)",
        (dest, stamp, archive, dest)).rowcount)


def requeue_pacs(tx: Tx, dest: str, stamp: str) -> None:
    """At the start of a run: new versions queued, deleted objects missing, refusals worth another
    try (PACS out of resources, HTTP 5xx) and objects the archive did not have last time queued."""
    tx.execute(
        "UPDATE transfers SET state = 'queued', reason = NULL, updated_at = ?, "
        "etag = (SELECT x.etag FROM objects x WHERE x.key = transfers.key), "
        "size = (SELECT x.size FROM objects x WHERE x.key = transfers.key) WHERE dest = ? "
        "AND EXISTS (SELECT 1 FROM objects x WHERE x.key = transfers.key AND x.status = 'present' "
        "AND x.etag IS NOT transfers.etag)", (stamp, dest))
    tx.execute("UPDATE transfers SET state = 'missing', reason = 'deleted at the source (found by "
               "inventory)', updated_at = ? WHERE dest = ? AND state IN ('queued', 'failed', 'skipped') "
               "AND key IN (SELECT key FROM objects WHERE status = 'deleted')", (stamp, dest))
    transient = " OR ".join("reason LIKE ?" for _ in TRANSIENT_REASONS)
    tx.execute(f"UPDATE transfers SET state = 'queued', updated_at = ? WHERE dest = ? AND "
               f"(state = 'skipped' OR (state = 'failed' AND ({transient})))", (stamp, dest, *TRANSIENT_REASONS))


def deliverable(state: Any, archive: str, dest: str, limit: int) -> list[sqlite3.Row]:
    """PACS rows to deliver: queued, and the archive holds the verified file of that version.
    Never the second holder of a shared SOP Instance UID (conflict_with set): it ends as a
    duplicate or quarantined, and a PACS that overwrites instances would keep it in place of
    the first (see `settle_pacs`)."""
    return list(state.query(
        "SELECT p.key, a.path, a.sha256, coalesce(a.file_size, a.size) AS size, x.kind, x.sop_uid, "
        "x.sop_class_uid, x.study_uid, x.series_uid, x.transfer_syntax FROM transfers p "
        "JOIN transfers a ON a.key = p.key AND a.dest = ? JOIN objects x ON x.key = p.key "
        "WHERE p.dest = ? AND p.state = 'queued' AND a.path IS NOT NULL AND a.etag IS p.etag "
        "AND a.state = 'verified' AND a.conflict_with IS NULL "
        "ORDER BY p.seq LIMIT ?", (archive, dest, limit)))


def record_deliveries(tx: Tx, done: Sequence[tuple[Any, ...]]) -> None:
    """(state, reason, verified_at, updated_at, run_id, key, dest) of finished deliveries."""
    tx.executemany("UPDATE transfers SET state = ?, reason = ?, verified_at = ?, updated_at = ?, "
                   "run_id = ?, attempts = attempts + 1 WHERE key = ? AND dest = ?", done)


def settle_pacs(tx: Tx, archive: str, dest: str, stamp: str) -> None:
    """PACS rows the archive cannot feed: identical duplicates (delivered once, under the other
    key), objects gone at the source, objects quarantined or skipped in the archive."""
    tx.execute(
        "UPDATE transfers SET state = 'duplicate', updated_at = ?, "
        "conflict_with = (SELECT a.conflict_with FROM transfers a WHERE a.key = transfers.key "
        "AND a.dest = ?), reason = (SELECT 'identical to ' || quote(a.conflict_with) || "
        "' (same SHA-256): delivered once' FROM transfers a WHERE a.key = transfers.key AND a.dest = ?) "
        "WHERE dest = ? AND state = 'queued' AND key IN "
        "(SELECT key FROM transfers WHERE dest = ? AND state = 'duplicate')",
        (stamp, archive, archive, dest, archive))
    tx.execute(
        "UPDATE transfers SET state = 'missing', reason = 'missing at the source', updated_at = ? "
        "WHERE dest = ? AND state = 'queued' AND key IN "
        "(SELECT key FROM transfers WHERE dest = ? AND state = 'missing')", (stamp, dest, archive))
    reason = ("(SELECT 'not delivered: ' || a.state || ' in the archive' || coalesce(' (' || a.reason "
              "|| ')', '') FROM transfers a WHERE a.key = transfers.key AND a.dest = ?)")
    # A quarantined conflict copy is recorded here as such, beside the copy delivered.
    tx.execute(
        f"UPDATE transfers SET state = 'quarantined', updated_at = ?, reason = {reason}, "
        "conflict_with = (SELECT a.conflict_with FROM transfers a WHERE a.key = transfers.key "
        "AND a.dest = ?) WHERE dest = ? AND state = 'queued' AND key IN "
        "(SELECT key FROM transfers WHERE dest = ? AND state = 'quarantined' AND conflict_with IS NOT NULL)",
        (stamp, archive, archive, dest, archive))
    tx.execute(
        f"UPDATE transfers SET state = 'skipped', updated_at = ?, reason = {reason} "
        "WHERE dest = ? AND state = 'queued' AND key IN "
        "(SELECT key FROM transfers WHERE dest = ? AND state IN ('quarantined', 'skipped'))",
        (stamp, archive, dest, archive))
