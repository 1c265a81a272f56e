"""Migrate: move every inventoried object home, verified, resumable after anything.

The engine (this module, in the caller's process) owns the state DB and plans the work; worker
processes (`cloudexit.transfer`) do the I/O: GET with If-Match, hash while streaming, verify,
fsync, rename. The engine never lets an object count as done before its file is durable:

1. *intent*: before an object is handed to a worker, its row becomes `fetching` (committed);
2. the worker writes a temp file beside the final path, verifies size, MD5/ETag (multipart
   too), provider checksums and the DICOM header against the inventory, fsyncs, renames, fsyncs
   the folder;
3. *completion*: one transaction records SHA-256, path and the checks that passed.

After a crash (kill -9, power loss) rows left `fetching` go back to the queue; their temp files
are resumed with a Range request (large objects: the ranges recorded as fsynced are kept), and
a file already at its final path is verified locally instead of fetched again. A `verified` row
is never fetched again.

Ordering: newest studies first (`--order`), whole studies together. Archived storage classes get
RestoreObject requests at once and are polled while everything else downloads. When every worker
loses the endpoint the run pauses, probes with growing intervals and carries on by itself.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import queue
import random
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import CloudexitError, CredentialsError, Interrupted, StateError, UsageError
from cloudexit.state.meter import MeterBook
from cloudexit.s3.parts import record_sizes, recorded_sizes
from cloudexit.s3.source import Source
from cloudexit.state.db import State, now
from cloudexit.stores import Delivery, Item, StoreError, StoreUnavailable
from cloudexit.stores.filesystem import CASE_COLLISIONS, COLLISIONS, FilesystemStore, key_hash
from cloudexit.engine.executor import Executor
from cloudexit.engine.messages import Message, RangeDone, WorkerLost, results_of
from cloudexit.transfer.client import Counters, Credentials, Endpoint, FetchError, S3Reader
from cloudexit.transfer.tasks import Result, Task

# Storage classes whose objects must be restored before a GET (S3, OSS, COS, OBS names).
ARCHIVE_CLASSES = {"GLACIER", "DEEP_ARCHIVE", "ARCHIVE", "COLDARCHIVE", "DEEPCOLDARCHIVE",
                   "COLD", "DEEP_COLD"}
DONE_STATES = ("verified", "duplicate", "quarantined", "skipped")
# A PACS refusal worth another try on the next run (0xA7xx: out of resources; HTTP 5xx/429).
TRANSIENT_REASONS = ("0xA7%", "HTTP 5%", "HTTP 429%")
RESTORE_TIERS = {"bulk": "Bulk", "standard": "Standard", "expedited": "Expedited"}
LIVE_AFTER = 15.0  # seconds: a run whose heartbeat is older is not live
# AWS offers Expedited restores for GLACIER (Flexible Retrieval) only, not for DEEP_ARCHIVE
# (RestoreObject API reference): those fall back to Standard.
NO_EXPEDITED = {"DEEP_ARCHIVE"}


def restore_tier(storage_class: str | None, tier: str) -> str:
    """The tier to ask for: `tier`, except Expedited where the class does not offer it."""
    return "Standard" if tier == "Expedited" and (storage_class or "").upper() in NO_EXPEDITED else tier


def restore_tier_note(state: State, tier: str) -> str | None:
    """One line for the user when `tier` cannot apply to some archived objects (None: it can)."""
    if tier != "Expedited":
        return None
    marks = ",".join("?" * len(NO_EXPEDITED))
    n = state.scalar(f"SELECT count(*) FROM objects WHERE status = 'present' AND upper(storage_class) "
                     f"IN ({marks})", tuple(NO_EXPEDITED)) or 0
    if not n:
        return None
    return (f"--restore-tier expedited: AWS has no Expedited restore for DEEP_ARCHIVE; its {n} "
            "object(s) are restored with Standard (within 12 h), the others with Expedited")


@dataclass
class MigrateProgress:
    """Counters the CLI turns into a progress bar (and `status` reads from the DB)."""

    total: int = 0
    done: int = 0  # verified + quarantined + duplicate + skipped
    failed: int = 0
    quarantined: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_downloaded: int = 0
    in_flight: int = 0
    restoring: int = 0
    waiting_since: str | None = None
    waiting_why: str | None = None  # what the user may have to do, when it is not a plain outage
    rate_limit: float | None = None  # bytes/s in force (None: unlimited, 0: paused)
    study: str | None = None  # study being worked on
    stopping: int | None = None  # after Ctrl-C: objects in flight being finished (None: running)


@dataclass
class MigrationSummary:
    run: int
    resumed: bool
    dest: str
    total: int
    verified: int
    quarantined: int
    duplicates: int
    failed: int
    missing: int
    skipped: int
    unfinished: int  # waiting for a restore, or left queued by a stop
    bytes_verified: int
    bytes_downloaded: int
    requests: dict[str, int]
    retries: int
    elapsed: float
    fetched_this_run: int
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # key, state, reason
    # PACS destinations (`--to dicom://...`, `--to dicomweb+https://...`): dest -> state -> count
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)
    delivered_this_run: int = 0
    backup_error: str | None = None  # why the last backup of the state DB failed

    @property
    def exit_code(self) -> int:
        pacs_bad = any(c.get(s, 0) for c in self.deliveries.values()
                       for s in ("failed", "conflict", "queued"))
        return 3 if (self.failed or self.missing or self.quarantined or self.unfinished or pacs_bad) else 0


@dataclass
class _Outlet:
    """A PACS destination of the run: its store, its delivery threads, its pause."""

    store: Any
    pool: ThreadPoolExecutor
    busy: set[str] = field(default_factory=set)  # keys handed to a thread, not yet committed
    down_since: float | None = None
    next_probe: float = 0.0
    interval: float = 1.0
    probing: bool = False


@dataclass
class _Flight:
    seq: int
    key: str
    etag: str
    size: int
    kind: str
    path: str
    task: Task
    attempts: int = 0
    strikes: int = 0  # unreachable answers while the link was judged up


class _Busy(StateError):
    pass


# -- runs -------------------------------------------------------------------------------------------
def runs(state: State) -> list[sqlite3.Row]:
    return state.query("SELECT * FROM migration_runs ORDER BY id")


def last_run(state: State) -> sqlite3.Row | None:
    rows = state.query("SELECT * FROM migration_runs ORDER BY id DESC LIMIT 1")
    return rows[0] if rows else None


def check_new_archive(state: State, dest: str, confirmed: bool) -> None:
    """Refuse, unless `confirmed`, a new run into a folder other than the archive an earlier run
    filled: nothing there counts, so every object is downloaded again."""
    earlier = [r["dest"] for r in state.query(
        "SELECT DISTINCT dest FROM migration_runs WHERE dest != ? ORDER BY id", (dest,))]
    if not earlier or confirmed or state.scalar("SELECT 1 FROM migration_runs WHERE dest = ?", (dest,)):
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


def counts(state: State, dest: str) -> dict[str, int]:
    rows = state.query("SELECT state, count(*) AS n, coalesce(sum(size), 0) AS b FROM transfers "
                       "WHERE dest = ? GROUP BY state", (dest,))
    out = {r["state"]: r["n"] for r in rows}
    out["_bytes_done"] = sum(r["b"] for r in rows if r["state"] in DONE_STATES)
    out["_bytes_total"] = sum(r["b"] for r in rows if r["state"] != "missing")
    return out


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
        tx.execute("UPDATE migration_runs SET bwlimit = ? WHERE id = ?", (text, run["id"]))
        state.log("migrate.bwlimit", tx, run=run["id"], bwlimit=text, live=True)
    return run


def config_from_run(run: sqlite3.Row, **overrides: Any) -> MigrateConfig:
    options = json.loads(run["options"] or "{}")
    known = {f for f in MigrateConfig.__dataclass_fields__}
    values = {k: v for k, v in options.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MigrateConfig(**values)


# -- the engine ------------------------------------------------------------------------------------
class Migration:
    """One migration run (new or resumed) from `source` into `store`."""

    def __init__(self, state: State, source: Source, store: FilesystemStore,
                 config: MigrateConfig | None = None,
                 progress: Callable[[MigrateProgress], None] | None = None,
                 resume: bool = False, deliver_to: list[Any] | None = None,
                 executor: Executor | None = None) -> None:
        """`deliver_to`: PACS stores (C-STORE, STOW-RS) that get every verified DICOM object
        from the archive once it is committed (table `transfers`, one row per key and PACS).
        `executor`: where the fetch tasks run (default: worker processes on this machine)."""
        from cloudexit.engine.local import LocalProcessExecutor

        self.state = state
        self.source = source
        self.store = store
        self.config = config or MigrateConfig()
        self.on_progress = progress or (lambda p: None)
        self.resume = resume
        self.dest = store.id
        self.run_id = 0
        self.progress = MigrateProgress()
        self.counters = Counters()  # the engine's own requests, since the last commit
        self.meters = MeterBook(state.path)  # the workers' requests and bytes (meter.py)
        self.restore_requests = 0
        self.retries = 0
        self.fetched = 0
        self.flights: dict[int, _Flight] = {}
        self.reported: list[Result] = []  # results back from the workers, not committed yet
        self.done_rows: list[tuple[Any, ...]] = []  # finished objects, written at the next commit
        self.verified_delta = [0, 0, 0]  # bytes, objects, bytes resumed since the last commit
        self.retry_heap: list[tuple[float, int, _Flight]] = []
        self.cursor = 0
        self.ids = iter(range(1, 2**62))
        self.stop_error: BaseException | None = None
        self.link_down_since: float | None = None
        self.last_ok = time.monotonic()
        self.streak = 0
        self.next_probe = 0.0
        self.probe_interval = 1.0
        self.schedule_text: str | None = self.config.bwlimit
        self.schedule: Any = None
        self.background: ThreadPoolExecutor | None = None
        self.bg_results: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.bg_busy: set[str] = set()
        self.next_restore_poll = 0.0
        self.started = time.monotonic()
        self._lock_fd: int | None = None
        self.patient_key = state.patient_key().key  # None: patients recorded unmatched
        self.deliver_to = list(deliver_to or [])
        self.outlets: list[_Outlet] = []
        self.delivered: queue.Queue[tuple[_Outlet, str, Any]] = queue.Queue()
        self.pacs_done: list[tuple[_Outlet, str, Any]] = []  # finished deliveries, next commit
        self.delivered_count = 0
        self.next_pacs = 0.0
        self.pacs_rows_final = False
        self._known_folders: set[str] | None = None  # see `_sync`
        self.executor: Executor = executor or LocalProcessExecutor()
        self.executor_started = self.workers_joined = False
        self.next_backup = time.monotonic() + self.config.backup_minutes * 60
        self.backup_error: str | None = None

    # -- public ------------------------------------------------------------------------------------
    def run(self) -> MigrationSummary:
        self._check_inventory()
        self._take_lock()
        try:
            self.store.check()
            self._claim_archive()
            self._open_outlets()
            # The workers start up (a second or so) while we resolve and plan.
            self.executor.start(self.config, str(self.store.root), self.meters.new_path)
            self.executor_started = True
            self.endpoint, self.credentials = self._endpoint()
            self.executor.connect(self.endpoint, self.credentials)
            self._open_run()
            self.meters.settle(self.state, self.run_id)  # what runs killed before counted
            self._sync()
            self._sync_pacs()
            self._run_workers()
            self._resolve_conflicts()
            self._settle_pacs()
            return self._finish()
        finally:
            if self.executor_started and not self.workers_joined:  # failed before the work began
                self._stop_workers()
                self.meters.drop_unused()
            for outlet in self.outlets:
                outlet.pool.shutdown(wait=False, cancel_futures=True)
                try:
                    outlet.store.close()
                except Exception:  # noqa: BLE001
                    pass
            self._release_lock()

    def request_stop(self, reason: str) -> None:
        """End the run early, as Ctrl-C does (what is in flight is left queued); `run` then
        raises Interrupted. Called from the progress callback, on the engine's thread."""
        if self.stop_error is None:
            self.stop_error = Interrupted(reason)

    # -- preconditions -----------------------------------------------------------------------------
    def _check_inventory(self) -> None:
        state = self.state
        if state.meta("source_url") is None:
            raise StateError("this state DB has no inventory yet",
                             hint="run `cloudexit inventory s3://BUCKET` first")
        running = state.scalar("SELECT count(*) FROM inventory_rounds WHERE status = 'running'")
        if running:
            raise StateError("the inventory is not finished (its listing was interrupted)",
                             hint="run `cloudexit inventory` again to finish it, then migrate")
        if self.config.layout not in ("uid", "keys"):
            raise UsageError(f"--layout {self.config.layout!r}: use uid or keys")
        if self.config.non_dicom not in ("copy", "skip"):
            raise UsageError(f"--non-dicom {self.config.non_dicom!r}: use copy or skip")
        if self.config.order not in ("newest", "oldest", "key", "mixed"):
            raise UsageError(f"--order {self.config.order!r}: use newest, oldest or key")
        if self.config.bwlimit:
            from cloudexit.engine.schedule import parse_schedule

            self.schedule = parse_schedule(self.config.bwlimit)

    def _claim_archive(self) -> None:
        """Claim the archive folder for this migration (or join it, `--join-archive`), and take
        note of conflicts other members recorded about our files (see stores/claim.py)."""
        from cloudexit.stores.claim import claim, note_conflicts

        state = self.state
        claim(self.store.root, state.meta("migration_id") or "", state.meta("source_url"),
              str(state.path.resolve()), join=self.config.join_archive, at=now())
        note_conflicts(state, self.dest, self.store.root)

    def _take_lock(self) -> None:
        path = str(self.state.path) + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            run = last_run(self.state)
            what = (f"run {run['id']} (pid {run['pid']} on {run['host']}, started {run['started_at']})"
                    if run is not None else "another migration")
            raise _Busy(f"a migration is running in this state DB now: {what}",
                        hint="wait for it, or stop it (Ctrl-C) and continue with `cloudexit migrate --resume`; "
                             "to change its bandwidth: `cloudexit migrate --bwlimit TIMETABLE`")
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _endpoint(self) -> tuple[Endpoint, Credentials]:
        """Where and as whom to GET: resolved from the boto3 session as the inventory does
        (`Source.lean_endpoint`), with this run's timeouts and receive buffer."""
        source = self.source
        source.check()  # bucket reachable and listable with these credentials (clear errors)
        cfg = self.config
        base, creds = source.lean_endpoint()
        endpoint = replace(base, connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                           rcvbuf=256 * 1024 if cfg.bwlimit else 0)
        # One signed request with our own client: the right region, and signatures accepted.
        reader = S3Reader(endpoint, creds)
        try:
            resp = reader.request("GET", None, {"list-type": "2", "max-keys": "1"}, None, self.counters)
            body = resp.read()
            real_region = resp.getheader("x-amz-bucket-region")
            if resp.status in (301, 400) and real_region and real_region != endpoint.region:
                if endpoint.host.split(":")[0].endswith(".amazonaws.com"):
                    moved = Endpoint.from_url(f"https://s3.{real_region}.amazonaws.com", endpoint.bucket,
                                              real_region, endpoint.path_style)
                    endpoint = replace(endpoint, host=moved.host, port=moved.port, scheme=moved.scheme,
                                       region=real_region)
                else:
                    endpoint = replace(endpoint, region=real_region)
            elif resp.status == 403:
                code = body.split(b"<Code>", 1)[-1].split(b"</Code>", 1)[0].decode(errors="replace")
                raise CredentialsError(f"the endpoint {source.where} refused our signed requests ({code})",
                                       hint="check the credentials and --region for this bucket")
        except CloudexitError:
            raise
        except Exception as exc:  # noqa: BLE001 - the FetchError of an unreachable endpoint
            from cloudexit.core.errors import EndpointUnreachable

            if isinstance(exc, FetchError) and exc.kind == "tls":
                raise source.untrusted(exc.detail) from exc  # between boto3's check and ours
            raise EndpointUnreachable(f"cannot reach {source.where}: {exc}",
                                      hint="check the network; then run the command again") from exc
        finally:
            reader.close()
        return endpoint, creds

    # -- the run row -------------------------------------------------------------------------------
    def _open_run(self) -> None:
        state = self.state
        run = last_run(state)
        options = asdict(self.config)
        options.pop("bwlimit", None)
        options["deliver"] = [o.store.id for o in self.outlets]
        unfinished = run is not None and run["status"] in ("running", "interrupted", "stopped")
        if not self.resume and unfinished:
            assert run is not None
            c = counts(state, run["dest"])
            done = sum(c.get(s, 0) for s in DONE_STATES)
            total = sum(v for k, v in c.items() if not k.startswith("_"))
            from cloudexit.core.units import format_bytes

            raise StateError(
                f"migration run {run['id']} into {run['dest']} is unfinished ({run['status']}): "
                f"{done} of {total} objects done ({format_bytes(c['_bytes_done'])} of "
                f"{format_bytes(c['_bytes_total'])})",
                hint="continue it with: cloudexit migrate --resume")
        stamp = now()
        with state.transaction() as tx:
            if self.resume and unfinished:
                assert run is not None
                self.run_id = run["id"]
                if self.schedule_text is None:
                    self.schedule_text = run["bwlimit"]
                tx.execute("UPDATE migration_runs SET status = 'running', resumed = resumed + 1, "
                           "pid = ?, host = ?, heartbeat_at = ?, waiting_since = NULL, "
                           "stop_reason = NULL, bwlimit = ?, options = ? WHERE id = ?",
                           (os.getpid(), socket.gethostname(), stamp, self.schedule_text,
                            json.dumps(options), self.run_id))
                state.log("migrate.resumed", tx, run=self.run_id, dest=self.dest)
            else:
                cur = tx.execute(
                    "INSERT INTO migration_runs(started_at, status, dest, options, bwlimit, pid, host, "
                    "heartbeat_at) VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
                    (stamp, self.dest, json.dumps(options), self.schedule_text, os.getpid(),
                     socket.gethostname(), stamp))
                self.run_id = int(cur.lastrowid or 0)
                state.log("migrate.started", tx, run=self.run_id, dest=self.dest,
                          source=state.meta("source_url"), options=options, user=_user(),
                          host=socket.gethostname())
        if self.schedule_text:
            from cloudexit.engine.schedule import parse_schedule

            self.schedule = parse_schedule(self.schedule_text)

    # -- planning ----------------------------------------------------------------------------------
    def _order(self) -> str:
        if self.config.order == "key":
            return "o.key"
        if self.config.order == "mixed":  # sizes and studies interleaved: the link measurement
            return "(o.rowid * 2654435761) % 4294967296, o.key"
        direction = "DESC" if self.config.order == "newest" else "ASC"
        return (f"o.study_date IS NULL, o.study_date {direction}, o.study_uid IS NULL, o.study_uid, "
                f"o.series_uid, o.key")

    def _path(self, tx: sqlite3.Connection, o: sqlite3.Row, twin: bool = True) -> tuple[str | None, str | None]:
        """(relative path, key of the canonical holder of its SOP Instance UID if a conflict).

        twin=False: the caller knows no other DICOM object has this SOP Instance UID."""
        kind = o["kind"]
        if kind == "pending":
            return None, None
        conflict = None
        if twin and kind == "dicom" and o["sop_uid"]:
            holder = tx.execute(
                "SELECT t.key FROM objects x CROSS JOIN transfers t ON t.key = x.key AND t.dest = ? "
                "WHERE x.sop_uid = ? AND x.key != ? AND x.kind = 'dicom' AND t.conflict_with IS NULL "
                "AND t.state != 'missing' LIMIT 1", (self.dest, o["sop_uid"], o["key"])).fetchone()
            if holder:
                conflict = holder[0]
        if conflict:
            path = self.store.conflict_path(o["key"], o["sop_uid"])
        else:
            path = self.store.path_for(o["key"], kind, o["study_uid"], o["series_uid"], o["sop_uid"])
            folded = self._fold(path)
            if folded is not None:
                # The destination takes names differing in case (or Unicode form) as one: a
                # second key for the same name is a collision, quarantined, never placed over it.
                holder = tx.execute("SELECT key FROM transfers WHERE dest = ? AND fold_path = ? AND key != ? "
                                    "LIMIT 1", (self.dest, folded, o["key"])).fetchone()
                if holder:
                    conflict, path = holder[0], f"{CASE_COLLISIONS}/{key_hash(o['key'], 32)}"
        return self._unique(tx, path, o["key"]), conflict

    def _fold(self, path: str | None) -> str | None:
        return self.store.fold(path) if path else None

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
        # The path itself and the paths below it, in one probe of the path index.
        for holder, taken in tx.execute(
                "SELECT key, path FROM transfers WHERE dest = ? AND path >= ? AND path < ? "
                "AND (path = ? OR substr(path, ?, 1) = '/') LIMIT 2",
                (self.dest, path, path + "0", path, len(path) + 1)):
            if taken != path or holder != key:
                return False
        parts = path.split("/")
        folders = self._known_folders
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if folders is not None and prefix in folders:
                continue  # a folder of a path given out in this pass: no file can be there
            row = tx.execute("SELECT key FROM transfers WHERE dest = ? AND path = ?", (self.dest, prefix)).fetchone()
            if row and row[0] != key:
                return False
        if folders is not None:  # the caller takes this path
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return True

    def _initial_state(self, o: sqlite3.Row, path: str | None) -> str:
        if (o["storage_class"] or "").upper() in ARCHIVE_CLASSES:
            restored = self.state.scalar(
                "SELECT 1 FROM restores WHERE key = ? AND status = 'restored' AND etag IS ?",
                (o["key"], o["etag"]))
            if not restored:
                return "restoring"
        if path is None:
            return "inspect"
        if o["kind"] == "other" and self.config.non_dicom == "skip":
            return "skipped"
        return "queued"

    def _sync(self) -> None:
        """Bring the work queue in line with the inventory (new, changed, deleted objects)."""
        dest, stamp = self.dest, now()
        with self.state.transaction() as tx:
            tx.execute("UPDATE transfers SET state = 'queued', updated_at = ? "
                       "WHERE dest = ? AND state = 'fetching'", (stamp, dest))
            tx.execute("UPDATE transfers SET state = CASE WHEN path IS NULL THEN 'inspect' ELSE 'queued' END, "
                       "updated_at = ? WHERE dest = ? AND state = 'failed'", (stamp, dest))
            tx.execute("UPDATE transfers SET state = 'queued' WHERE dest = ? AND state = 'skipped' "
                       "AND ? = 'copy'", (dest, self.config.non_dicom))
            tx.execute("UPDATE transfers SET state = 'skipped' WHERE dest = ? AND state = 'queued' "
                       "AND kind = 'other' AND ? = 'skip'", (dest, self.config.non_dicom))
            deleted = tx.execute(
                "UPDATE transfers SET state = 'missing', reason = 'deleted at the source (found by inventory)', "
                "updated_at = ? WHERE dest = ? AND state NOT IN ('verified', 'duplicate', 'quarantined', 'missing') "
                "AND key IN (SELECT key FROM objects WHERE status = 'deleted')", (stamp, dest)).rowcount
            # Changed at the source since fetched or queued: fetch the new version.
            changed = _q(
                tx, "SELECT o.*, t.state AS t_state, t.etag AS t_etag, t.sha256 AS t_sha256, t.path AS t_path "
                "FROM transfers t JOIN objects o ON o.key = t.key WHERE t.dest = ? AND "
                "o.status = 'present' AND t.etag IS NOT o.etag", (dest,)).fetchall()
            for o in changed:
                tx.execute("UPDATE transfers SET path = NULL WHERE key = ? AND dest = ?", (o["key"], dest))
                path, conflict = self._path(tx, o)
                tx.execute(
                    "UPDATE transfers SET state = ?, etag = ?, size = ?, kind = ?, path = ?, conflict_with = ?, "
                    "sha256 = NULL, md5 = NULL, checks = NULL, reason = NULL, changes = changes + 1, "
                    "encoding = NULL, raw_sha256 = NULL, file_size = NULL, "
                    "updated_at = ?, fold_path = ? WHERE key = ? AND dest = ?",
                    (self._initial_state(o, path), o["etag"], o["size"], o["kind"], path, conflict,
                     stamp, self._fold(path), o["key"], dest))
                self.state.log("migrate.changed", tx, key=o["key"], old_etag=o["t_etag"],
                               new_etag=o["etag"], old_sha256=o["t_sha256"], old_path=o["t_path"],
                               was=o["t_state"])
            # New objects, numbered in the order of work.
            base = tx.execute("SELECT coalesce(max(seq), 0) FROM transfers WHERE dest = ?",
                              (dest,)).fetchone()[0]
            tx.execute("DROP TABLE IF EXISTS temp.cx_new")
            tx.execute(
                f"CREATE TEMP TABLE cx_new AS SELECT o.key AS key, row_number() OVER (ORDER BY {self._order()}) AS rn "
                "FROM objects o WHERE o.status = 'present' AND NOT EXISTS "
                "(SELECT 1 FROM transfers t WHERE t.key = o.key AND t.dest = ?)", (dest,))
            # `twin`: another DICOM object has the same SOP Instance UID (an index probe here, so
            # the conflict query runs only for those).
            rows = _q(tx, "SELECT o.*, n.rn, o.kind = 'dicom' AND EXISTS (SELECT 1 FROM objects x "
                          "WHERE x.sop_uid = o.sop_uid AND x.key != o.key AND x.kind = 'dicom') AS twin "
                          "FROM temp.cx_new n JOIN objects o ON o.key = n.key ORDER BY n.rn")
            # Paths are only added in this loop, so the folders of each path given out stay folders
            # (`_free` refuses a file where a folder is): their checks are skipped for the next ones.
            self._known_folders = set()
            insert = ("INSERT INTO transfers(key, dest, seq, state, etag, size, kind, path, conflict_with, "
                      "updated_at, fold_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            try:
                for o in rows:
                    path, conflict = self._path(tx, o, twin=bool(o["twin"]))
                    tx.execute(insert, (o["key"], dest, base + o["rn"], self._initial_state(o, path), o["etag"],
                                        o["size"], o["kind"], path, conflict, stamp, self._fold(path)))
            finally:
                self._known_folders = None
            tx.execute("DROP TABLE temp.cx_new")
            if deleted or changed:
                self.state.log("migrate.sync", tx, run=self.run_id, deleted=deleted, changed=len(changed))

    # -- workers -----------------------------------------------------------------------------------
    def _run_workers(self) -> None:
        from cloudexit.dicom.header import preload

        preload()  # the background threads read headers (`_bg_inspect`): import pydicom first
        self.background = ThreadPoolExecutor(4, thread_name_prefix="cloudexit-bg")
        self.reader = S3Reader(Endpoint(**{**asdict(self.endpoint), "connect_timeout": 5.0,
                                           "read_timeout": 10.0}), self.credentials)
        self._apply_rate(force=True)
        self._load_progress()
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        interrupted = False
        try:
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
            self.stop_error = Interrupted("interrupted")
        finally:
            try:
                self._shutdown(interrupted)
            finally:
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, previous)

    def _load_progress(self) -> None:
        c = counts(self.state, self.dest)
        p = self.progress
        p.total = sum(v for k, v in c.items() if not k.startswith("_"))
        p.done = sum(c.get(s, 0) for s in DONE_STATES)
        p.quarantined = c.get("quarantined", 0)
        p.failed = c.get("failed", 0) + c.get("missing", 0)
        p.restoring = c.get("restoring", 0)
        p.bytes_total = c["_bytes_total"]
        p.bytes_done = c["_bytes_done"]

    def _loop(self) -> None:
        pending = self.reported
        ranges: list[tuple[str, str, int, int]] = []
        last_commit = last_tick = 0.0
        exhausted_at = 0.0
        while True:
            # 1. What the workers finished.
            block = 0.05 if (self.flights or self.link_down_since
                             or any(o.busy for o in self.outlets)) else 0.0
            for message in self.executor.poll(block):
                self._receive(message, pending, ranges)
            self._drain_background()
            self._drain_deliveries()
            clock = time.monotonic()
            if pending or ranges or self.pacs_done or clock - last_commit > 1.0:
                if len(pending) >= 256 or clock - last_commit >= self.config.commit_interval or not self.flights:
                    self._commit(pending, ranges)
                    pending.clear()
                    ranges = []
                    last_commit = clock
            if self.stop_error is not None:
                return
            if self.config.backup_minutes and clock >= self.next_backup:
                self.backup_error = self.state.backup()
                self.next_backup = time.monotonic() + self.config.backup_minutes * 60
            if clock - last_tick >= self.config.progress_interval:
                last_tick = clock
                self._check_workers()
                self._apply_rate()
                self._restore_work()
                self.on_progress(self.progress)
            # 2. PACS deliveries of what the archive has verified (and committed).
            if self.outlets and clock >= self.next_pacs:
                self.next_pacs = clock + 0.05
                self._pacs_work()
            # 3. The link.
            if self.link_down_since is not None:
                if clock >= self.next_probe:
                    self._probe()
                else:
                    time.sleep(min(0.2, max(0.0, self.next_probe - clock)))
                continue
            # 4. More work for the workers.
            dispatched = self._dispatch()
            if not self.flights and not dispatched and not pending:
                if self.retry_heap:
                    time.sleep(min(0.2, max(0.0, self.retry_heap[0][0] - time.monotonic())))
                    continue
                if self._has_work("queued"):
                    continue
                if self.bg_busy or self._has_work("inspect"):
                    time.sleep(0.05)
                    continue
                if self._has_work("restoring"):
                    if not exhausted_at:
                        exhausted_at = clock
                    time.sleep(0.2)
                    continue
                if self._pacs_pending():
                    time.sleep(0.05)
                    continue
                return

    def _receive(self, message: Message, pending: list[Result], ranges: list[tuple[str, str, int, int]]) -> None:
        if isinstance(message, RangeDone):
            self._range(message, ranges)
        elif isinstance(message, WorkerLost):
            self._lost(message)
        else:
            pending.extend(results_of(message))

    def _range(self, message: RangeDone, ranges: list[tuple[str, str, int, int]]) -> None:
        """A large object's range got this far, on disk: record it (next commit), and keep it in
        the task for a retry in this run."""
        flight = self.flights.get(message.task_id)
        if flight is not None:
            task = flight.task
            task.done_ranges[message.index] = max(message.done, task.done_ranges.get(message.index, 0))
            ranges.append((flight.key, flight.etag, message.index, message.done))

    def _lost(self, message: WorkerLost) -> None:
        """A worker ended holding these tasks: run them again (a lost worker is no fault of theirs)."""
        for task_id in message.task_ids:
            flight = self.flights.pop(task_id, None)
            if flight is not None:
                self._retry(flight, delay=0.0)

    def _check_workers(self) -> None:
        """An executor that cannot go on (a worker process killed, out of memory, with tasks
        in flight that nobody will finish): stop cleanly instead; --resume queues them again."""
        problem = self.executor.health()
        if problem and self.stop_error is None:
            self.stop_error = StateError(
                problem, hint="check memory and the system log; then: cloudexit migrate --resume")

    def _has_work(self, state_name: str) -> bool:
        return bool(self.state.scalar("SELECT 1 FROM transfers WHERE dest = ? AND state = ? LIMIT 1",
                                      (self.dest, state_name)))

    def _dispatch(self) -> int:
        # Up to 8 tasks per thread at the workers (so they never wait for a busy engine), handed
        # out in batches of at least two per thread (one DB transaction each batch). Results that
        # came back and wait for the next commit no longer hold a place: counting them throttled
        # small objects to (tasks per thread) / (the commit cadence).
        capacity = self.executor.capacity
        room = capacity * 8 - (len(self.flights) - len(self.reported))
        if room <= 0 or self.stop_error is not None:
            return 0
        if room < 2 * capacity and self.flights and not self.retry_heap:
            return 0
        picked: list[_Flight] = []
        clock = time.monotonic()
        while self.retry_heap and self.retry_heap[0][0] <= clock and len(picked) < room:
            picked.append(heapq.heappop(self.retry_heap)[2])
        fresh: list[sqlite3.Row] = []
        if len(picked) < room:
            fresh = self.state.query(
                "SELECT t.key, t.seq, t.etag, t.size, t.kind, t.path, t.attempts, t.range_size, t.mtime_ns, t.part_sizes, "
                "o.sop_uid, o.study_uid, o.series_uid, o.checksums, o.encoding FROM transfers t "
                "JOIN objects o ON o.key = t.key WHERE t.dest = ? AND t.state = 'queued' AND t.seq > ? "
                "ORDER BY t.seq LIMIT ?", (self.dest, self.cursor, min(room - len(picked), 512)))
            if len(fresh) < room - len(picked):
                self.cursor = 0  # wrap: requeued rows may sit behind the cursor
            elif fresh:
                self.cursor = fresh[-1]["seq"]
        if fresh:
            stamp = now()
            large_rows = []
            with self.state.transaction() as tx:
                # `fresh` is every queued row of this seq range (the SELECT took them all, and
                # only this thread writes): one statement marks them.
                tx.execute(
                    "UPDATE transfers SET state = 'fetching', run_id = ?, attempts = attempts + 1, "
                    "started_at = ?, updated_at = ? WHERE dest = ? AND state = 'queued' AND seq BETWEEN ? AND ?",
                    (self.run_id, stamp, stamp, self.dest, fresh[0]["seq"], fresh[-1]["seq"]))
                for r in fresh:
                    if r["size"] >= self.config.large_object and not r["range_size"]:
                        tx.execute("UPDATE transfers SET range_size = ? WHERE key = ? AND dest = ?",
                                   (self.config.range_size, r["key"], self.dest))
                        large_rows.append(r["key"])
            for r in fresh:
                picked.append(self._flight(r, self.config.range_size if r["key"] in large_rows else r["range_size"]))
        for flight in picked:
            flight.task.credentials = self.credentials
            self.flights[flight.task.id] = flight
        if picked:
            self.executor.submit([flight.task for flight in picked])
        self.progress.in_flight = len(self.flights)
        return len(picked)

    def _flight(self, r: sqlite3.Row, range_size: int | None) -> _Flight:
        store = self.store
        final = store.absolute(r["path"])
        large = r["size"] >= self.config.large_object
        done_ranges: dict[int, int] = {}
        if large:
            done_ranges = {row[0]: row[1] if row[1] is not None else 2**62 for row in self.state.query(
                "SELECT idx, bytes FROM transfer_ranges WHERE key = ? AND dest = ? AND etag = ?",
                (r["key"], self.dest, r["etag"]))}
        task = Task(
            id=next(self.ids), key=r["key"], etag=r["etag"], size=r["size"], kind=r["kind"],
            final=final, temp=store.temp_beside(final, r["key"], r["etag"]),
            quarantine=None,  # the worker derives it (store.mismatch_path) only when needed
            expect={"sop_uid": r["sop_uid"], "study_uid": r["study_uid"], "series_uid": r["series_uid"]},
            provider=json.loads(r["checksums"]) if r["checksums"] else {},
            credentials=self.credentials, large=large, range_size=range_size or self.config.range_size,
            done_ranges=done_ranges, replaceable=r["mtime_ns"],
            part_sizes=recorded_sizes(r["part_sizes"], r["etag"], r["size"]),
            encoding=r["encoding"] if r["kind"] == "dicom" else None)
        return _Flight(r["seq"], r["key"], r["etag"], r["size"], r["kind"], r["path"], task,
                       attempts=r["attempts"] + 1)

    # -- results -----------------------------------------------------------------------------------
    def _commit(self, results: list[Result], ranges: list[tuple[str, str, int, int]]) -> None:
        stamp = now()
        with self.state.transaction() as tx:
            if ranges:  # before the results: a verified object's ranges are deleted
                tx.executemany("INSERT INTO transfer_ranges(key, dest, etag, idx, bytes) VALUES (?, ?, ?, ?, ?) "
                               "ON CONFLICT(key, dest, etag, idx) DO UPDATE SET bytes = max(bytes, excluded.bytes)",
                               [(k, self.dest, e, i, b) for k, e, i, b in ranges])
            for result in results:
                self._apply(tx, result, stamp)
            if self.done_rows:
                tx.executemany(
                    "UPDATE transfers SET state = ?, path = ?, sha256 = ?, md5 = ?, checks = ?, not_checked = ?, "
                    "reason = ?, verified_at = ?, updated_at = ?, run_id = ?, mtime_ns = ?, fold_path = ? "
                    "WHERE key = ? AND dest = ?",
                    self.done_rows)
                self.done_rows = []
            if self.pacs_done:
                self._commit_deliveries(tx, stamp)
            grew = self.meters.collect(tx, self.run_id)
            c = self.counters
            tx.execute(
                "UPDATE migration_runs SET get_requests = get_requests + ?, head_requests = head_requests + ?, "
                "list_requests = list_requests + ?, restore_requests = restore_requests + ?, "
                "bytes_downloaded = bytes_downloaded + ?, retries = retries + ?, heartbeat_at = ?, "
                "bytes_verified = bytes_verified + ?, objects_verified = objects_verified + ?, "
                "bytes_resumed = bytes_resumed + ? WHERE id = ?",
                (c.get, c.head, c.list, self.restore_requests, c.bytes, self.retries, stamp,
                 *self.verified_delta, self.run_id))
            self.verified_delta = [0, 0, 0]
            self.progress.bytes_downloaded += c.bytes + grew[0]
            self.counters = Counters()
            self.restore_requests = self.retries = 0

    def _apply(self, tx: sqlite3.Connection, r: Result, stamp: str) -> None:
        flight = self.flights.pop(r.id, None)  # its requests and bytes came by the meters
        self.retries += r.retries
        if flight is None:
            return
        key, dest = flight.key, self.dest
        if r.part_sizes:
            flight.task.part_sizes = r.part_sizes  # for a retry in this run, and the next runs
            tx.execute("UPDATE transfers SET part_sizes = ? WHERE key = ? AND dest = ?",
                       (record_sizes(flight.etag, r.part_sizes), key, dest))
        if r.outcome in ("verified", "quarantined"):
            self.streak, self.last_ok = 0, time.monotonic()
            landed = r.path or flight.task.final
            root = str(self.store.root) + os.sep
            relative = landed[len(root):] if landed.startswith(root) else os.path.relpath(landed, self.store.root)
            reason = r.detail
            if r.conflict:
                reason = self._archive_conflict(tx, key, r, relative, stamp)
            elif r.outcome == "quarantined" and reason is None:
                reason = tx.execute("SELECT reason FROM objects WHERE key = ?", (key,)).fetchone()[0]
            self.done_rows.append(
                (r.outcome, relative, r.sha256, r.md5, ",".join(r.checks),
                 "; ".join(r.not_checked) or None, reason, stamp, stamp, self.run_id, r.mtime_ns,
                 self.store.fold(relative), key, dest))
            if r.decoded:  # the file is the decoded instance: record the raw object beside it
                tx.execute("UPDATE transfers SET encoding = ?, raw_sha256 = ?, file_size = ? "
                           "WHERE key = ? AND dest = ?", (r.decoded["encoding"], r.decoded["raw_sha256"],
                                                          r.decoded["size"], key, dest))
            if flight.task.large:
                tx.execute("DELETE FROM transfer_ranges WHERE key = ? AND dest = ?", (key, dest))
            self.verified_delta[0] += flight.size
            self.verified_delta[1] += 1
            self.verified_delta[2] += r.resumed_from
            if r.outcome == "quarantined":
                self.progress.quarantined += 1
                self.state.log("migrate.quarantined", tx, key=key, path=relative, reason=reason)
            if r.replaced:
                self.state.log("migrate.replaced", tx, key=key, path=relative)
            if not r.local:
                self.fetched += 1
            self.progress.done += 1
            self.progress.bytes_done += flight.size
            self.progress.study = relative.split("/", 1)[0]
            return
        if r.outcome == "cancelled":
            tx.execute("UPDATE transfers SET state = 'queued', updated_at = ? WHERE key = ? AND dest = ?",
                       (stamp, key, dest))
            return
        kind = r.error_kind or "permanent"
        if kind not in ("unreachable", "tls"):
            self.streak, self.last_ok = 0, time.monotonic()
        if kind == "unreachable":
            # No answer. If others get answers, this object has a problem (strike); if nobody
            # does, the link is down: pause and probe (strikes do not count then).
            self.streak += 1
            link_up = time.monotonic() - self.last_ok < 2.0
            if link_up:
                flight.strikes += 1
            if flight.strikes >= self.config.attempts:
                self._fail(tx, flight, "failed", r.detail or "connection lost", stamp)
                return
            if self.streak >= max(3, min(self.executor.capacity, 6)) and not link_up:
                self._link_down(tx, r.detail)
            self.retries += 1
            self._retry(flight, delay=1.0)
            return
        if kind == "credentials":
            fresh = None
            try:
                fresh = self.source.frozen_credentials()
            except CloudexitError:
                pass
            if fresh is not None and fresh != self.credentials and flight.strikes < 2:
                self.credentials = fresh
                flight.strikes += 1
                self._retry(flight, delay=0.0)
                return
            tx.execute("UPDATE transfers SET state = 'queued', updated_at = ? WHERE key = ? AND dest = ?",
                       (stamp, key, dest))
            self.state.log("migrate.stopped", tx, run=self.run_id, reason="credentials", detail=r.detail)
            self.stop_error = CredentialsError(
                f"the endpoint refused the credentials: {r.detail}",
                hint="renew or fix the credentials (env, --profile), then: cloudexit migrate --resume")
            return
        if kind == "tls":
            # The certificate was trusted when the run started (its first requests passed): a
            # firewall that blocks the domain with its own certificate, or a middlebox that
            # started to inspect TLS. Not this object's fault: wait and probe as for an outage
            # (a block is lifted by itself), and say what to do if it is not.
            self._link_down(tx, r.detail, why=f"{r.detail}: if the network now inspects TLS, set "
                                              "AWS_CA_BUNDLE to its CA, stop and run: cloudexit migrate --resume")
            self._retry(flight, delay=1.0)
            return
        if kind == "disk":
            tx.execute("UPDATE transfers SET state = 'queued', updated_at = ? WHERE key = ? AND dest = ?",
                       (stamp, key, dest))
            if self.stop_error is None:
                self.state.log("migrate.stopped", tx, run=self.run_id, reason="destination", detail=r.detail)
                if r.error_code in ("EROFS", "EACCES", "EPERM"):
                    self.stop_error = StoreError(
                        f"the archive at {self.store.root} is not writable: {r.detail}",
                        hint="make that folder writable (its permissions, or a read-only mount), "
                             "then: cloudexit migrate --resume")
                else:
                    free = _free_space(self.store)
                    self.stop_error = StoreError(
                        f"the archive at {self.store.root} cannot take more: {r.detail}"
                        + (f" ({free} free)" if free else ""),
                        hint="free space or fix the folder's permissions, then: cloudexit migrate --resume")
            return
        if kind == "gone":
            self._fail(tx, flight, "missing", r.detail or "deleted at the source", stamp)
            return
        if kind == "archived":
            tx.execute("UPDATE transfers SET state = 'restoring', updated_at = ? WHERE key = ? AND dest = ?",
                       (stamp, key, dest))
            tx.execute("DELETE FROM restores WHERE key = ? AND status != 'requested'", (key,))
            self.progress.restoring += 1
            return
        if kind == "changed":
            new = r.changed_to
            if new and new.get("gone"):
                self._fail(tx, flight, "missing", "deleted at the source since inventory", stamp)
                return
            changes = tx.execute("SELECT changes FROM transfers WHERE key = ? AND dest = ?",
                                 (key, dest)).fetchone()[0]
            if not new or changes >= 3:
                self._fail(tx, flight, "failed", "the object keeps changing at the source", stamp)
                return
            tx.execute("UPDATE objects SET etag = ?, size = ?, last_modified = ?, change = 'changed', "
                       "kind = 'pending', updated_at = ? WHERE key = ?",
                       (new["etag"], new["size"], new.get("last_modified"), stamp, key))
            tx.execute("UPDATE transfers SET state = 'inspect', etag = ?, size = ?, path = NULL, "
                       "changes = changes + 1, updated_at = ? WHERE key = ? AND dest = ?",
                       (new["etag"], new["size"], stamp, key, dest))
            self.progress.bytes_total += new["size"] - flight.size
            self.state.log("migrate.changed", tx, key=key, old_etag=flight.etag, new_etag=new["etag"],
                           detail="changed at the source during the migration (HTTP 412)")
            return
        self._fail(tx, flight, "failed", r.detail or kind, stamp)

    def _archive_conflict(self, tx: sqlite3.Connection, key: str, r: Result, relative: str, stamp: str) -> str:
        """A verified copy found its path holding other bytes: it was kept in quarantine. Record
        it here and in the archive's ledger (the other migration's DB may not be at hand)."""
        from cloudexit.stores.claim import record_conflict

        assert r.conflict is not None
        taken = os.path.relpath(r.conflict, self.store.root).replace(os.sep, "/")
        record_conflict(self.store.root, {
            "at": stamp, "migration_id": self.state.meta("migration_id"),
            "source": self.state.meta("source_url"), "path": taken, "quarantined_at": relative,
            "sha256": r.sha256})
        self.state.log("migrate.archive-conflict", tx, key=key, path=taken, quarantined_at=relative,
                       sha256=r.sha256)
        return (f"archive conflict: {taken} already holds another file with other bytes (kept: "
                f"never replaced); this verified copy is at {relative}")

    def _fail(self, tx: sqlite3.Connection, flight: _Flight, state_name: str, reason: str, stamp: str) -> None:
        tx.execute("UPDATE transfers SET state = ?, reason = ?, updated_at = ? WHERE key = ? AND dest = ?",
                   (state_name, reason, stamp, flight.key, self.dest))
        self.progress.failed += 1
        self.state.log(f"migrate.{state_name}", tx, key=flight.key, reason=reason)

    def _retry(self, flight: _Flight, delay: float) -> None:
        due = time.monotonic() + delay * random.uniform(0.5, 1.5)
        flight.task.id = next(self.ids)
        heapq.heappush(self.retry_heap, (due, flight.task.id, flight))

    # -- the link ----------------------------------------------------------------------------------
    def _link_down(self, tx: sqlite3.Connection, detail: str | None, why: str | None = None) -> None:
        if self.link_down_since is not None:
            return
        self.link_down_since = time.time()
        self.probe_interval = 1.0
        self.next_probe = time.monotonic() + self.probe_interval
        since = now()
        self.progress.waiting_since, self.progress.waiting_why = since, why
        tx.execute("UPDATE migration_runs SET waiting_since = ? WHERE id = ?", (since, self.run_id))
        self.state.log("migrate.link_down", tx, run=self.run_id, detail=detail, why=why)

    def _probe(self) -> None:
        if self.reader.probe(self.counters):
            down_for = time.time() - (self.link_down_since or time.time())
            self.link_down_since = None
            self.progress.waiting_since = self.progress.waiting_why = None
            self.streak = 0
            self.last_ok = time.monotonic()
            with self.state.transaction() as tx:
                tx.execute("UPDATE migration_runs SET waiting_since = NULL, link_outages = link_outages + 1 "
                           "WHERE id = ?", (self.run_id,))
                self.state.log("migrate.link_up", tx, run=self.run_id, down_seconds=round(down_for, 1))
            now_ = time.monotonic()
            self.retry_heap = [(now_, i, f) for _, i, f in self.retry_heap]
            heapq.heapify(self.retry_heap)
            return
        self.probe_interval = min(self.probe_interval * 2, self.config.link_probe_max)
        self.next_probe = time.monotonic() + self.probe_interval * random.uniform(0.8, 1.2)

    # -- bandwidth -----------------------------------------------------------------------------------
    def _apply_rate(self, force: bool = False) -> None:
        text = self.state.scalar("SELECT bwlimit FROM migration_runs WHERE id = ?", (self.run_id,))
        if text != self.schedule_text:
            from cloudexit.engine.schedule import parse_schedule

            try:
                self.schedule = parse_schedule(text) if text else None
                self.schedule_text = text
            except CloudexitError:
                pass  # checked before it was written; keep the old timetable
        rate = self.schedule.rate_at(datetime.now()) if self.schedule is not None else None
        if force or rate != self.progress.rate_limit:
            self.executor.set_rate(rate)
            self.progress.rate_limit = rate

    # -- restores and header reads (background threads; the DB is written here only) -------------
    def _restore_work(self) -> None:
        if self.background is None:
            return
        cfg = self.config
        # Objects waiting for a restore that none was asked for yet.
        rows = self.state.query(
            "SELECT t.key, t.etag, o.storage_class FROM transfers t JOIN objects o ON o.key = t.key "
            "LEFT JOIN restores r ON r.key = t.key WHERE t.dest = ? AND t.state = 'restoring' "
            "AND (r.key IS NULL OR (r.status = 'restored' AND r.etag IS NOT t.etag)) LIMIT 200", (self.dest,))
        for r in rows:
            if r["key"] not in self.bg_busy:
                self.bg_busy.add(r["key"])
                self.background.submit(self._bg_restore, r["key"], r["etag"], r["storage_class"])
        # Restores in progress: check them every restore_poll seconds.
        if time.monotonic() >= self.next_restore_poll:
            self.next_restore_poll = time.monotonic() + cfg.restore_poll
            for r in self.state.query("SELECT key, etag FROM restores WHERE status = 'requested'"):
                if r["key"] not in self.bg_busy:
                    self.bg_busy.add(r["key"])
                    self.background.submit(self._bg_check_restore, r["key"], r["etag"])
        # Objects whose header must be read first (archived at inventory time, or changed).
        for r in self.state.query("SELECT t.key, t.etag, t.size FROM transfers t WHERE t.dest = ? "
                                  "AND t.state = 'inspect' LIMIT 200", (self.dest,)):
            if r["key"] not in self.bg_busy:
                self.bg_busy.add(r["key"])
                self.background.submit(self._bg_inspect, r["key"], r["etag"], r["size"])

    def _bg_restore(self, key: str, etag: str, storage_class: str | None) -> None:
        cfg = self.config
        request: dict[str, Any] = {"Days": cfg.restore_days}
        if (storage_class or "").upper() not in ("ARCHIVE", "COLDARCHIVE", "DEEPCOLDARCHIVE", "COLD"):
            request["GlacierJobParameters"] = {"Tier": restore_tier(storage_class, cfg.restore_tier)}
        try:
            resp = self.source.client().restore_object(Bucket=self.source.bucket, Key=key,
                                                       RestoreRequest=request)
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 202)
            outcome = "restored" if status == 200 else "requested"
            self.bg_results.put(("restore", key, {"status": outcome, "etag": etag,
                                                  "storage_class": storage_class}))
        except Exception as exc:  # noqa: BLE001 - translated and recorded
            code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
            if code == "RestoreAlreadyInProgress":
                self.bg_results.put(("restore", key, {"status": "requested", "etag": etag,
                                                      "storage_class": storage_class}))
            elif code == "InvalidObjectState" or code == "ObjectAlreadyInActiveTierError":
                self.bg_results.put(("restore", key, {"status": "restored", "etag": etag,
                                                      "storage_class": storage_class}))
            else:
                err = self.source.translate(exc, f"restore {key!r}") if isinstance(exc, Exception) else exc
                self.bg_results.put(("restore", key, {"status": "failed", "etag": etag,
                                                      "storage_class": storage_class,
                                                      "reason": str(err).split("\n")[0],
                                                      "fatal": isinstance(err, CredentialsError)}))

    def _bg_check_restore(self, key: str, etag: str) -> None:
        try:
            head = self.source.head(key)
        except CloudexitError as exc:
            self.bg_results.put(("restore_check", key, {"error": str(exc).split("\n")[0]}))
            return
        restore = head.get("Restore") or ""
        done = 'ongoing-request="false"' in restore
        expiry = None
        if "expiry-date=" in restore:
            expiry = restore.split("expiry-date=", 1)[1].strip().strip('"')
        self.bg_results.put(("restore_check", key, {"done": done, "expiry": expiry,
                                                    "storage_class": head.get("StorageClass")}))

    def _bg_inspect(self, key: str, etag: str, size: int) -> None:
        """Read an object's header (as the inventory does) to know where it goes."""
        from cloudexit.dicom.containers import classify_object
        from cloudexit.dicom.header import patient_hash
        from cloudexit.s3.source import ObjectChanged, ObjectGone

        length = min(64 * 1024, size) if size else 0
        info: dict[str, Any] = {"etag": etag, "bytes": 0, "requests": 0}
        try:
            while True:
                if length == 0:
                    header = classify_object(key, b"", 0)
                    break
                read = self.source.read_range(key, 0, length - 1, etag)
                info["bytes"] += len(read.data)
                info["requests"] += 1
                info["checksums"] = read.checksums
                header = classify_object(key, read.data, read.size)
                if not header.need_more or length >= size or length >= 32 * 2**20:
                    break
                length = min(length * 4, size)
        except ObjectChanged:
            info["changed"] = True
            self.bg_results.put(("inspect", key, info))
            return
        except ObjectGone:
            info["gone"] = True
            self.bg_results.put(("inspect", key, info))
            return
        except CloudexitError as exc:
            text = str(exc)
            info["error"] = text.split("\n")[0]
            info["archived"] = "InvalidObjectState" in text
            info["fatal"] = isinstance(exc, CredentialsError)
            self.bg_results.put(("inspect", key, info))
            return
        info["header"] = {
            "kind": header.kind, "reason": header.reason, "study_uid": header.study_uid,
            "series_uid": header.series_uid, "sop_uid": header.sop_uid,
            "sop_class_uid": header.sop_class_uid, "modality": header.modality,
            "study_date": header.study_date, "transfer_syntax": header.transfer_syntax,
            "patient_hash": patient_hash(self.patient_key, header.patient_id), "encoding": header.encoding,
            "plain_size": header.plain_size, "pacs_metadata": header.pacs_metadata}
        self.bg_results.put(("inspect", key, info))

    def _drain_background(self) -> None:
        items = []
        while True:
            try:
                items.append(self.bg_results.get_nowait())
            except queue.Empty:
                break
        if not items:
            return
        stamp = now()
        with self.state.transaction() as tx:
            for what, key, info in items:
                self.bg_busy.discard(key)
                getattr(self, f"_on_{what}")(tx, key, info, stamp)

    def _on_restore(self, tx: sqlite3.Connection, key: str, info: dict[str, Any], stamp: str) -> None:
        self.restore_requests += 1
        status = info["status"]
        tx.execute(
            "INSERT INTO restores(key, etag, storage_class, tier, days, status, requested_at, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET etag = excluded.etag, "
            "status = excluded.status, requested_at = excluded.requested_at, reason = excluded.reason",
            (key, info["etag"], info.get("storage_class"),
             restore_tier(info.get("storage_class"), self.config.restore_tier),
             self.config.restore_days, status, stamp, info.get("reason")))
        self.state.log("migrate.restore", tx, key=key, status=status,
                       tier=restore_tier(info.get("storage_class"), self.config.restore_tier),
                       days=self.config.restore_days, reason=info.get("reason"))
        if status == "restored":
            self._restored(tx, key, stamp)
        elif status == "failed":
            tx.execute("UPDATE transfers SET state = 'failed', reason = ?, updated_at = ? "
                       "WHERE key = ? AND dest = ?", (f"restore request failed: {info.get('reason')}",
                                                      stamp, key, self.dest))
            self.progress.failed += 1
            if info.get("fatal") and self.stop_error is None:
                self.stop_error = CredentialsError(f"restore refused: {info.get('reason')}",
                                                   hint="fix the credentials, then: cloudexit migrate --resume")
        else:
            self.next_restore_poll = min(self.next_restore_poll, time.monotonic() + self.config.restore_poll)

    def _on_restore_check(self, tx: sqlite3.Connection, key: str, info: dict[str, Any], stamp: str) -> None:
        self.counters.head += 1
        tx.execute("UPDATE restores SET checked_at = ?, checks = checks + 1 WHERE key = ?", (stamp, key))
        if info.get("done"):
            tx.execute("UPDATE restores SET status = 'restored', restored_at = ?, expiry = ? WHERE key = ?",
                       (stamp, info.get("expiry"), key))
            self.state.log("migrate.restored", tx, key=key, expiry=info.get("expiry"))
            self._restored(tx, key, stamp)

    def _restored(self, tx: sqlite3.Connection, key: str, stamp: str) -> None:
        row = tx.execute("SELECT path FROM transfers WHERE key = ? AND dest = ? AND state = 'restoring'",
                         (key, self.dest)).fetchone()
        if row is None:
            return
        tx.execute("UPDATE transfers SET state = ?, updated_at = ? WHERE key = ? AND dest = ?",
                   ("queued" if row[0] else "inspect", stamp, key, self.dest))
        self.progress.restoring = max(0, self.progress.restoring - 1)

    def _on_inspect(self, tx: sqlite3.Connection, key: str, info: dict[str, Any], stamp: str) -> None:
        self.counters.get += info.get("requests", 0)
        self.counters.bytes += info.get("bytes", 0)
        if info.get("gone"):
            tx.execute("UPDATE transfers SET state = 'missing', reason = 'deleted at the source', "
                       "updated_at = ? WHERE key = ? AND dest = ?", (stamp, key, self.dest))
            self.progress.failed += 1
            return
        if info.get("changed"):
            # Changed again: take its new identity from a HEAD and read again next round.
            try:
                head = self.source.head(key)
                tx.execute("UPDATE objects SET etag = ?, size = ?, change = 'changed', updated_at = ? "
                           "WHERE key = ?", (head.get("ETag", "").strip('"'), int(head["ContentLength"]),
                                             stamp, key))
                tx.execute("UPDATE transfers SET etag = ?, size = ?, changes = changes + 1 "
                           "WHERE key = ? AND dest = ?", (head.get("ETag", "").strip('"'),
                                                          int(head["ContentLength"]), key, self.dest))
            except CloudexitError as exc:
                tx.execute("UPDATE transfers SET state = 'failed', reason = ? WHERE key = ? AND dest = ?",
                           (str(exc).split("\n")[0], key, self.dest))
            return
        if info.get("archived"):
            tx.execute("UPDATE transfers SET state = 'restoring', updated_at = ? WHERE key = ? AND dest = ?",
                       (stamp, key, self.dest))
            tx.execute("DELETE FROM restores WHERE key = ? AND status != 'requested'", (key,))
            return
        if info.get("error"):
            tx.execute("UPDATE transfers SET state = 'failed', reason = ?, updated_at = ? "
                       "WHERE key = ? AND dest = ?", (f"header read failed: {info['error']}", stamp,
                                                      key, self.dest))
            self.progress.failed += 1
            if info.get("fatal") and self.stop_error is None:
                self.stop_error = CredentialsError(info["error"],
                                                   hint="fix the credentials, then: cloudexit migrate --resume")
            return
        h = info["header"]
        tx.execute(
            "UPDATE objects SET kind = ?, reason = ?, study_uid = ?, series_uid = ?, sop_uid = ?, "
            "sop_class_uid = ?, modality = ?, study_date = ?, transfer_syntax = ?, patient_hash = ?, "
            "checksums = coalesce(?, checksums), header_source = 'header', "
            "header_bytes = header_bytes + ?, updated_at = ?, encoding = ?, plain_size = ?, "
            "pacs_metadata = ? WHERE key = ? AND etag IS ?",
            (h["kind"], h["reason"], h["study_uid"], h["series_uid"], h["sop_uid"], h["sop_class_uid"],
             h["modality"], h["study_date"], h["transfer_syntax"], h["patient_hash"],
             json.dumps(info["checksums"]) if info.get("checksums") else None, info["bytes"], stamp,
             h["encoding"], h["plain_size"], h["pacs_metadata"], key, info["etag"]))
        o = _q(tx, "SELECT * FROM objects WHERE key = ?", (key,)).fetchone()
        tx.execute("UPDATE transfers SET path = NULL WHERE key = ? AND dest = ?", (key, self.dest))
        path, conflict = self._path(tx, o)
        state_name = "skipped" if h["kind"] == "other" and self.config.non_dicom == "skip" else "queued"
        tx.execute("UPDATE transfers SET state = ?, kind = ?, path = ?, conflict_with = ?, etag = ?, "
                   "size = ?, updated_at = ?, fold_path = ? WHERE key = ? AND dest = ?",
                   (state_name, h["kind"], path, conflict, o["etag"], o["size"], stamp, self._fold(path),
                    key, self.dest))

    # -- closing -----------------------------------------------------------------------------------
    def _shutdown(self, interrupted: bool) -> None:
        if interrupted or self.stop_error is not None:
            self.executor.cancel()
        pending: list[Result] = []
        ranges: list[tuple[str, str, int, int]] = []
        stop_now = False
        try:  # a second Ctrl-C anywhere in this wait (the line below included) stops now
            if interrupted:  # said at once: the wait below can take seconds
                self.progress.stopping = len(self.flights)
                self.on_progress(self.progress)
            deadline = time.monotonic() + (15.0 if not interrupted else 10.0)
            while self.flights and time.monotonic() < deadline:
                for message in self.executor.poll(0.1):
                    # RangeDone: how far the large objects got as they stopped
                    self._receive(message, pending, ranges)
                if len(pending) >= 64:
                    self._commit(pending, ranges)
                    pending, ranges = [], []
        except KeyboardInterrupt:  # Ctrl-C again: stop now; the workers' temp files stay temp
            stop_now = True        # files, nothing unverified reaches a final path
        # What is left is bookkeeping: a further Ctrl-C must not cut a transaction in half.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._finish_shutdown(pending, ranges, wait=not stop_now)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def _finish_shutdown(self, pending: list[Result], ranges: list[tuple[str, str, int, int]],
                         wait: bool) -> None:
        for outlet in self.outlets:  # deliveries in progress end (queued ones are cancelled)
            outlet.pool.shutdown(wait=wait, cancel_futures=True)
        self._drain_deliveries()
        self._commit(pending, ranges)
        stamp = now()
        with self.state.transaction() as tx:
            if self.flights or self.retry_heap:
                keys = [(stamp, f.key, self.dest) for f in self.flights.values()]
                keys += [(stamp, f.key, self.dest) for _, _, f in self.retry_heap]
                tx.executemany("UPDATE transfers SET state = 'queued', updated_at = ? "
                               "WHERE key = ? AND dest = ? AND state = 'fetching'", keys)
            self.flights.clear()
            self.retry_heap.clear()
        self._stop_workers()
        self.meters.close(self.state, self.run_id)
        if self.background is not None:
            self.background.shutdown(wait=False, cancel_futures=True)
        self.reader.close()

    def _stop_workers(self) -> None:
        self.executor.stop()
        self.workers_joined = True

    def _resolve_conflicts(self) -> None:
        """Same SOP Instance UID at two keys: identical content is a duplicate (one copy kept);
        different content stays quarantined beside the first."""
        if self.stop_error is not None:
            return
        stamp = now()
        rows = self.state.query(
            "SELECT t.key, t.sha256, t.path, t.conflict_with, c.sha256 AS canon_sha, c.state AS canon_state, "
            "c.path AS canon_path FROM transfers t JOIN transfers c ON c.key = t.conflict_with AND c.dest = t.dest "
            "WHERE t.dest = ? AND t.state = 'verified' AND t.conflict_with IS NOT NULL", (self.dest,))
        with self.state.transaction() as tx:
            for r in rows:
                if r["canon_state"] == "verified" and r["canon_sha"] == r["sha256"]:
                    try:
                        os.unlink(self.store.absolute(r["path"]))
                    except FileNotFoundError:
                        pass
                    tx.execute("UPDATE transfers SET state = 'duplicate', path = NULL, reason = ?, "
                               "updated_at = ? WHERE key = ? AND dest = ?",
                               (f"identical to {r['conflict_with']!r} (same SHA-256), kept once at "
                                f"{r['canon_path']}", stamp, r["key"], self.dest))
                    self.state.log("migrate.duplicate", tx, key=r["key"], same_as=r["conflict_with"])
                elif r["path"].startswith(CASE_COLLISIONS + "/"):
                    reason = (f"collision: its name differs from {r['conflict_with']!r}'s only in letter "
                              "case or Unicode form, which this destination takes as the same name; "
                              "both kept, this one quarantined")
                    tx.execute("UPDATE transfers SET state = 'quarantined', reason = ?, updated_at = ? "
                               "WHERE key = ? AND dest = ?", (reason, stamp, r["key"], self.dest))
                    self.state.log("migrate.collision", tx, key=r["key"], holder=r["conflict_with"],
                                   path=r["path"])
                else:
                    reason = (f"conflict: SOP Instance UID also at {r['conflict_with']!r} with different "
                              f"content; both kept, this one quarantined")
                    if r["canon_state"] != "verified":
                        reason = (f"conflict: SOP Instance UID also at {r['conflict_with']!r} "
                                  f"(not migrated yet: {r['canon_state']}); quarantined")
                    tx.execute("UPDATE transfers SET state = 'quarantined', reason = ?, updated_at = ? "
                               "WHERE key = ? AND dest = ?", (reason, stamp, r["key"], self.dest))
                    self.state.log("migrate.conflict", tx, key=r["key"], holder=r["conflict_with"],
                                   path=r["path"])

    # -- PACS delivery (threads in this process; the DB is written by the loop only) ---------------
    def _open_outlets(self) -> None:
        if not self.deliver_to:
            return
        contexts = [(r[0], r[1]) for r in self.state.query(
            "SELECT DISTINCT sop_class_uid, transfer_syntax FROM objects WHERE kind = 'dicom' "
            "AND status = 'present' AND sop_class_uid IS NOT NULL AND transfer_syntax IS NOT NULL")]
        duplicates = [r[0] for r in self.state.query(
            "SELECT sop_uid FROM objects WHERE kind = 'dicom' AND status = 'present' AND sop_uid IS NOT NULL "
            "GROUP BY sop_uid HAVING count(*) > 1")]
        seen = {self.dest}
        for store in self.deliver_to:
            if store.id in seen:
                raise UsageError(f"--to {store.url} is given twice")
            seen.add(store.id)
            if hasattr(store, "expect"):
                store.expect(contexts=contexts, duplicates=duplicates)
            outlet = _Outlet(store, ThreadPoolExecutor(max(1, int(store.parallel)),
                                                       thread_name_prefix=f"cloudexit-{store.kind}"))
            self.outlets.append(outlet)
            try:
                store.check()
            except StoreUnavailable:
                outlet.down_since = time.time()  # start paused; probed like a lost link
                outlet.next_probe = time.monotonic() + outlet.interval

    def _insert_pacs_rows(self, tx: sqlite3.Connection) -> int:
        """A row per PACS destination for every DICOM object the archive will hold."""
        stamp, added = now(), 0
        for o in self.outlets:
            dest = o.store.id
            added += tx.execute(
                "INSERT INTO transfers(key, dest, seq, state, etag, size, kind, updated_at) "
                "SELECT a.key, ?, a.seq, 'queued', x.etag, x.size, x.kind, ? FROM transfers a "
                "JOIN objects x ON x.key = a.key WHERE a.dest = ? AND x.kind = 'dicom' AND x.status = 'present' "
                "AND NOT EXISTS (SELECT 1 FROM transfers p WHERE p.key = a.key AND p.dest = ?)",
                (dest, stamp, self.dest, dest)).rowcount
        return added

    def _sync_pacs(self) -> None:
        if not self.outlets:
            return
        stamp = now()
        with self.state.transaction() as tx:
            for o in self.outlets:
                dest = o.store.id
                # Changed at the source: the new version is delivered once verified.
                tx.execute(
                    "UPDATE transfers SET state = 'queued', reason = NULL, updated_at = ?, "
                    "etag = (SELECT x.etag FROM objects x WHERE x.key = transfers.key), "
                    "size = (SELECT x.size FROM objects x WHERE x.key = transfers.key) WHERE dest = ? "
                    "AND EXISTS (SELECT 1 FROM objects x WHERE x.key = transfers.key AND x.status = 'present' "
                    "AND x.etag IS NOT transfers.etag)", (stamp, dest))
                tx.execute("UPDATE transfers SET state = 'missing', reason = 'deleted at the source (found by "
                           "inventory)', updated_at = ? WHERE dest = ? AND state IN ('queued', 'failed', 'skipped') "
                           "AND key IN (SELECT key FROM objects WHERE status = 'deleted')", (stamp, dest))
                # Refusals worth another try (PACS out of resources, HTTP 5xx), and objects the
                # archive did not have last time.
                transient = " OR ".join("reason LIKE ?" for _ in TRANSIENT_REASONS)
                tx.execute(f"UPDATE transfers SET state = 'queued', updated_at = ? WHERE dest = ? AND "
                           f"(state = 'skipped' OR (state = 'failed' AND ({transient})))",
                           (stamp, dest, *TRANSIENT_REASONS))
                if o.down_since is not None:
                    self.state.log("migrate.pacs_down", tx, run=self.run_id, dest=dest, detail="at start")
            self._insert_pacs_rows(tx)

    def _eligible(self, o: _Outlet, limit: int) -> list[sqlite3.Row]:
        """PACS rows to deliver: queued, and the archive holds the verified file of that version.
        Never the second holder of a shared SOP Instance UID (conflict_with set): it ends as a
        duplicate or quarantined, and a PACS that overwrites instances would keep it in place of
        the first (see `_settle_pacs`)."""
        return self.state.query(
            "SELECT p.key, a.path, a.sha256, coalesce(a.file_size, a.size) AS size, x.kind, x.sop_uid, x.sop_class_uid, x.study_uid, "
            "x.series_uid, x.transfer_syntax FROM transfers p "
            "JOIN transfers a ON a.key = p.key AND a.dest = ? JOIN objects x ON x.key = p.key "
            "WHERE p.dest = ? AND p.state = 'queued' AND a.path IS NOT NULL AND a.etag IS p.etag "
            "AND a.state = 'verified' AND a.conflict_with IS NULL "
            "ORDER BY p.seq LIMIT ?", (self.dest, o.store.id, limit))

    def _pacs_work(self) -> None:
        clock = time.monotonic()
        for o in self.outlets:
            if o.down_since is not None:
                if not o.probing and clock >= o.next_probe:
                    o.probing = True
                    o.pool.submit(self._probe_outlet, o)
                continue
            room = 2 * max(1, int(o.store.parallel)) - len(o.busy)
            if room <= 0 or self.stop_error is not None:
                continue
            for r in self._eligible(o, room + len(o.busy)):
                if room <= 0:
                    break
                if r["key"] in o.busy:
                    continue
                room -= 1
                o.busy.add(r["key"])
                item = Item(key=r["key"], size=r["size"], sha256=r["sha256"], kind=r["kind"],
                            sop_uid=r["sop_uid"], sop_class_uid=r["sop_class_uid"], study_uid=r["study_uid"],
                            series_uid=r["series_uid"], transfer_syntax=r["transfer_syntax"])
                o.pool.submit(self._deliver_one, o, item, str(self.store.absolute(r["path"])))

    def _deliver_one(self, o: _Outlet, item: Item, staged: str) -> None:
        try:
            answer: Any = o.store.deliver(item, staged)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            answer = exc
        self.delivered.put((o, item.key, answer))

    def _probe_outlet(self, o: _Outlet) -> None:
        try:
            o.store.check()
            answer: Any = True
        except StoreUnavailable:
            answer = False
        except BaseException as exc:  # noqa: BLE001
            answer = exc
        self.delivered.put((o, None, answer))  # type: ignore[arg-type]

    def _drain_deliveries(self) -> None:
        while True:
            try:
                o, key, answer = self.delivered.get_nowait()
            except queue.Empty:
                return
            dest = o.store.id
            if key is None:  # a probe of a paused destination
                o.probing = False
                if answer is True:
                    down_for = time.time() - (o.down_since or time.time())
                    o.down_since, o.interval = None, 1.0
                    self.state.log("migrate.pacs_up", run=self.run_id, dest=dest, down_seconds=round(down_for, 1))
                elif answer is False:
                    o.interval = min(o.interval * 2, self.config.link_probe_max)
                    o.next_probe = time.monotonic() + o.interval * random.uniform(0.8, 1.2)
                elif self.stop_error is None:
                    self.stop_error = answer
                continue
            if isinstance(answer, StoreUnavailable):
                o.busy.discard(key)  # still queued: delivered after the pause
                if o.down_since is None:
                    o.down_since, o.interval = time.time(), 1.0
                    o.next_probe = time.monotonic() + o.interval
                    self.state.log("migrate.pacs_down", run=self.run_id, dest=dest, detail=str(answer))
                continue
            if isinstance(answer, (StoreError, KeyboardInterrupt)):
                o.busy.discard(key)
                if self.stop_error is None:
                    self.stop_error = answer
                    self.state.log("migrate.stopped", run=self.run_id, reason="pacs", dest=dest,
                                   detail=str(answer).split("\n")[0])
                continue
            if isinstance(answer, BaseException):
                answer = Delivery("failed", code="error", detail=f"{type(answer).__name__}: {answer}")
            self.pacs_done.append((o, key, answer))

    def _commit_deliveries(self, tx: sqlite3.Connection, stamp: str) -> None:
        rows = []
        for o, key, d in self.pacs_done:
            reason = None
            if d.status != "stored":
                reason = f"{d.code}: {d.detail}" if d.code and d.detail else (d.code or d.detail)
            rows.append((d.status, reason, stamp, stamp, self.run_id, key, o.store.id))
            if d.status in ("conflict", "failed"):
                self.state.log(f"migrate.delivery_{d.status}", tx, key=key, dest=o.store.id, code=d.code,
                               detail=d.detail, **{k: v for k, v in d.extra.items() if isinstance(v, str)})
            o.busy.discard(key)
        tx.executemany("UPDATE transfers SET state = ?, reason = ?, verified_at = ?, updated_at = ?, "
                       "run_id = ?, attempts = attempts + 1 WHERE key = ? AND dest = ?", rows)
        self.delivered_count += len(rows)
        self.pacs_done = []

    def _pacs_pending(self) -> bool:
        """Whether the loop must go on for the PACS destinations (a paused one included)."""
        if not self.outlets:
            return False
        if self.pacs_done or any(o.busy for o in self.outlets):
            return True
        if not self.pacs_rows_final:  # the archive work is done: every object's kind is known
            self.pacs_rows_final = True
            with self.state.transaction() as tx:
                if self._insert_pacs_rows(tx):  # objects whose header read made them DICOM
                    return True
        return any(self._eligible(o, 1) for o in self.outlets)

    def _settle_pacs(self) -> None:
        """PACS rows the archive cannot feed: identical duplicates (delivered once, under the
        other key), objects gone at the source, objects quarantined in the archive."""
        if not self.outlets or self.stop_error is not None:
            return
        stamp = now()
        with self.state.transaction() as tx:
            for o in self.outlets:
                dest = o.store.id
                tx.execute(
                    "UPDATE transfers SET state = 'duplicate', updated_at = ?, "
                    "conflict_with = (SELECT a.conflict_with FROM transfers a WHERE a.key = transfers.key "
                    "AND a.dest = ?), reason = (SELECT 'identical to ' || quote(a.conflict_with) || "
                    "' (same SHA-256): delivered once' FROM transfers a WHERE a.key = transfers.key AND a.dest = ?) "
                    "WHERE dest = ? AND state = 'queued' AND key IN "
                    "(SELECT key FROM transfers WHERE dest = ? AND state = 'duplicate')",
                    (stamp, self.dest, self.dest, dest, self.dest))
                tx.execute(
                    "UPDATE transfers SET state = 'missing', reason = 'missing at the source', updated_at = ? "
                    "WHERE dest = ? AND state = 'queued' AND key IN "
                    "(SELECT key FROM transfers WHERE dest = ? AND state = 'missing')", (stamp, dest, self.dest))
                reason = ("(SELECT 'not delivered: ' || a.state || ' in the archive' || coalesce(' (' || a.reason "
                          "|| ')', '') FROM transfers a WHERE a.key = transfers.key AND a.dest = ?)")
                # A quarantined conflict copy is recorded here as such, beside the copy delivered.
                tx.execute(
                    f"UPDATE transfers SET state = 'quarantined', updated_at = ?, reason = {reason}, "
                    "conflict_with = (SELECT a.conflict_with FROM transfers a WHERE a.key = transfers.key "
                    "AND a.dest = ?) WHERE dest = ? AND state = 'queued' AND key IN "
                    "(SELECT key FROM transfers WHERE dest = ? AND state = 'quarantined' AND conflict_with IS NOT NULL)",
                    (stamp, self.dest, self.dest, dest, self.dest))
                tx.execute(
                    f"UPDATE transfers SET state = 'skipped', updated_at = ?, reason = {reason} "
                    "WHERE dest = ? AND state = 'queued' AND key IN "
                    "(SELECT key FROM transfers WHERE dest = ? AND state IN ('quarantined', 'skipped'))",
                    (stamp, self.dest, dest, self.dest))

    def _finish(self) -> MigrationSummary:
        c = counts(self.state, self.dest)
        stop = self.stop_error
        deliveries = {o.store.id: {k: v for k, v in counts(self.state, o.store.id).items() if not k.startswith("_")}
                      for o in self.outlets}
        unfinished = sum(c.get(s, 0) for s in ("queued", "fetching", "inspect", "restoring"))
        pacs_queued = sum(d.get("queued", 0) for d in deliveries.values())
        pacs_bad = sum(d.get("failed", 0) + d.get("conflict", 0) for d in deliveries.values())
        if isinstance(stop, Interrupted):
            status = "interrupted"
        elif stop is not None:
            status = "stopped"
        elif unfinished or pacs_queued:
            status = "stopped"
        else:
            status = "partial" if (c.get("failed") or c.get("missing") or c.get("quarantined")
                                   or pacs_bad) else "complete"
        stamp = now()
        with self.state.transaction() as tx:
            tx.execute("UPDATE migration_runs SET status = ?, finished_at = ?, stop_reason = ?, "
                       "waiting_since = NULL, heartbeat_at = ? WHERE id = ?",
                       (status, stamp if status in ("complete", "partial") else None,
                        str(stop).split("\n")[0] if stop else None, stamp, self.run_id))
            self.state.log("migrate.finished" if status in ("complete", "partial") else f"migrate.{status}",
                           tx, run=self.run_id, status=status,
                           counts={k: v for k, v in c.items() if not k.startswith("_")},
                           **({"deliveries": deliveries} if deliveries else {}))
        run = self.state.query("SELECT * FROM migration_runs WHERE id = ?", (self.run_id,))[0]
        failures = [(r["key"], r["state"], r["reason"] or "") for r in self.state.query(
            "SELECT key, state, reason FROM transfers WHERE dest = ? AND state IN "
            "('failed', 'missing', 'quarantined', 'restoring') ORDER BY seq LIMIT 50", (self.dest,))]
        for o in self.outlets:
            failures += [(r["key"], r["state"], f"{o.store.id}: {r['reason'] or ''}") for r in self.state.query(
                "SELECT key, state, reason FROM transfers WHERE dest = ? AND state IN ('failed', 'conflict') "
                "ORDER BY seq LIMIT 50", (o.store.id,))]
        summary = MigrationSummary(
            run=self.run_id, resumed=self.resume, dest=self.dest,
            total=sum(v for k, v in c.items() if not k.startswith("_")),
            verified=c.get("verified", 0), quarantined=c.get("quarantined", 0),
            duplicates=c.get("duplicate", 0), failed=c.get("failed", 0), missing=c.get("missing", 0),
            skipped=c.get("skipped", 0), unfinished=unfinished,
            bytes_verified=c["_bytes_done"], bytes_downloaded=run["bytes_downloaded"],
            requests={"GET": run["get_requests"], "HEAD": run["head_requests"],
                      "LIST": run["list_requests"], "RESTORE": run["restore_requests"]},
            retries=run["retries"], elapsed=time.monotonic() - self.started,
            fetched_this_run=self.fetched, failures=failures, deliveries=deliveries,
            delivered_this_run=self.delivered_count, backup_error=self.backup_error)
        if stop is not None:
            if isinstance(stop, Interrupted):
                raise Interrupted(
                    f"migration interrupted: {summary.verified + summary.quarantined} of {summary.total} "
                    f"objects done", hint="continue with: cloudexit migrate --resume")
            raise stop
        return summary


def _q(tx: sqlite3.Connection, sql: str, params: Any = ()) -> sqlite3.Cursor:
    cur = tx.cursor()
    cur.row_factory = sqlite3.Row  # type: ignore[assignment]
    return cur.execute(sql, params)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _free_space(store: FilesystemStore) -> str | None:
    from cloudexit.core.units import format_bytes

    try:
        return format_bytes(store.free_bytes())
    except OSError:
        return None


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "?"
