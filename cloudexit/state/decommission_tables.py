"""The decommission's tables: its runs (`decommission_runs`), the store's answer for each object
(`deletions`), and its temp tables in the state DB connection: the bucket listing (streamed in,
read back key by key) and a plan's manifest rows (read back in pages). SQLite keeps temp tables
on disk past its page cache, so a bucket of millions of versions is never held in memory. (The
audit reads the first two in report/deletion.py.)"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from cloudexit.core.states import DecommissionMode, DecommissionStatus
from cloudexit.core.states import DeletionOutcome as Outcome
from cloudexit.s3.cleanup import Version
from cloudexit.state.db import State

_TABLES = itertools.count()  # temp table names, one per listing


@dataclass
class ManifestRow:
    action: str  # delete | keep
    key: str
    version_id: str | None
    is_latest: bool
    delete_marker: bool
    etag: str | None
    size: int
    last_modified: str
    sha256: str | None = None
    kept_at: list[str] = field(default_factory=list)
    how: str = ""  # delete: version (by VersionId) | if-match (by key, ETag condition) | marker | key
    reason: str = ""

    def db_row(self) -> tuple[Any, ...]:
        """The values of `ROW_COLUMNS` (read back by `row_of`)."""
        return (self.action, self.key, self.version_id, int(self.is_latest), int(self.delete_marker), self.etag,
                self.size, self.last_modified, self.sha256, ";".join(self.kept_at), self.how, self.reason)

    def csv_row(self) -> list[Any]:
        return [self.action, self.key, self.version_id or "", int(self.is_latest),
                int(self.delete_marker), self.etag or "", self.size, self.last_modified,
                self.sha256 or "", ";".join(self.kept_at), self.how, self.reason]


ROW_COLUMNS = ("action", "key", "version_id", "is_latest", "delete_marker", "etag", "size",
                "last_modified", "sha256", "kept_at", "how", "reason")


class Rows(Sequence[ManifestRow]):
    """The manifest rows of a plan that match `where`, read from the state DB's temp table in
    pages: a bucket of millions of versions is never held in memory."""

    _PAGE = 1000

    def __init__(self, state: State, table: str, where: str = "1") -> None:
        self.state, self.table, self.where = state, table, where
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            self._len = int(self.state.scalar(f"SELECT count(*) FROM {self.table} WHERE {self.where}"))
        return self._len

    @overload
    def __getitem__(self, index: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[ManifestRow]: ...

    def __getitem__(self, index: int | slice) -> ManifestRow | list[ManifestRow]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._select(max(0, stop - start), start)
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(index)
        return self._select(1, i)[0]

    def __iter__(self) -> Iterator[ManifestRow]:
        last = 0
        while True:
            page = self.state.query(f"SELECT seq, {', '.join(ROW_COLUMNS)} FROM {self.table} "
                                    f"WHERE {self.where} AND seq > ? ORDER BY seq LIMIT ?", (last, self._PAGE))
            if not page:
                return
            last = page[-1]["seq"]
            yield from (row_of(r) for r in page)

    def _select(self, limit: int, offset: int) -> list[ManifestRow]:
        return [row_of(r) for r in self.state.query(
            f"SELECT {', '.join(ROW_COLUMNS)} FROM {self.table} WHERE {self.where} ORDER BY seq "
            "LIMIT ? OFFSET ?", (limit, offset))]


def row_of(r: Any) -> ManifestRow:
    return ManifestRow(r["action"], r["key"], r["version_id"], bool(r["is_latest"]), bool(r["delete_marker"]),
                       r["etag"], r["size"], r["last_modified"], r["sha256"],
                       r["kept_at"].split(";") if r["kept_at"] else [], r["how"], r["reason"])




def listing_table(state: State, listed: Iterable[Version]) -> str:
    """The bucket's listing, streamed into a temp table of the state DB connection (SQLite keeps
    temp tables on disk past its page cache), indexed by key. Returns its name."""
    table = f"temp.decommission_{next(_TABLES)}"
    state.conn.execute(f"CREATE TABLE {table} (key TEXT NOT NULL, version_id TEXT, etag TEXT, size INTEGER, "
                       "last_modified TEXT, is_latest INTEGER, delete_marker INTEGER)")
    insert = f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?)"
    batch: list[tuple[Any, ...]] = []
    for v in listed:
        batch.append((v.key, v.version_id, v.etag, v.size, v.last_modified, int(v.is_latest), int(v.delete_marker)))
        if len(batch) >= 1000:
            with state.transaction() as tx:
                tx.executemany(insert, batch)
            batch.clear()
    with state.transaction() as tx:
        tx.executemany(insert, batch)
        tx.execute(f"CREATE INDEX {table}_key ON {table.split('.', 1)[1]} (key)")
    return table


def key_batches(state: State, table: str, size: int) -> Iterator[tuple[list[str], dict[str, list[Version]]]]:
    """The listing, key by key in key order, `size` keys at a time, each key with its
    versions (and delete markers) in listing order."""
    last = ""
    while True:
        keys = [r[0] for r in state.query(f"SELECT DISTINCT key FROM {table} WHERE key > ? ORDER BY key LIMIT ?",
                                          (last, size))]
        if not keys:
            return
        versions: dict[str, list[Version]] = defaultdict(list)
        for r in state.query(f"SELECT * FROM {table} WHERE key >= ? AND key <= ? ORDER BY key, rowid",
                             (keys[0], keys[-1])):
            versions[r["key"]].append(Version(r["key"], r["version_id"], r["etag"], r["size"], r["last_modified"],
                                              bool(r["is_latest"]), bool(r["delete_marker"])))
        yield keys, versions
        last = keys[-1]




# -- decommission_runs and deletions --------------------------------------------------------------
def insert_run(tx: sqlite3.Connection, mode: DecommissionMode, status: DecommissionStatus, plan: dict[str, Any],
               started_at: str, finished_at: str | None = None) -> int:
    """A dry run or an execution, with the plan it carries out (`Plan.summary()`). Its id."""
    cur = tx.execute(
        "INSERT INTO decommission_runs(started_at, finished_at, mode, status, source, endpoint, versioning, "
        "all_versions, destinations, manifest, manifest_sha256, token, to_delete, to_delete_bytes, kept, "
        "kept_bytes, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (started_at, finished_at, mode, status, plan["source"], plan["endpoint"], plan["versioning"],
         int(plan["all_versions"]), json.dumps(plan["destinations"]), plan["manifest"], plan["manifest_sha256"],
         plan["token"], plan["to_delete"], plan["to_delete_bytes"], plan["kept"], plan["kept_bytes"],
         json.dumps(plan["kept_by_reason"])))
    return int(cur.lastrowid or 0)


def finish_run(tx: sqlite3.Connection, run_id: int, finished_at: str, status: DecommissionStatus, deleted: int,
               failed: int, batches: int) -> None:
    tx.execute("UPDATE decommission_runs SET finished_at = ?, status = ?, deleted = ?, failed = ?, batches = ? "
               "WHERE id = ?", (finished_at, status, deleted, failed, batches, run_id))


DELETION_COLUMNS = ("run_id", "batch", "key", "version_id", "etag", "size", "sha256", "kept_at", "outcome",
                    "marker_version_id", "error_code", "response", "request_id", "deleted_at")


def insert_deletions(tx: sqlite3.Connection, records: list[tuple[Any, ...]]) -> None:
    """One batch's answers, each a tuple of DELETION_COLUMNS."""
    tx.executemany(f"INSERT INTO deletions({', '.join(DELETION_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(DELETION_COLUMNS))})", records)


