"""The state database: one SQLite file per migration, the single source of truth.

Every command reads and writes here. The schema is documented in docs/state-db.md; change
both together and add a migration step to `_MIGRATIONS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, NoReturn

import sqlite_utils

from cloudexit import __version__
from cloudexit.state import patientkey
from cloudexit.state import file as statefile
from cloudexit.core.errors import StateError, StateReadOnly
from cloudexit.core.files import make_private_dirs
from cloudexit.state.file import (
    APP_ID,
    READ_ONLY_HINT,
    exists,
    connect_readonly,
    refuse_foreign,
    writable,
)

SCHEMA_VERSION = 13

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE objects (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    etag TEXT,
    last_modified TEXT,
    storage_class TEXT,
    checksums TEXT,                      -- JSON {header: value} from the provider
    status TEXT NOT NULL DEFAULT 'present',   -- present | deleted
    change TEXT NOT NULL DEFAULT 'new',       -- new | unchanged | changed | deleted
    change_round INTEGER,                -- inventory round that set `change`
    kind TEXT NOT NULL DEFAULT 'pending',     -- pending | dicom | other | unreadable
    reason TEXT,
    key_flags TEXT,                      -- why the key is unsafe as a path, comma separated
    study_uid TEXT, series_uid TEXT, sop_uid TEXT, sop_class_uid TEXT,
    modality TEXT, study_date TEXT, transfer_syntax TEXT, patient_hash TEXT,
    header_source TEXT,                  -- header | key-pattern
    header_bytes INTEGER NOT NULL DEFAULT 0,  -- bytes downloaded to classify this object
    first_seen_round INTEGER NOT NULL,
    last_seen_round INTEGER NOT NULL,
    updated_at TEXT
);
CREATE INDEX objects_pending ON objects(key) WHERE kind = 'pending';
CREATE INDEX objects_study ON objects(study_uid, series_uid);
CREATE INDEX objects_sop ON objects(sop_uid);
CREATE TABLE inventory_rounds (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,                -- running | complete | failed
    resumed INTEGER NOT NULL DEFAULT 0,  -- times this round was resumed after an interruption
    list_requests INTEGER NOT NULL DEFAULT 0,
    get_requests INTEGER NOT NULL DEFAULT 0,
    header_bytes INTEGER NOT NULL DEFAULT 0,
    key_pattern TEXT
);
CREATE TABLE list_tasks (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    prefix TEXT NOT NULL,
    start_after TEXT,                    -- exclusive lower bound (S3 StartAfter)
    end_before TEXT,                     -- exclusive upper bound, NULL: to the end of prefix
    explore INTEGER NOT NULL DEFAULT 0,  -- 1: delimiter listing that plans the others
    last_key TEXT,                       -- resume point: last key committed
    done INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    keys INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT,                         -- JSON
    prev_hash TEXT NOT NULL,             -- hash of the previous event (64 zeros for the first)
    hash TEXT NOT NULL                   -- sha256(prev_hash, at, kind, detail): a hash chain
);
"""

