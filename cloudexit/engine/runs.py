"""Migration runs: the lock, the run rows, whether a run is live, counts, the summary.

A run is one `cloudexit migrate` process (new or `--resume`); its row in `migration_runs` holds
its options, bandwidth timetable, heartbeat and figures (SQL: state/transfers.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from cloudexit.core.config import MigrateConfig, PacsConfig
from cloudexit.core.errors import StateError, UsageError
from cloudexit.core.states import DONE, WAITING, TransferState as T
from cloudexit.state import transfers as sql
from cloudexit.state.db import State, now
from cloudexit.state.transfers import counts, last_run, runs

__all__ = ["LIVE_AFTER", "RunLock", "check_new_archive",
           "config_from_run", "counts", "is_live", "last_run", "open_run", "runs", "set_live_bwlimit"]

LIVE_AFTER = 15.0  # seconds: a run whose heartbeat is older is not live


def check_preconditions(state: State, config: MigrateConfig) -> None:
    """An inventory to migrate from, finished; options that make sense."""
    if state.meta("source_url") is None:
        raise StateError("this state DB has no inventory yet",
                         hint="run `cloudexit inventory s3://BUCKET` first")
    running = state.scalar("SELECT count(*) FROM inventory_rounds WHERE status = 'running'")
    if running:
        raise StateError("the inventory is not finished (its listing was interrupted)",
                         hint="run `cloudexit inventory` again to finish it, then migrate")
    if config.layout not in ("uid", "keys"):
        raise UsageError(f"--layout {config.layout!r}: use uid or keys")
    if config.non_dicom not in ("copy", "skip"):
        raise UsageError(f"--non-dicom {config.non_dicom!r}: use copy or skip")
    if config.order not in ("newest", "oldest", "key", "mixed"):
        raise UsageError(f"--order {config.order!r}: use newest, oldest or key")


def claim_archive(state: State, store: Any, join: bool) -> None:
    """Claim the archive folder for this migration (or join it, `--join-archive`), and take
    note of conflicts other members recorded about our files (see stores/claim.py)."""
    from cloudexit.stores.claim import claim, note_conflicts

    claim(store.root, state.meta("migration_id") or "", state.meta("source_url"),
          str(state.path.resolve()), join=join, at=now())
    note_conflicts(state, store.id, store.root)


class Busy(StateError):
    """Another process holds the migration lock of this state DB."""


def check_new_archive(state: State, dest: str, confirmed: bool) -> None:
    """Refuse, unless `confirmed`, a new run into a folder other than the archive an earlier run
    filled: nothing there counts, so every object is downloaded again."""
    earlier = sql.other_dests(state, dest)
    if not earlier or confirmed or sql.has_run_into(state, dest):
        return
    last = last_run(state)
    if last is not None and last["status"] in ("running", "interrupted", "stopped"):
        return  # the unfinished run is what to speak of: Migration refuses with --resume
    from cloudexit.core.units import format_bytes

    row = state.query("SELECT count(*) AS n, coalesce(sum(size), 0) AS b FROM objects "
                      "WHERE status = 'present'")[0]
    folder = earlier[-1][len("file://"):] if earlier[-1].startswith("file://") else earlier[-1]
    raise UsageError(
        f"this state DB already migrated into {folder}; --to {dest[len('file://'):]} is a second "
        f"archive: all {row['n']} objects ({format_bytes(row['b'])}) would be downloaded again",
        hint=f"to make a second copy, add --yes; to add a PACS to the existing archive: "
             f"cloudexit migrate --to {folder} --to dicom://AET@HOST:PORT; to continue the last "
             "run: cloudexit migrate --resume")


def is_live(run: sqlite3.Row | None) -> bool:
    """Whether a run's process is alive now (same host, pid exists, recent heartbeat)."""
    if run is None or run["status"] != "running" or not run["pid"]:
        return False
    if run["host"] != socket.gethostname():
        beat = run["heartbeat_at"]
        return bool(beat) and (datetime.now(timezone.utc)
                               - datetime.fromisoformat(beat)).total_seconds() < LIVE_AFTER
    try:
        os.kill(int(run["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_live_bwlimit(state: State, text: str) -> sqlite3.Row:
    """Change the bandwidth timetable of the running migration; it applies within seconds."""
    from cloudexit.engine.schedule import parse_schedule

    parse_schedule(text)  # refuse a bad timetable here, not in the running process
    run = last_run(state)
    if not is_live(run):
        raise UsageError("no migration is running in this state DB",
                         hint="start one with --to DEST, or continue one with --resume")
    assert run is not None
    with state.transaction() as tx:
        sql.set_bwlimit(tx, run["id"], text)
        state.log("migrate.bwlimit", tx, run=run["id"], bwlimit=text, live=True)
    return run


def config_from_run(run: sqlite3.Row, **overrides: Any) -> MigrateConfig:
    """The settings `run` recorded (a run before PACS timeouts were recorded: the defaults),
    with the `overrides` that are not None over them."""
    options = json.loads(run["options"] or "{}")
    known = {f for f in MigrateConfig.__dataclass_fields__}
    values = {k: v for k, v in options.items() if k in known}
    if isinstance(values.get("pacs"), dict):
        values["pacs"] = PacsConfig(**{k: v for k, v in values["pacs"].items()
                                       if k in PacsConfig.__dataclass_fields__})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MigrateConfig(**values)


class RunLock:
    """The migration lock of a state DB (flock on DB.lock): one migrate process at a time."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.fd: int | None = None

    def take(self) -> None:
        path = str(self.state.path) + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            run = last_run(self.state)
            what = (f"run {run['id']} (pid {run['pid']} on {run['host']}, started {run['started_at']})"
                    if run is not None else "another migration")
            raise Busy(f"a migration is running in this state DB now: {what}",
                       hint="wait for it, or stop it (Ctrl-C) and continue with `cloudexit migrate --resume`; "
                            "to change its bandwidth: `cloudexit migrate --bwlimit TIMETABLE`") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_run(state: State, config: MigrateConfig, dest: str, resume: bool, deliver: list[str],
             schedule_text: str | None) -> tuple[int, str | None]:
    """Start a new run row, or take over the unfinished one (`resume`): (run id, the bandwidth
    timetable in force). Refuses a new run while one is unfinished."""
    run = last_run(state)
    options = asdict(config)
    options.pop("bwlimit", None)
    options["deliver"] = deliver
    unfinished = run is not None and run["status"] in ("running", "interrupted", "stopped")
    if not resume and unfinished:
        assert run is not None
        c = counts(state, run["dest"])
        done = sum(c.get(s, 0) for s in DONE)
        total = sum(v for k, v in c.items() if not k.startswith("_"))
        from cloudexit.core.units import format_bytes

        raise StateError(
            f"migration run {run['id']} into {run['dest']} is unfinished ({run['status']}): "
            f"{done} of {total} objects done ({format_bytes(c['_bytes_done'])} of "
            f"{format_bytes(c['_bytes_total'])})",
            hint="continue it with: cloudexit migrate --resume")
    stamp = now()
    with state.transaction() as tx:
        if resume and unfinished:
            assert run is not None
            run_id = int(run["id"])
            if schedule_text is None:
                schedule_text = run["bwlimit"]
            sql.resume_run(tx, run_id, os.getpid(), socket.gethostname(), stamp, schedule_text,
                           json.dumps(options))
            state.log("migrate.resumed", tx, run=run_id, dest=dest)
        else:
            run_id = sql.new_run(tx, dest, json.dumps(options), schedule_text, os.getpid(),
                                 socket.gethostname(), stamp)
            state.log("migrate.started", tx, run=run_id, dest=dest, source=state.meta("source_url"),
                      options=options, user=_user(), host=socket.gethostname())
    return run_id, schedule_text


def end_run(state: State, run_id: int, dest: str, stop: BaseException | None,
            deliveries: dict[str, dict[str, int]]) -> tuple[dict[str, int], int]:
    """Record how the run ended: (the archive's counts, objects unfinished)."""
    from cloudexit.core.errors import Interrupted

    c = counts(state, dest)
    unfinished = sum(c.get(s, 0) for s in WAITING)
    pacs_queued = sum(d.get(T.QUEUED, 0) for d in deliveries.values())
    pacs_bad = sum(d.get(T.FAILED, 0) + d.get(T.CONFLICT, 0) for d in deliveries.values())
    if isinstance(stop, Interrupted):
        status = "interrupted"
    elif stop is not None or unfinished or pacs_queued:
        status = "stopped"
    else:
        status = "partial" if (c.get(T.FAILED) or c.get(T.MISSING) or c.get(T.QUARANTINED)
                               or pacs_bad) else "complete"
    stamp = now()
    with state.transaction() as tx:
        sql.end_run(tx, run_id, status, stamp if status in ("complete", "partial") else None,
                    str(stop).split("\n")[0] if stop else None, stamp)
        state.log("migrate.finished" if status in ("complete", "partial") else f"migrate.{status}",
                  tx, run=run_id, status=status, counts={k: v for k, v in c.items() if not k.startswith("_")},
                  **({"deliveries": deliveries} if deliveries else {}))
    return c, unfinished


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "?"