def confirm_deletions(tx: sqlite3.Connection, run_id: int, listing: str, stamp: str) -> tuple[int, int, list[str]]:
    """Mark confirmed each deletion of `run_id` the new `listing` (a listing_table) shows: gone,
    or hidden by a delete marker. (confirmed now, still unconfirmed, the first 1000 of those)."""
    gone = ("CASE "
            f"WHEN outcome = '{Outcome.DELETE_MARKER}' THEN EXISTS (SELECT 1 FROM {listing} l "
            "WHERE l.key = deletions.key AND l.delete_marker AND l.is_latest) "
            f"WHEN version_id IS NOT NULL THEN NOT EXISTS (SELECT 1 FROM {listing} l WHERE l.key = deletions.key "
            "AND l.version_id = deletions.version_id) "
            f"ELSE NOT EXISTS (SELECT 1 FROM {listing} l WHERE l.key = deletions.key AND NOT l.delete_marker "
            "AND l.etag IS deletions.etag) END")
    done = f"run_id = ? AND outcome != '{Outcome.FAILED}'"
    confirmed = tx.execute(f"UPDATE deletions SET confirmed_at = ? WHERE {done} AND {gone}", (stamp, run_id)).rowcount
    left = tx.execute(f"SELECT count(*) FROM deletions WHERE {done} AND confirmed_at IS NULL", (run_id,)).fetchone()[0]
    keys = [r[0] for r in tx.execute(
        f"SELECT key FROM deletions WHERE {done} AND confirmed_at IS NULL ORDER BY id LIMIT 1000", (run_id,))]
    return confirmed, int(left), keys
