"""The state DB as a file: telling ours from others before opening, reading a read-only copy,
and when its disk or pages fail: clear errors, and the backups to recover from.

SQLite reports a full disk, a read-only file and damaged pages as `sqlite3` exceptions from
whatever statement met them. `translate` turns those into errors that name the file, its
filesystem and free space, or (for damage) run `PRAGMA quick_check` and say which backup to
restore. `backup` takes a consistent copy with SQLite's online backup API (safe while other
connections write) and keeps the last two beside the DB.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from cloudexit.core.errors import StateCorrupt, StateDiskFull, StateError, StateReadOnly
from cloudexit.core.units import format_bytes

APP_ID = 0x43455854  # "CEXT": tells our databases from any other SQLite file
_FULL, _CORRUPT, _NOTADB, _READONLY, _IOERR = 13, 11, 26, 8, 10
KEEP = 2  # backups kept: the newest, and the one before in case the newest caught the damage


_SQLITE_MAGIC = b"SQLite format 3\x00"


def refuse_foreign(path: Path) -> None:
    """Refuse a file that is certainly not ours from its first bytes, before SQLite opens it
    (opening read-write would already switch a foreign SQLite file to WAL: a modification)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(100)
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}",
                         hint="check the file's permissions, or pass another --db") from exc
    wal = Path(f"{path}-wal")
    pending = wal.exists() and wal.stat().st_size > 0  # page 1 may be newer there
    if not head and not pending:
        raise StateError(f"{path} is an empty file, not a cloudexit state database",
                         hint="pass --db with a name that does not exist yet (cloudexit creates it), "
                              "or remove the empty file")
    if head and not head.startswith(_SQLITE_MAGIC):
        raise StateError(f"{path} is not a cloudexit state database (not an SQLite file)",
                         hint="pass --db with a new file name for a new migration")
    if len(head) >= 72 and int.from_bytes(head[68:72], "big") != APP_ID and not pending:
        raise StateError(f"{path} is not a cloudexit state database (another SQLite database)",
                         hint="pass --db with a new file name for a new migration")


def exists(path: Path) -> bool:
    """Whether the DB file exists; a folder on the way that may not be entered says so."""
    try:
        path.stat()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StateError(f"cannot reach {path}: {exc.strerror}",
                         hint="check the permissions of the folders on the way, or pass another --db") from exc