# Version 2: migrate (runs, per-object transfers per destination, ranges of large objects,
# archive restores). See docs/state-db.md.
_SCHEMA_V2 = """
CREATE TABLE migration_runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,                -- running | complete | partial | interrupted | stopped
    dest TEXT NOT NULL,                  -- destination id (file:///srv/pacs-archive)
    options TEXT NOT NULL,               -- JSON: layout, order, non_dicom, restore tier...
    bwlimit TEXT,                        -- timetable in force, changed live by `migrate --bwlimit`
    resumed INTEGER NOT NULL DEFAULT 0,
    pid INTEGER, host TEXT, heartbeat_at TEXT,
    waiting_since TEXT,                  -- the endpoint has not answered since (NULL: link up)
    stop_reason TEXT,
    get_requests INTEGER NOT NULL DEFAULT 0,
    head_requests INTEGER NOT NULL DEFAULT 0,
    list_requests INTEGER NOT NULL DEFAULT 0,
    restore_requests INTEGER NOT NULL DEFAULT 0,
    bytes_downloaded INTEGER NOT NULL DEFAULT 0,   -- body bytes received, retries included
    bytes_verified INTEGER NOT NULL DEFAULT 0,
    objects_verified INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    link_outages INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE transfers (
    key TEXT NOT NULL,
    dest TEXT NOT NULL,
    seq INTEGER NOT NULL,                -- order of work
    state TEXT NOT NULL,                 -- queued | fetching | verified | duplicate | quarantined | failed | missing | skipped | restoring
    etag TEXT,                           -- the version this row is about
    size INTEGER,
    kind TEXT,
    path TEXT,                           -- relative to the destination
    sha256 TEXT,
    md5 TEXT,
    checks TEXT,                         -- checks passed, comma separated
    not_checked TEXT,                    -- checks that could not be made, and why
    reason TEXT,
    conflict_with TEXT,                  -- key holding the SOP Instance UID's canonical path
    attempts INTEGER NOT NULL DEFAULT 0,
    changes INTEGER NOT NULL DEFAULT 0,  -- times the source changed under us
    range_size INTEGER,                  -- large objects: bytes per ranged GET
    run_id INTEGER,
    started_at TEXT,
    verified_at TEXT,
    updated_at TEXT,
    PRIMARY KEY (key, dest)
);
CREATE INDEX transfers_work ON transfers(dest, state, seq);
CREATE UNIQUE INDEX transfers_path ON transfers(dest, path);
CREATE TABLE transfer_ranges (
    key TEXT NOT NULL,
    dest TEXT NOT NULL,
    etag TEXT NOT NULL,
    idx INTEGER NOT NULL,                -- range number (range_size bytes each) on disk and fsynced
    PRIMARY KEY (key, dest, etag, idx)
);
CREATE TABLE restores (
    key TEXT PRIMARY KEY,
    etag TEXT,
    storage_class TEXT,
    tier TEXT,
    days INTEGER,
    status TEXT NOT NULL,                -- requested | restored | failed
    requested_at TEXT,
    checked_at TEXT,
    restored_at TEXT,
    expiry TEXT,
    checks INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
"""

# Version 3: `cloudexit verify` (reconciliation runs, per-study counts, findings, PACS samples).
# See docs/verify.md.
_SCHEMA_V3 = """
CREATE TABLE verify_runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    dest TEXT NOT NULL,                  -- destination id (file:///..., dicom://AET@HOST:PORT, dicomweb+https://...)
    kind TEXT NOT NULL,                  -- filesystem | dicom | dicomweb
    options TEXT NOT NULL,               -- JSON: deep, sample, seed
    status TEXT NOT NULL,                -- running | passed | failed | error
    summary TEXT                         -- JSON: the report's counts
);
CREATE TABLE verify_studies (
    run_id INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    expected_instances INTEGER NOT NULL, -- distinct SOP Instance UIDs in the inventory
    found_instances INTEGER,             -- NULL: the destination has no such study
    expected_series INTEGER,
    found_series INTEGER,
    status TEXT NOT NULL,                -- ok | missing | mismatch
    PRIMARY KEY (run_id, study_uid)
);
CREATE TABLE verify_findings (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    level TEXT NOT NULL,                 -- object | file | study | series | instance
    problem TEXT NOT NULL,               -- missing | extra | size | sha256 | not-a-file | not-delivered | count
    key TEXT, path TEXT, study_uid TEXT, series_uid TEXT, sop_uid TEXT,
    expected TEXT, found TEXT,
    detail TEXT
);
CREATE INDEX verify_findings_run ON verify_findings(run_id, level);
CREATE TABLE verify_samples (
    run_id INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    key TEXT,                            -- the archived copy compared with
    result TEXT NOT NULL,                -- identical | equivalent | differs | not-compared
    pixel TEXT,                          -- same | differs | transcoded-same | transcoded-not-compared
    transfer_syntax TEXT,                -- archived -> PACS, when they differ
    differences TEXT,                    -- JSON list of {tag, keyword, change}, values only for non-identifying attributes
    PRIMARY KEY (run_id, sop_uid)
);
"""

# Version 4: migrate records the bytes of partial temp files it continued, and how far each
# range of a large object got (Range resume inside a range).
_SCHEMA_V4 = """
ALTER TABLE migration_runs ADD COLUMN bytes_resumed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE transfer_ranges ADD COLUMN bytes INTEGER
"""  # transfer_ranges.bytes: bytes of the range on disk and fsynced (NULL: the whole range)

