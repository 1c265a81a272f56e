"""The state database: one SQLite file per migration, the single source of truth.

Every command reads and writes here. The schema and its migration steps are in
cloudexit/state/schema.py, documented in docs/state-db.md; change both together.
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
from cloudexit.state.schema import MIGRATIONS, SCHEMA_VERSION

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
            version = self.schema_version()
            if version != SCHEMA_VERSION:
                self.conn.close()
                raise StateReadOnly(f"{self.path} is opened read-only and was written by another version of "
                                    f"cloudexit (schema {version}, this one reads "
                                    f"{SCHEMA_VERSION})", hint="copy it somewhere writable first")
        else:
            self._migrate(self.schema_version())
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
                for statement in MIGRATIONS[version].split(";"):
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
                cur.row_factory = sqlite3.Row
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
        value: str | None = self.scalar("SELECT value FROM meta WHERE key = ?", (key,))
        return value

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


def open_readable(path: str | os.PathLike[str], scratch: bool = False, untouched: bool = False) -> State:
    """Open a DB for a command that only reads it (status, audit verify), or that writes only
    its own results (verify, audit: `scratch`). `untouched`: never write the file, even when it
    could be (link-report, audit verify): opened read-only as if it were not writable, so an
    older schema is read from a migrated copy instead of migrated in place.

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
    if writable(path) and not untouched:
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
