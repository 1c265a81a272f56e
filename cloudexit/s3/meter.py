"""Egress accounting that a kill -9 cannot lose: what came off the wire, as the provider bills it.

Each worker process counts the body bytes it receives and the requests it sends in a small file
mapped into its memory (`Meter`): an update is a store into the page cache, so a kill -9 of the
whole migration loses nothing of it (a power cut loses what the kernel had not written back, at
most about 30 s). The engine reads the files at every commit and adds what they grew by to its
run in the state DB (`MeterBook.collect`), with each file's reading in the table `meters` in the
same transaction. After a crash, the next run adds what the files of the dead processes counted
beyond their last reading (`MeterBook.settle`), then removes them. So bytes discarded by kills,
retries and failed verifications are all counted, once.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

FIELDS = ("bytes", "get", "head", "list")  # the order of the counters in a file (unsigned 64-bit)
_SIZE = 8 * len(FIELDS)


class Meter:
    """One worker process's counters, in a file shared with the page cache. Thread-safe."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("Q")
        self._lock = threading.Lock()

    def add(self, nbytes: int = 0, get: int = 0, head: int = 0, list_: int = 0) -> None:
        with self._lock:
            view = self._view
            if nbytes:
                view[0] += nbytes
            if get:
                view[1] += get
            if head:
                view[2] += head
            if list_:
                view[3] += list_

    def close(self) -> None:
        self._view.release()
        self._map.close()


def read(path: Path) -> tuple[int, ...] | None:
    """A meter file's counters (None if it is gone or not a meter file)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE + 1)
    except OSError:
        return None
    if len(data) != _SIZE:
        return None
    view = memoryview(data).cast("Q")
    return tuple(view)


class MeterBook:
    """The engine's side: the meter files of its workers, in a folder beside the state DB."""

    def __init__(self, db_path: Path) -> None:
        self.folder = Path(str(db_path) + "-egress")
        self.mine: list[Path] = []  # this run's files

    def new_path(self) -> str:
        """A file for one worker process of this run (created by the worker)."""
        self.folder.mkdir(mode=0o700, exist_ok=True)
        path = self.folder / uuid.uuid4().hex
        self.mine.append(path)
        return str(path)

    def collect(self, tx: sqlite3.Connection, run_id: int, paths: list[Path] | None = None) -> list[int]:
        """Record the files' growth since their last reading (in `tx`); returns it, as FIELDS."""
        total = [0] * len(FIELDS)
        for path in self.mine if paths is None else paths:
            now = read(path)
            if now is None:
                continue
            row = tx.execute("SELECT run_id, bytes, gets, heads, lists FROM meters WHERE name = ?",
                             (path.name,)).fetchone()
            before = tuple(row[1:]) if row else (0,) * len(FIELDS)
            grew = [max(0, a - b) for a, b in zip(now, before)]
            if not any(grew):
                continue
            owner = row[0] if row else run_id
            tx.execute("INSERT INTO meters(name, run_id, bytes, gets, heads, lists) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET bytes = excluded.bytes, gets = excluded.gets, "
                       "heads = excluded.heads, lists = excluded.lists", (path.name, owner, *now))
            tx.execute("UPDATE migration_runs SET bytes_downloaded = bytes_downloaded + ?, "
                       "get_requests = get_requests + ?, head_requests = head_requests + ?, "
                       "list_requests = list_requests + ? WHERE id = ?", (*grew, owner))
            total = [a + b for a, b in zip(total, grew)]
        return total

    def settle(self, state: Any, run_id: int) -> list[int]:
        """Count what the files of processes that are gone (a kill, a crash) counted beyond their
        last reading, then remove them. Call with the migration lock held and no worker running."""
        try:
            leftovers = [p for p in self.folder.iterdir() if p not in self.mine]
        except FileNotFoundError:
            leftovers = []
        with state.transaction() as tx:
            grew = self.collect(tx, run_id, leftovers)
        for path in leftovers:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        # Readings of files now gone: done with (a reading without its file is never counted).
        names = {p.name for p in self.mine}
        with state.transaction() as tx:
            for (name,) in tx.execute("SELECT name FROM meters").fetchall():
                if name not in names and not (self.folder / name).exists():
                    tx.execute("DELETE FROM meters WHERE name = ?", (name,))
        return grew

    def drop_unused(self) -> None:
        """The run failed before any work: remove this run's files that counted nothing."""
        for path in self.mine:
            if not any(read(path) or ()):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        try:
            self.folder.rmdir()
        except OSError:
            pass

    def close(self, state: Any, run_id: int) -> None:
        """The workers have ended: record their last counts and remove their files."""
        with state.transaction() as tx:
            self.collect(tx, run_id)
        mine, self.mine = self.mine, []
        for path in mine:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        with state.transaction() as tx:
            tx.executemany("DELETE FROM meters WHERE name = ?", [(p.name,) for p in mine])
        try:
            self.folder.rmdir()  # empty unless files of a killed run wait to be counted
        except OSError:
            pass