# Version 5: playbooks (`cloudexit run`: one row per step and its state) and decommissioning
# (`cloudexit decommission`: dry runs and executions, and one row per deletion with the store's
# answer: the proof of deletion). See docs/state-db.md.
_SCHEMA_V5 = """
CREATE TABLE playbook_steps (
    playbook TEXT NOT NULL,              -- the playbook's name
    step TEXT NOT NULL,                  -- the step's name, unique in the playbook
    kind TEXT NOT NULL,                  -- inventory | plan | pilot | migrate | delta | verify | audit | checkpoint | decommission
    seq INTEGER NOT NULL,                -- position in the playbook
    status TEXT NOT NULL,                -- pending | running | done | gated | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    finished_at TEXT,
    message TEXT,                        -- why it stopped (gate not met, error), or what it did
    result TEXT,                         -- JSON: the step's figures
    playbook_sha256 TEXT,                -- the playbook text that last ran the step
    PRIMARY KEY (playbook, step)
);
CREATE TABLE decommission_runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    mode TEXT NOT NULL,                  -- dry-run | execute
    status TEXT NOT NULL,                -- running | planned | complete | partial | refused
    source TEXT NOT NULL,                -- s3://BUCKET/PREFIX
    endpoint TEXT,
    versioning TEXT,                     -- Enabled | Suspended | off (never enabled)
    all_versions INTEGER NOT NULL DEFAULT 0,
    destinations TEXT NOT NULL,          -- JSON list: every destination a copy had to be verified at
    manifest TEXT,                       -- path of the deletion manifest (CSV)
    manifest_sha256 TEXT,
    token TEXT,                          -- confirmation token (hash of the rows to delete)
    to_delete INTEGER NOT NULL DEFAULT 0,        -- versions (or keys) planned for deletion
    to_delete_bytes INTEGER NOT NULL DEFAULT 0,
    kept INTEGER NOT NULL DEFAULT 0,             -- versions (or keys) left in the bucket
    kept_bytes INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    batches INTEGER NOT NULL DEFAULT 0,
    summary TEXT                         -- JSON: counts by reason kept, delete markers left
);
CREATE TABLE deletions (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,             -- decommission_runs.id
    batch INTEGER NOT NULL,              -- DeleteObjects request number within the run
    key TEXT NOT NULL,
    version_id TEXT,                     -- version deleted (NULL: unversioned bucket, or a delete marker was placed)
    etag TEXT,                           -- ETag of the data deleted, as verified at every destination
    size INTEGER,
    sha256 TEXT,                         -- SHA-256 of the verified copy kept on premise
    kept_at TEXT,                        -- JSON list of the destinations that hold the verified copy
    outcome TEXT NOT NULL,               -- deleted | delete-marker | failed
    marker_version_id TEXT,              -- the delete marker the store created (versioned, without --all-versions)
    error_code TEXT,                     -- the store's error code when failed (PreconditionFailed: changed since verified)
    response TEXT NOT NULL,              -- JSON: the store's answer for this object (its Deleted or Errors entry)
    request_id TEXT,                     -- x-amz-request-id of the DeleteObjects request
    deleted_at TEXT NOT NULL,            -- UTC, when the store answered
    confirmed_at TEXT                    -- UTC, when a listing after the deletion no longer showed it
);
CREATE INDEX deletions_key ON deletions(key);
CREATE INDEX deletions_run ON deletions(run_id, batch)
"""

# Version 6: `inventory --since` (a round that skipped folders dated before a day records the
# day, and the folders it skipped as done tasks), and indexes that feed listing tasks from the
# table in batches instead of holding them all in memory.
_SCHEMA_V6 = """
ALTER TABLE inventory_rounds ADD COLUMN since TEXT;
ALTER TABLE list_tasks ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0;
CREATE INDEX list_tasks_open ON list_tasks(round, id) WHERE done = 0;
CREATE INDEX list_tasks_skipped ON list_tasks(round, prefix) WHERE skipped = 1
"""

