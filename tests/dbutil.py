"""Read a state DB from a test, as an outside observer would (its own connection), and wait for
what a running process writes there (faults are placed on rows seen, never after a sleep)."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count(db: Path, where: str, params: tuple[Any, ...] = ()) -> int:
    """`transfers` rows matching `where`; 0 while the run has not made the DB or the table yet."""
    if not db.exists() or not rows(db, "SELECT 1 FROM sqlite_master WHERE name = 'transfers'"):
        return 0
    return int(rows(db, f"SELECT count(*) AS n FROM transfers WHERE {where}", params)[0]["n"])


def event_kinds(db: Path, like: str) -> list[str]:
    """The kinds of the events matching `like` (such as 'migrate.pacs_%'), oldest first."""
    return [r["kind"] for r in rows(db, "SELECT kind FROM events WHERE kind LIKE ? ORDER BY id", (like,))]


def wait_for(proc: subprocess.Popen[Any], condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
    """Poll `condition()` (rows in the DB, bytes through the proxy) until it holds; fail saying
    `what` did not happen if the run ends first (with the end of its stderr, if piped) or the
    time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr is not None else ""
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}\n{(err or '')[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)
