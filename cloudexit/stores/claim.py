"""Who an archive folder belongs to, and what other migrations could not put into it.

An archive folder is claimed by the first migration that writes into it: the marker file
`.cloudexit-archive.json` (0600, in the folder) names it by its migration id (`meta.migration_id`
of its state DB), source, state DB and host, and when. Another state DB is refused, unless it
joins on purpose (`migrate --join-archive`: several buckets consolidated into one archive); the
marker then lists it as a member too.

Members never replace each other's files (`Placer.place` refuses other bytes): a newcomer whose
path holds another member's file goes to `_quarantine/archive-conflicts/`, is recorded as
quarantined in its own state DB, and appended to the archive's conflict ledger
`.cloudexit-archive-conflicts.jsonl` (0600). The ledger travels with the archive, so the other
member learns of it without having its DB at hand: its next `migrate` or `verify` copies the
entries about its own files into its event log (`note_conflicts`).

Names starting with `.cloudexit-` cannot be keys' paths (`safe_key_path` escapes them).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cloudexit.core.files import private_writer
from cloudexit.stores import StoreError

MARKER = ".cloudexit-archive.json"
LEDGER = ".cloudexit-archive-conflicts.jsonl"
LOCK = ".cloudexit-archive.lock"
RESERVED = frozenset({MARKER, LEDGER, LOCK, MARKER + ".tmp"})


class ArchiveClaimed(StoreError):
    """The archive folder belongs to another migration (another state DB)."""


def read_marker(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The archive's marker (None: no migration has claimed the folder)."""
    path = os.path.join(root, MARKER)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}",
                         hint="it must be a plain file cloudexit wrote; check the folder") from exc
    with os.fdopen(fd, "rb") as fh:
        try:
            marker = json.loads(fh.read(1 << 20))
        except ValueError as exc:
            raise StoreError(f"{path} is not a cloudexit archive marker ({exc})",
                             hint="restore it from a backup, or move it away if the folder has no "
                                  "other migration's files") from exc
    if not isinstance(marker, dict) or not isinstance(marker.get("members"), list):
        raise StoreError(f"{path} is not a cloudexit archive marker",
                         hint="restore it from a backup, or move it away if the folder has no other "
                              "migration's files")
    return marker


def members(marker: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [m for m in (marker or {}).get("members", []) if isinstance(m, dict)]


def describe(member: dict[str, Any]) -> str:
    return (f"{member.get('source')} (migration {str(member.get('migration_id'))[:12]}, state DB "
            f"{member.get('db')} on {member.get('host')}, since {member.get('at')})")


@contextmanager
def _locked(root: str) -> Iterator[None]:
    fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(root: str | os.PathLike[str], migration_id: str, source: str | None, db: str,
          join: bool = False, at: str = "") -> dict[str, Any]:
    """Claim the archive folder for this migration, or join it (`join`); return the marker.

    Raises ArchiveClaimed when another migration owns it and `join` is false."""
    root = os.fspath(root)
    me = {"migration_id": migration_id, "source": source, "db": db, "host": socket.gethostname(),
          "at": at}
    with _locked(root):
        marker = read_marker(root)
        if marker is None:
            marker = {"format": 1, "archive_id": secrets.token_hex(16), "created_at": at,
                      "owner": migration_id, "members": [{**me, "joined": False}]}
            if _create(root, marker):
                return marker
            marker = read_marker(root)  # another host claimed it first (a lock not shared over NFS/SMB)
            assert marker is not None
        if any(m.get("migration_id") == migration_id for m in members(marker)):
            return marker
        if not join:
            owner = next((m for m in members(marker) if m.get("migration_id") == marker.get("owner")),
                         members(marker)[0] if members(marker) else {})
            others = len(members(marker)) - 1
            raise ArchiveClaimed(
                f"the archive folder {root} belongs to the migration of {describe(owner)}"
                + (f" and {others} other joined migration(s)" if others > 0 else ""),
                hint="give this migration its own --to folder; to consolidate several buckets into "
                     "one archive on purpose, add --join-archive (files already there are never "
                     "replaced: different bytes go to _quarantine/archive-conflicts/)")
        marker["members"].append({**me, "joined": True})
        with private_writer(os.path.join(root, MARKER)) as fh:
            fh.write(json.dumps(marker, indent=2, ensure_ascii=False).encode() + b"\n")
        return marker


def _create(root: str, marker: dict[str, Any]) -> bool:
    """Write a new marker unless one exists (False), never over another host's claim."""
    from cloudexit.stores.filesystem import move_noreplace

    tmp = os.path.join(root, f"{MARKER}.{secrets.token_hex(6)}.tmp")
    with private_writer(tmp) as fh:
        fh.write(json.dumps(marker, indent=2, ensure_ascii=False).encode() + b"\n")
    try:
        move_noreplace(tmp, os.path.join(root, MARKER))
        return True
    except FileExistsError:
        os.unlink(tmp)
        return False


def record_conflict(root: str | os.PathLike[str], entry: dict[str, Any]) -> None:
    """Append one conflict to the archive's ledger (0600, fsynced)."""
    root = os.fspath(root)
    line = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    with _locked(root):
        fd = os.open(os.path.join(root, LEDGER),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def conflicts(root: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The ledger's entries, streamed."""
    try:
        fd = os.open(os.path.join(root, LEDGER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if isinstance(entry, dict):
                yield entry


def note_conflicts(state: Any, dest: str, root: str | os.PathLike[str]) -> int:
    """Copy the ledger's entries about this migration's own files (by path, written by another
    member) into its event log (`archive.conflict-noted`), each once. Returns how many the
    ledger holds about its files in all (the file itself was kept, so nothing is wrong)."""
    me = state.meta("migration_id")
    seen_key = f"archive_ledger_seen {dest}"
    seen = int(state.meta(seen_key) or 0)
    total, last = 0, seen
    with state.transaction() as tx:
        for n, entry in enumerate(conflicts(root), start=1):
            last = n
            if entry.get("migration_id") == me or not isinstance(entry.get("path"), str):
                continue
            row = tx.execute("SELECT key FROM transfers WHERE dest = ? AND path = ? AND state = 'verified'",
                             (dest, entry["path"])).fetchone()
            if row is None:
                continue
            total += 1
            if n > seen:
                state.log("archive.conflict-noted", tx, key=row[0], path=entry["path"],
                          by_migration=entry.get("migration_id"), by_source=entry.get("source"),
                          quarantined_at=entry.get("quarantined_at"), at=entry.get("at"),
                          detail="another migration sharing this archive had other bytes for this "
                                 "path; this migration's file was kept")
        if last != seen:
            tx.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = excluded.value", (seen_key, str(last)))
    return total