# Version 7: the archive folder's guard. `meta.migration_id` names this migration in the marker
# file of the archive folder it claims (`.cloudexit-archive.json`); `transfers.mtime_ns` is the
# file's modification time right after placement, so `verify` catches a replaced file without
# re-hashing; `transfers.fold_path` is the path as a case-folding (or Unicode-normalising)
# destination compares names, so two keys that differ only in case are a collision, not one file;
# `meta.redact_key` keys the per-segment hashes of `audit --redact-keys`.
_SCHEMA_V7 = """
ALTER TABLE transfers ADD COLUMN mtime_ns INTEGER;
ALTER TABLE transfers ADD COLUMN fold_path TEXT;
CREATE INDEX transfers_fold ON transfers(dest, fold_path) WHERE fold_path IS NOT NULL;
INSERT OR IGNORE INTO meta(key, value) VALUES ('migration_id', lower(hex(randomblob(16))));
INSERT OR IGNORE INTO meta(key, value) VALUES ('redact_key', lower(hex(randomblob(32))))
"""
# Version 8: migrate records the part sizes it learned of multipart objects whose parts are of
# unequal sizes (so they are asked once), and the egress counters of its worker processes.
_SCHEMA_V8 = """
ALTER TABLE transfers ADD COLUMN part_sizes TEXT;
CREATE TABLE meters (
    name TEXT PRIMARY KEY,               -- a worker process's meter file, beside the DB (cloudexit/meter.py)
    run_id INTEGER NOT NULL,             -- the migration run it counts for
    bytes INTEGER NOT NULL, gets INTEGER NOT NULL, heads INTEGER NOT NULL, lists INTEGER NOT NULL
)
"""  # transfers.part_sizes: JSON {"etag": ..., "sizes": [...]} (see cloudexit/parts.py);
# meters: the last reading of each meter file, already added to its run's counters
# Version 9: each inventory round records its new/changed/deleted counts when it completes
# (`objects.change` only keeps an object's latest change, so the counts of older rounds cannot
# be rebuilt from it). Rounds completed before are filled from their `inventory.complete` event.
_SCHEMA_V9 = """
ALTER TABLE inventory_rounds ADD COLUMN new_objects INTEGER;
ALTER TABLE inventory_rounds ADD COLUMN changed_objects INTEGER;
ALTER TABLE inventory_rounds ADD COLUMN deleted_objects INTEGER;
UPDATE inventory_rounds SET
    new_objects = (SELECT json_extract(e.detail, '$.new') FROM events e WHERE e.kind = 'inventory.complete'
                   AND json_extract(e.detail, '$.round') = inventory_rounds.id ORDER BY e.id DESC LIMIT 1),
    changed_objects = (SELECT json_extract(e.detail, '$.changed') FROM events e WHERE e.kind = 'inventory.complete'
                       AND json_extract(e.detail, '$.round') = inventory_rounds.id ORDER BY e.id DESC LIMIT 1),
    deleted_objects = (SELECT json_extract(e.detail, '$.deleted') FROM events e WHERE e.kind = 'inventory.complete'
                       AND json_extract(e.detail, '$.round') = inventory_rounds.id ORDER BY e.id DESC LIMIT 1)
WHERE status = 'complete'
"""
# Version 10: objects a PACS wrote in an envelope (Orthanc's zlib attachments, gzip): the
# inventory records the envelope and the decoded size, and Orthanc's own metadata attachments;
# migrate records what it decoded: the raw object's SHA-256 beside the plain file's.
_SCHEMA_V10 = """
ALTER TABLE objects ADD COLUMN encoding TEXT;
ALTER TABLE objects ADD COLUMN plain_size INTEGER;
ALTER TABLE objects ADD COLUMN pacs_metadata TEXT;
ALTER TABLE transfers ADD COLUMN encoding TEXT;
ALTER TABLE transfers ADD COLUMN raw_sha256 TEXT;
ALTER TABLE transfers ADD COLUMN file_size INTEGER
"""

# Versions 11 and 12: reserved for the link evidence and zipped studies (merged from their own
# changes).
_SCHEMA_V11 = ""
_SCHEMA_V12 = ""
# Version 13: `migrate --cluster` records which dask worker fetched each object (NULL: this
# machine's worker processes), for `status --json` (workers) and the manifest.
_SCHEMA_V13 = """
ALTER TABLE transfers ADD COLUMN worker TEXT
"""

_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4,
                                 5: _SCHEMA_V5, 6: _SCHEMA_V6, 7: _SCHEMA_V7,
                                 8: _SCHEMA_V8, 9: _SCHEMA_V9, 10: _SCHEMA_V10,
                                 11: _SCHEMA_V11, 12: _SCHEMA_V12, 13: _SCHEMA_V13}


GENESIS_HASH = "0" * 64