def writable(path: Path) -> bool:
    """Can SQLite write the DB, its WAL and shared-memory files? (False on a read-only mount,
    a 0400 file or a read-only folder, unless root, for whom only the mount counts)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes. mode=ro still needs the -shm file of a WAL database;
    where it cannot be created (a read-only folder or mount), immutable=1 reads the file as it
    is (a copy holds no live WAL)."""
    uri = path.resolve().as_uri()
    for suffix in ("?mode=ro", "?mode=ro&immutable=1"):
        conn = sqlite3.connect(uri + suffix, uri=True, check_same_thread=False, timeout=30,
                               isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if suffix.endswith("immutable=1"):
                raise
    raise AssertionError("unreachable")


def backups(db: Path) -> list[Path]:
    """The backups of `db`, newest first: `<db>.backup-1`, `<db>.backup-2`."""
    return [Path(f"{db}.backup-{n}") for n in range(1, KEEP + 1)]


def free_space(path: Path) -> str:
    """'1.2 GB free on /srv (device /dev/sdb1)', as far as the system tells."""
    folder = path if path.is_dir() else path.parent
    try:
        free = format_bytes(shutil.disk_usage(folder).free)
    except OSError:
        return f"free space on {folder} unknown"
    return f"{free} free on the filesystem of {_mount_point(folder)}"


def _mount_point(folder: Path) -> str:
    folder = folder.resolve()
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return str(folder)


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", -1)) & 0xFF


def is_disk_full(exc: BaseException, db: Path) -> bool:
    """SQLITE_FULL; or an I/O error (growing the -shm or -wal file) on a filesystem with
    almost nothing left, which is how a full disk shows when the DB is opened."""
    if not isinstance(exc, sqlite3.Error):
        return False
    if _code(exc) == _FULL or "disk is full" in str(exc):
        return True
    if _code(exc) != _IOERR and "disk I/O error" not in str(exc):
        return False
    try:
        return shutil.disk_usage(db.parent).free < 1024 * 1024
    except OSError:
        return False


def translate(exc: BaseException, db: Path) -> StateError | None:
    """The user's error for an SQLite failure on `db`, or None (not a condition of the file or
    its disk: the caller re-raises the original)."""
    if not isinstance(exc, sqlite3.Error):
        return None
    text = str(exc)
    code = _code(exc)
    if is_disk_full(exc, db):
        return StateDiskFull(
            f"the state database {db} cannot grow: its disk is full ({free_space(db)})",
            hint="free space on that filesystem (or move the DB and its .key file to a larger one), "
                 "then run the same command again (migrate: cloudexit migrate --resume); "
                 "everything committed is kept")
    if code == _READONLY or "readonly database" in text:
        return StateReadOnly(
            f"the state database {db} is read-only (file mode, folder or mount), and this command "
            "must write to it", hint=READ_ONLY_HINT)
    if code in (_CORRUPT, _NOTADB) or "malformed" in text or text.startswith("Could not decode"):
        return corrupt(db, text)
    return None


READ_ONLY_HINT = ("run it on a writable copy, or make the DB writable; status, verify, audit and "
                  "audit verify work on a read-only DB")


def corrupt(db: Path, detail: str) -> StateCorrupt:
    found = quick_check(db)
    newest = next((b for b in backups(db) if b.exists()), None)
    if newest is not None:
        when = datetime.fromtimestamp(newest.stat().st_mtime).isoformat(timespec="minutes")
        hint = (f"stop every cloudexit command on it, keep the damaged file aside "
                f"(mv {db} {db}.damaged), restore the backup of {when}: cp {newest} {db}; then run "
                "inventory again (it records what changed since) and migrate --resume")
    else:
        hint = ("cloudexit keeps backups (<db>.backup-1, -2) after each inventory round and during "
                "migrate, but there is none for this DB: restore it from your own backups, or "
                "start again with a new --db")
    lines = "\n    ".join(found[:8]) + ("\n    ..." if len(found) > 8 else "")
    return StateCorrupt(f"the state database {db} is damaged ({detail.split(chr(10))[0][:200]}).\n"
                        f"  PRAGMA quick_check says:\n    {lines}", hint=hint)


def quick_check(db: Path) -> list[str]:
    """What `PRAGMA quick_check` says of `db`, read-only (["ok"]: no damage found)."""
    try:
        conn = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        conn.text_factory = lambda b: b.decode("utf-8", "replace")
        try:
            return [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [f"(quick_check could not run: {exc})"]


def backup(conn: sqlite3.Connection, db: Path, progress: Callable[[int, int, int], object] | None = None) -> Path:
    """A consistent copy of the DB open on `conn` as `<db>.backup-1` (0600), the one before
    moved to `-2`. Written to a temp file first, so a failure (a full disk) leaves the backups
    there were; the temp file is removed. Raises the translated error on failure."""
    newest = backups(db)[0]
    tmp = Path(f"{db}.backup-tmp{os.getpid()}")  # one per process: two commands may back up at once
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        target = sqlite3.connect(tmp)
        try:
            conn.backup(target, pages=4096, progress=progress)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            target.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        for older, newer in zip(reversed(backups(db)[1:]), reversed(backups(db)[:-1])):
            if newer.exists():
                os.replace(newer, older)
        os.replace(tmp, newest)
    except (OSError, sqlite3.Error) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StateError(f"cannot write the backup of {db}: {exc.strerror} ({free_space(db)})") from exc
        error = translate(exc, db)
        if error is None:
            raise
        raise error from exc
    return newest
