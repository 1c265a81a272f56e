"""The archive's work queue: one `transfers` row per object, with the path it lands at.

At the start of a run the queue is brought in line with the inventory (new, changed, deleted
objects); each object gets a path no other object holds (a SOP Instance UID at two keys, names
the destination folds together, a file where a folder must be: quarantined or made unique);
at the end, same-UID pairs are resolved (identical: one copy kept; different: quarantined).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import PurePosixPath

from cloudexit.core.config import MigrateConfig
from cloudexit.s3.source import ARCHIVE_CLASSES
from cloudexit.core.states import TransferState as T
from cloudexit.state import members
from cloudexit.state import transfers as sql
from cloudexit.state.db import State, now
from cloudexit.stores.filesystem import CASE_COLLISIONS, COLLISIONS, FilesystemStore, key_hash


class Worklist:
    """Paths and states of the archive's rows (`dest`); the engine's thread only."""

    def __init__(self, state: State, store: FilesystemStore, config: MigrateConfig) -> None:
        self.state, self.store, self.config = state, store, config
        self.dest = store.id
        self._known_folders: set[str] | None = None  # see `sync`

    def order(self) -> str:
        if self.config.order == "key":
            return "o.key"
        if self.config.order == "mixed":  # sizes and studies interleaved: the link measurement
            return "(o.rowid * 2654435761) % 4294967296, o.key"
        direction = "DESC" if self.config.order == "newest" else "ASC"
        return (f"o.study_date IS NULL, o.study_date {direction}, o.study_uid IS NULL, o.study_uid, "
                f"o.series_uid, o.key")

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, tx: sqlite3.Connection, o: sqlite3.Row, twin: bool = True) -> tuple[str | None, str | None]:
        """(relative path, key of the canonical holder of its SOP Instance UID if a conflict).

        twin=False: the caller knows no other DICOM object has this SOP Instance UID."""
        kind = o["kind"]
        if kind == "pending":
            return None, None
        conflict = None
        if twin and kind == "dicom" and o["sop_uid"]:
            conflict = sql.sop_holder(tx, self.dest, o["sop_uid"], o["key"])
        if conflict:
            path = self.store.conflict_path(o["key"], o["sop_uid"])
        else:
            path = self.store.path_for(o["key"], kind, o["study_uid"], o["series_uid"], o["sop_uid"])
            folded = self.fold(path)
            if folded is not None:
                # The destination takes names differing in case (or Unicode form) as one: a
                # second key for the same name is a collision, quarantined, never placed over it.
                holder = sql.fold_holder(tx, self.dest, folded, o["key"])
                if holder:
                    conflict, path = holder, f"{CASE_COLLISIONS}/{key_hash(o['key'], 32)}"
        return self._unique(tx, path, o["key"]), conflict

    def fold(self, path: str | None) -> str | None:
        return self.store.fold(path) if path else None

    def repath(self, tx: sqlite3.Connection, o: sqlite3.Row) -> tuple[str | None, str | None]:
        """`path` for an object that had one: its own old path does not count as taken."""
        sql.clear_path(tx, o["key"], self.dest)
        return self.path(tx, o)

    def _unique(self, tx: sqlite3.Connection, path: str, key: str) -> str:
        if self._free(tx, path, key):
            return path
        p = PurePosixPath(path)
        candidates = [str(p.with_name(f"{p.stem}~{key_hash(key, 12)}{p.suffix}")),
                      f"{COLLISIONS}/{key_hash(key, 32)}"]
        for candidate in candidates:
            if self._free(tx, candidate, key):
                return candidate
        return candidates[-1]

    def _free(self, tx: sqlite3.Connection, path: str, key: str) -> bool:
        """No other object uses this path, a folder above it, or a path below it."""
        for holder, taken in sql.path_and_below(tx, self.dest, path):
            if taken != path or holder != key:
                return False
        parts = path.split("/")
        folders = self._known_folders
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if folders is not None and prefix in folders:
                continue  # a folder of a path given out in this pass: no file can be there
            owner = sql.key_at(tx, self.dest, prefix)
            if owner and owner != key:
                return False
        if folders is not None:  # the caller takes this path
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return True

    def initial_state(self, o: sqlite3.Row, path: str | None) -> T:
        archived = (o["storage_class"] or "").upper() in ARCHIVE_CLASSES
        if archived and not sql.is_restored(self.state, o["key"], o["etag"]):
            return T.RESTORING
        if path is None:
            return T.INSPECT
        if o["kind"] == "other" and self.config.non_dicom == "skip":
            return T.SKIPPED
        if members.is_zip(o) and not self.config.keep_containers:  # zipped study (state/members.py)
            return T.SKIPPED
        return T.QUEUED

    # -- the start and the end of a run -------------------------------------------------------------
    def sync(self, run_id: int) -> None:
        """Bring the work queue in line with the inventory (new, changed, deleted objects)."""
        dest, stamp = self.dest, now()
        with self.state.transaction() as tx:
            deleted = sql.requeue_for_run(tx, dest, stamp, self.config.non_dicom)
            # Changed at the source since fetched or queued: fetch the new version.
            changed = sql.changed_at_source(tx, dest)
            for o in changed:
                path, conflict = self.repath(tx, o)
                sql.reset_to_version(tx, o["key"], dest, self.initial_state(o, path), o, path, conflict,
                                     stamp, self.fold(path))
                self.state.log("migrate.changed", tx, key=o["key"], old_etag=o["t_etag"],
                               new_etag=o["etag"], old_sha256=o["t_sha256"], old_path=o["t_path"],
                               was=o["t_state"])
            # New objects, numbered in the order of work.
            base, rows = sql.new_objects(tx, dest, self.order())
            # Paths are only added in this loop, so the folders of each path given out stay folders
            # (`_free` refuses a file where a folder is): their checks are skipped for the next ones.
            self._known_folders = set()
            try:
                for o in rows:
                    path, conflict = self.path(tx, o, twin=bool(o["twin"]))
                    sql.insert_row(tx, o, dest, base + o["rn"], self.initial_state(o, path), path, conflict,
                                   stamp, self.fold(path))
            finally:
                self._known_folders = None
            sql.end_new_objects(tx)
            members.sync_containers(tx, dest, self.config.keep_containers)  # zipped studies
            if deleted or changed:
                self.state.log("migrate.sync", tx, run=run_id, deleted=deleted, changed=len(changed))

    def resolve_conflicts(self) -> None:
        """Same SOP Instance UID at two keys: identical content is a duplicate (one copy kept);
        different content stays quarantined beside the first."""
        stamp = now()
        rows = sql.conflicts(self.state, self.dest)
        with self.state.transaction() as tx:
            for r in rows:
                if r["canon_state"] == T.VERIFIED and r["canon_sha"] == r["sha256"]:
                    try:
                        os.unlink(self.store.absolute(r["path"]))
                    except FileNotFoundError:
                        pass
                    sql.mark_duplicate(tx, r["key"], self.dest, f"identical to {r['conflict_with']!r} (same "
                                       f"SHA-256), kept once at {r['canon_path']}", stamp)
                    self.state.log("migrate.duplicate", tx, key=r["key"], same_as=r["conflict_with"])
                elif r["path"].startswith(CASE_COLLISIONS + "/"):
                    reason = (f"collision: its name differs from {r['conflict_with']!r}'s only in letter "
                              "case or Unicode form, which this destination takes as the same name; "
                              "both kept, this one quarantined")
                    sql.set_state(tx, r["key"], self.dest, T.QUARANTINED, stamp, reason)
                    self.state.log("migrate.collision", tx, key=r["key"], holder=r["conflict_with"],
                                   path=r["path"])
                else:
                    reason = (f"conflict: SOP Instance UID also at {r['conflict_with']!r} with different "
                              f"content; both kept, this one quarantined")
                    if r["canon_state"] != T.VERIFIED:
                        reason = (f"conflict: SOP Instance UID also at {r['conflict_with']!r} "
                                  f"(not migrated yet: {r['canon_state']}); quarantined")
                    sql.set_state(tx, r["key"], self.dest, T.QUARANTINED, stamp, reason)
                    self.state.log("migrate.conflict", tx, key=r["key"], holder=r["conflict_with"],
                                   path=r["path"])