def event_hash(prev: str, at: str, kind: str, detail: str | None) -> str:
    payload = json.dumps([prev, at, kind, detail], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _create_private(path: Path) -> None:
    """Create the DB file 0600 in a 0700 directory (every folder created for it 0700) before
    SQLite touches it."""
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def discard_if_empty(path: str | os.PathLike[str]) -> bool:
    """Delete a state DB (and its WAL files) that holds no object and no run: what a first
    command that failed at once (a wrong bucket, no credentials) leaves. True if deleted."""
    target = Path(path)
    try:
        conn = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
        try:
            used = conn.execute("SELECT (SELECT count(*) FROM objects) + "
                                "(SELECT count(*) FROM migration_runs)").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return False  # not ours, or not readable: leave it alone
    if used:
        return False
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    return True


class State:
    """An open state database. Thread-safe: writes are serialised by a lock.

    `readonly`: open without writing anything (an auditor's copy: 0400, a read-only folder or
    mount); every write then fails with StateReadOnly. `open_readable` picks it when needed.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = False, readonly: bool = False,
                 key_of: Path | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.scratch_of: Path | None = None  # set by `open_readable`: a private copy of this DB
        self.lock = threading.RLock()
        fresh = not exists(self.path)
        if fresh and not create:
            raise StateError(f"no state database at {self.path}",
                             hint="run `cloudexit inventory s3://BUCKET` first, or pass --db")
        if fresh:
            _create_private(self.path)
        else:
            refuse_foreign(self.path)
            if not readonly and not writable(self.path):
                raise StateReadOnly(f"the state database {self.path} is read-only (file mode, folder or "
                                    "mount), and this command must write to it", hint=READ_ONLY_HINT)
        self.conn = self._connect()
        try:
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise self._error(exc) or StateError(
                f"{self.path} is not a cloudexit state database ({exc})") from exc
        if fresh:
            self._migrate(0)
        elif app_id != APP_ID:
            self.conn.close()
            raise StateError(f"{self.path} is not a cloudexit state database",
                             hint="pass --db with a new file name for a new migration")
        elif readonly:
            if self.schema_version() != SCHEMA_VERSION:
                self.conn.close()
                raise StateReadOnly(f"{self.path} is read-only and was written by another version of "
                                    f"cloudexit (schema {self.schema_version()}, this one reads "
                                    f"{SCHEMA_VERSION})", hint="copy it somewhere writable first")
        else:
            self._migrate(self.schema_version())
        self.db = sqlite_utils.Database(self.conn)
        self.key_path = key_of or patientkey.key_path(self.path)
        self._patient_key: patientkey.PatientKey | None = None
        if not readonly and key_of is None:
            self._settle_patient_key()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            return connect_readonly(self.path)
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._error(exc) or StateError(
                f"{self.path} is not a cloudexit state database ({exc})") from exc
        return conn

    def _reraise(self, exc: BaseException) -> NoReturn:
        error = self._error(exc)
        if error is None:
            raise exc
        raise error from exc

    def _error(self, exc: BaseException) -> StateError | None:
        """The user's error for an SQLite failure on this DB (full disk, read-only, damaged
        pages), or None: the caller re-raises the original."""
        if self.readonly and isinstance(exc, sqlite3.Error) and (
                "readonly" in str(exc) or "read-only" in str(exc)):
            return StateReadOnly(f"the state database {self.path} was opened read-only and this "
                                 "command must write to it", hint=READ_ONLY_HINT)
        return statefile.translate(exc, self.path)

    def close(self) -> None:
        self.conn.close()
        if self.scratch_of is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise StateError(f"{self.path} was written by a newer cloudexit (schema {current})",
                             hint="upgrade cloudexit")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={version}")
                self.conn.execute(f"PRAGMA application_id={APP_ID}")
        if current == 0:
            self.set_meta(created_at=now(), tool_version=__version__)

    # -- the patient key ------------------------------------------------------------------
    def _settle_patient_key(self) -> None:
        """Give a new DB its key file; move an old DB's key (`meta.salt`) out of the DB.

        The salt is deleted with secure_delete on and the WAL checkpointed and truncated, so
        no copy of it stays in the file's free space or in the WAL.
        """
        salt = self.meta("salt")
        if salt is not None:
            patientkey.move_out(self.key_path, salt)
            self.conn.execute("PRAGMA secure_delete=ON")
            try:
                with self.transaction() as tx:
                    tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('patient_key_check', ?)",
                               (patientkey.check_value(salt),))
                    tx.execute("DELETE FROM meta WHERE key = 'salt'")
                    self.log("patient_key.moved_out", tx, key_file=str(self.key_path))
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.conn.execute("PRAGMA secure_delete=OFF")
        elif self.meta("patient_key_check") is None:
            key = patientkey.adopt_or_create(self.key_path)
            self.set_meta(patient_key_check=patientkey.check_value(key))

    def patient_key(self) -> patientkey.PatientKey:
        """This DB's key (`key` None when its file is missing or another DB's: see `problem`)."""
        if self._patient_key is None:
            self._patient_key = patientkey.read(self.key_path, self.meta("patient_key_check"))
        return self._patient_key

    # -- helpers --------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write; everything inside commits together or not at all."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._reraise(exc)
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self.conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                self._reraise(exc)

    def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        with self.lock:
            try:
                cur = self.conn.execute(sql, params)
                cur.row_factory = sqlite3.Row  # type: ignore[assignment]
                return cur.fetchall()
            except sqlite3.Error as exc:
                self._reraise(exc)

    def scalar(self, sql: str, params: Any = ()) -> Any:
        with self.lock:
            try:
                row = self.conn.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                self._reraise(exc)
        return row[0] if row else None

    def backup(self) -> str | None:
        """A consistent copy beside the DB (`<db>.backup-1`; the one before is `-2`), or why
        not: a failed backup (no room for the copy) leaves the older ones and must not stop
        the work, so it is logged (`state.backup_failed`) and returned, not raised."""
        try:
            with self.lock:
                statefile.backup(self.conn, self.path)
            return None
        except StateError as exc:
            reason = str(exc).split("\n")[0]
        try:
            self.log("state.backup_failed", reason=reason)
        except StateError:
            pass  # the disk that refused the copy may refuse the event too
        return reason

    def meta(self, key: str) -> str | None:
        return self.scalar("SELECT value FROM meta WHERE key = ?", (key,))

    def set_meta(self, **values: str | None) -> None:
        with self.transaction() as conn:
            for key, value in values.items():
                conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def log(self, kind: str, conn: sqlite3.Connection | None = None, **detail: Any) -> None:
        """Append to the event log (the audit's chain of custody reads it).

        Each event carries the hash of the one before, so an edit or a deletion anywhere in
        the log breaks the chain (`verify_event_chain`).
        """
        if conn is None:
            with self.transaction() as tx:
                self.log(kind, tx, **detail)
            return
        at, text = now(), json.dumps(detail, sort_keys=True, default=str)
        row = conn.execute("SELECT hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
        prev = row[0] if row else GENESIS_HASH
        conn.execute("INSERT INTO events(at, kind, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
                     (at, kind, text, prev, event_hash(prev, at, kind, text)))

    def verify_event_chain(self) -> list[str]:
        """Problems found in the event log's hash chain (empty: intact)."""
        problems, prev = [], GENESIS_HASH
        for row in self.query("SELECT id, at, kind, detail, prev_hash, hash FROM events ORDER BY id"):
            if row["prev_hash"] != prev:
                problems.append(f"event {row['id']}: does not follow the event before it "
                                "(an event was removed or inserted)")
            if event_hash(row["prev_hash"], row["at"], row["kind"], row["detail"]) != row["hash"]:
                problems.append(f"event {row['id']} ({row['kind']}): content altered")
            prev = row["hash"]
        return problems

    # -- source identity ------------------------------------------------------------------
    def bind_source(self, url: str, endpoint_url: str | None, region: str | None) -> None:
        """Tie this DB to one source; refuse to mix another bucket into it."""
        bound = self.meta("source_url")
        endpoint = endpoint_url or "aws"
        if bound is None:
            self.set_meta(source_url=url, endpoint_url=endpoint, region=region)
            return
        bound_endpoint = self.meta("endpoint_url")
        if bound != url or bound_endpoint != endpoint:
            raise StateError(
                f"{self.path} belongs to the migration of {bound} at {bound_endpoint}, "
                f"not {url} at {endpoint}",
                hint="use another --db (or CLOUDEXIT_DB) for a different bucket or prefix")


def open_readable(path: str | os.PathLike[str], scratch: bool = False) -> State:
    """Open a DB for a command that only reads it (status, audit verify), or that writes only
    its own results (verify, audit: `scratch`).

    A writable DB opens as usual. A read-only one (an auditor's copy: 0400, a read-only folder
    or mount) opens read-only, or, with `scratch` or an older schema, as a private temporary
    copy (SQLite's backup API into a 0700 temp folder, removed on close) whose writes are
    discarded: `scratch_of` then names the original, so the command can say nothing was
    recorded. The original is never written.
    """
    path = Path(path)
    if not exists(path):
        return State(path)  # says there is none
    refuse_foreign(path)
    if writable(path):
        return State(path)
    if not scratch:
        try:
            return State(path, readonly=True)
        except StateReadOnly:
            pass  # another schema: read a migrated copy
    folder = Path(tempfile.mkdtemp(prefix="cloudexit-readonly-"))
    copy = folder / path.name
    try:
        _create_private(copy)
        source, target = connect_readonly(path), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        state = State(copy, key_of=patientkey.key_path(path))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    state.scratch_of = path
    return state
