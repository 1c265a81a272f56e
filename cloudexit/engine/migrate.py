"""Migrate: move every inventoried object home, verified, resumable after anything.

The engine (this module, in the caller's process) owns the state DB and plans the work; an
executor (engine/executor.py; by default worker processes, engine/local.py and transfer/) does
the I/O: GET with If-Match, hash while streaming, verify, fsync, rename. The engine never lets
an object count as done before its file is durable:

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

This module is the loop that wires the parts: policy.py (what a result means), worklist.py
(paths, the queue), restores.py, delivery.py (PACS), linkmonitor.py, runs.py; the SQL is in
state/transfers.py. See docs/architecture.md.
"""


from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import CloudexitError, CredentialsError, Interrupted, StateError
from cloudexit.core.states import TransferState as T
from cloudexit.engine.delivery import Outlets
from cloudexit.engine.executor import Executor
from cloudexit.engine.flights import Flight, Flights, flight_for
from cloudexit.engine.linkmonitor import LinkMonitor, resolve_endpoint
from cloudexit.transfer.messages import Message, RangeDone, WorkerLost, results_of
from cloudexit.engine.policy import Action, Context, Do, decide
from cloudexit.engine.progress import MigrateProgress, MigrationSummary
from cloudexit.engine.restores import Restores, back_to_restore, restore_tier, restore_tier_note
from cloudexit.engine.runs import (RunLock, check_new_archive, check_preconditions, claim_archive,
                                   config_from_run, counts, end_run, is_live, last_run, open_run, runs,
                                   set_live_bwlimit)
from cloudexit.engine.worklist import Worklist
from cloudexit.s3.parts import record_sizes
from cloudexit.s3.source import Source
from cloudexit.state import transfers as sql
from cloudexit.state.db import State, now
from cloudexit.state.linkseries import LinkRecorder
from cloudexit.s3.meter import MeterBook
from cloudexit.stores import StoreError
from cloudexit.stores.filesystem import FilesystemStore
from cloudexit.s3.client import Counters
from cloudexit.transfer.tasks import Result

# What callers import from here (the CLI, playbook, status, audit).
__all__ = ["MigrateProgress", "Migration", "MigrationSummary", "check_new_archive",
           "config_from_run", "counts", "is_live", "last_run", "restore_tier", "restore_tier_note", "runs",
           "set_live_bwlimit"]


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
        self.retries = 0
        self.fetched = 0
        self.flights = Flights()
        self.reported: list[Result] = []  # results back from the workers, not committed yet
        self.done_rows: list[tuple[Any, ...]] = []  # finished objects, written at the next commit
        self.verified_delta = [0, 0, 0]  # bytes, objects, bytes resumed since the last commit
        self.cursor = 0
        self.stop_error: BaseException | None = None
        self.started = time.monotonic()
        self.deliver_to = list(deliver_to or [])
        self.executor: Executor = executor or LocalProcessExecutor()
        self.executor_started = self.workers_joined = False
        self.next_backup = time.monotonic() + self.config.backup_minutes * 60
        self.backup_error: str | None = None
        self.lock = RunLock(state)
        self.evidence = LinkRecorder("migrate")  # link evidence (state/linkseries.py)
        self.worklist = Worklist(state, store, self.config)
        self.link = LinkMonitor(state, self.config, self.progress, self._set_rate, self.evidence)
        self.restores = Restores(state, source, self.config, self.dest, self.progress, self.worklist,
                                 self._stop)
        self.outlets = Outlets(state, store, self.config, self._stop, lambda: self.stop_error is not None)

    # -- public ------------------------------------------------------------------------------------
    def run(self) -> MigrationSummary:
        check_preconditions(self.state, self.config)
        self.link.use_timetable(self.config.bwlimit)  # a bad timetable is refused before anything starts
        self.lock.take()
        try:
            self.store.check()
            claim_archive(self.state, self.store, self.config.join_archive)
            self.outlets.open(self.deliver_to)
            # The workers start up (a second or so) while we resolve and plan.
            self.executor.start(self.config, str(self.store.root), self.meters.new_path)
            self.executor_started = True
            self.endpoint, self.credentials = resolve_endpoint(self.source, self.config, self.counters)
            self.executor.connect(self.endpoint, self.credentials)
            self.run_id, timetable = open_run(self.state, self.config, self.dest, self.resume, self.outlets.ids,
                                              self.link.schedule_text)
            self.link.run_id = self.outlets.run_id = self.evidence.run_id = self.run_id
            self.link.use_timetable(timetable)
            self.meters.settle(self.state, self.run_id)  # what runs killed before counted
            self.worklist.sync(self.run_id)
            self.outlets.sync()
            self._run_workers()
            if self.stop_error is None:
                self.worklist.resolve_conflicts()
            self.outlets.settle()
            return self._finish()
        finally:
            if self.executor_started and not self.workers_joined:  # failed before the work began
                self._stop_workers()
                self.meters.drop_unused()
            self.outlets.close()
            self.lock.release()

    def request_stop(self, reason: str) -> None:
        """End the run early, as Ctrl-C does (what is in flight is left queued); `run` then
        raises Interrupted. Called from the progress callback, on the engine's thread."""
        if self.stop_error is None:
            self.stop_error = Interrupted(reason)

    def _stop(self, error: BaseException) -> bool:
        """Stop the run for `error`, unless it is stopping already (then False)."""
        if self.stop_error is not None:
            return False
        self.stop_error = error
        return True

    def _set_rate(self, rate: float | None) -> None:
        self.executor.set_rate(rate)

    # -- the work ----------------------------------------------------------------------------------
    def _run_workers(self) -> None:
        self.restores.start()
        self.link.open(self.endpoint, self.credentials)
        self.link.apply_rate(force=True)
        self.progress.load(counts(self.state, self.dest))
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

    def _loop(self) -> None:
        pending = self.reported
        ranges: list[tuple[str, str, int, int]] = []
        last_commit = last_tick = 0.0
        exhausted_at = 0.0
        while True:
            # 1. What the workers finished.
            block = 0.05 if (self.flights or self.link.is_down or self.outlets.busy) else 0.0
            for message in self.executor.poll(block):
                self._receive(message, pending, ranges)
            self.restores.drain()
            self.outlets.drain()
            clock = time.monotonic()
            if pending or ranges or self.outlets.done or clock - last_commit > 1.0:
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
                self.link.apply_rate()
                self.restores.work()
                self.on_progress(self.progress)
            # 2. PACS deliveries of what the archive has verified (and committed).
            if self.outlets:
                self.outlets.work()
            # 3. The link.
            if self.link.is_down:
                if clock >= self.link.next_probe:
                    if self.link.probe(self.counters):
                        self.flights.retry_all_now()
                else:
                    time.sleep(min(0.2, max(0.0, self.link.next_probe - clock)))
                continue
            # 4. More work for the workers.
            dispatched = self._dispatch()
            if not self.flights and not dispatched and not pending:
                if self.flights.retries:
                    time.sleep(min(0.2, self.flights.seconds_to_next()))
                    continue
                if self._has_work(T.QUEUED):
                    continue
                if self.restores.busy or self._has_work(T.INSPECT):
                    time.sleep(0.05)
                    continue
                if self._has_work(T.RESTORING):
                    if not exhausted_at:
                        exhausted_at = clock
                    time.sleep(0.2)
                    continue
                if self.outlets.pending():
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
                self.flights.retry(flight, delay=0.0)

    def _check_workers(self) -> None:
        """An executor that cannot go on (a worker process killed, out of memory, with tasks
        in flight that nobody will finish): stop cleanly instead; --resume queues them again."""
        problem = self.executor.health()
        if problem and self.stop_error is None:
            self.stop_error = problem if isinstance(problem, StateError) else StateError(
                problem, hint="check memory and the system log; then: cloudexit migrate --resume")

    def _has_work(self, state_name: str) -> bool:
        return sql.has_state(self.state, self.dest, state_name)

    def _dispatch(self) -> int:
        # Up to 8 tasks per thread at the workers (so they never wait for a busy engine), handed
        # out in batches of at least two per thread (one DB transaction each batch). Results that
        # came back and wait for the next commit no longer hold a place: counting them throttled
        # small objects to (tasks per thread) / (the commit cadence).
        capacity = self.executor.capacity
        room = capacity * 8 - (len(self.flights) - len(self.reported))
        if room <= 0 or self.stop_error is not None:
            return 0
        if room < 2 * capacity and self.flights and not self.flights.retries:
            return 0
        picked = self.flights.due(room)
        fresh: list[sqlite3.Row] = []
        if len(picked) < room:
            fresh = sql.queued_after(self.state, self.dest, self.cursor, min(room - len(picked), 512))
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
                sql.mark_fetching(tx, self.dest, self.run_id, fresh[0]["seq"], fresh[-1]["seq"], stamp)
                for r in fresh:
                    if r["size"] >= self.config.large_object and not r["range_size"]:
                        sql.set_range_size(tx, r["key"], self.dest, self.config.range_size)
                        large_rows.append(r["key"])
            for r in fresh:
                done = sql.done_ranges(self.state, r["key"], self.dest, r["etag"]) \
                    if r["size"] >= self.config.large_object else {}
                picked.append(flight_for(r, self.flights.new_id(), self.store, self.config, self.credentials,
                                         self.config.range_size if r["key"] in large_rows else r["range_size"], done))
        for flight in picked:
            flight.task.credentials = self.credentials
            self.flights[flight.task.id] = flight
        if picked:
            self.executor.submit([flight.task for flight in picked])
        self.progress.in_flight = len(self.flights)
        return len(picked)

    # -- results -----------------------------------------------------------------------------------
    def _commit(self, results: list[Result], ranges: list[tuple[str, str, int, int]]) -> None:
        stamp = now()
        with self.state.transaction() as tx:
            if ranges:  # before the results: a verified object's ranges are deleted
                sql.record_ranges(tx, self.dest, ranges)
            for result in results:
                self._apply(tx, result, stamp)
            if self.done_rows:
                sql.record_done(tx, self.done_rows)
                self.done_rows = []
            if self.outlets.done:
                self.outlets.commit(tx, stamp)
            grew = self.meters.collect(tx, self.run_id)
            c = self.counters
            background, restore_requests = self.restores.take_counts()
            c.add(background)
            # link evidence (state/linkseries.py): this commit's traffic, connections, limit
            self.evidence.traffic(c.bytes + grew[0], c.get + grew[1], c.head + grew[2], c.list + grew[3])
            rate = self.progress.rate_limit
            self.evidence.busy(min(len(self.flights), self.executor.capacity), int(rate) if rate else None)
            self.evidence.flush(tx)
            sql.add_run_figures(tx, self.run_id, stamp, c.get, c.head, c.list, restore_requests, c.bytes,
                                self.retries, *self.verified_delta)
            self.verified_delta = [0, 0, 0]
            self.progress.bytes_downloaded += c.bytes + grew[0]
            self.counters = Counters()
            self.retries = 0

    def _context(self, tx: sqlite3.Connection, r: Result, flight: Flight) -> Context:
        """What the policy needs to know about `r` (asking the source or the DB only where the
        fault kind needs it)."""
        renewed = changes = 0
        if r.outcome == "failed" and r.error_kind == "credentials":
            fresh = None
            try:
                fresh = self.source.frozen_credentials()
            except CloudexitError:
                pass
            if fresh is not None and fresh != self.credentials:
                self.renewed: Any = fresh
                renewed = 1
        elif r.outcome == "failed" and r.error_kind == "changed" and r.changed_to and not r.changed_to.get("gone"):
            changes = sql.changes(tx, flight.key, self.dest)
        return Context(attempts=self.config.attempts, capacity=self.executor.capacity, strikes=flight.strikes,
                       streak=self.link.streak, since_answer=self.link.since_answer(), changes=changes,
                       renewed_credentials=bool(renewed))

    def _apply(self, tx: sqlite3.Connection, r: Result, stamp: str) -> None:
        """Carry out what the policy decides for result `r` (policy.py)."""
        flight = self.flights.pop(r.id, None)  # its requests and bytes came by the meters
        self.evidence.result(r)  # link evidence: TTFB, errors by kind
        self.retries += r.retries
        if flight is None:
            return
        key, dest = flight.key, self.dest
        if r.worker:  # a cluster executor names the machine that ran it (cloudexit/cluster)
            sql.record_worker(tx, key, dest, r.worker)
        if r.part_sizes:
            flight.task.part_sizes = r.part_sizes  # for a retry in this run, and the next runs
            sql.record_part_sizes(tx, key, dest, record_sizes(flight.etag, r.part_sizes))
        action = decide(r, self._context(tx, r, flight))
        if action.answered:
            self.link.answered()
        else:
            self.link.streak = action.streak
        flight.strikes += action.strike
        do = action.do
        if do is Do.DONE:
            self._landed(tx, r, flight, action, stamp)
        elif do is Do.REQUEUE:
            sql.set_state(tx, key, dest, T.QUEUED, stamp)
        elif do is Do.FAIL:
            self._fail(tx, flight, action.state or T.FAILED, action.reason or "failed", stamp)
        elif do is Do.RETRY:
            if action.link_down:
                self.link.down(tx, r.detail, why=action.why)
            if action.renew:
                self.credentials = self.renewed
            self.retries += action.retry_counted
            self.flights.retry(flight, delay=action.delay)
        elif do is Do.STOP:
            sql.set_state(tx, key, dest, T.QUEUED, stamp)
            self._stopped(tx, action)
        elif do is Do.RESTORE:
            back_to_restore(tx, key, dest, stamp)
            self.progress.restoring += 1
        elif do is Do.CHANGED:
            new = action.new or {}
            # The provider's checksums were the old version's: a new one's come with its header read.
            tx.execute("UPDATE objects SET etag = ?, size = ?, last_modified = ?, change = 'changed', "
                       "kind = 'pending', checksums = NULL, updated_at = ? WHERE key = ?",
                       (new["etag"], new["size"], new.get("last_modified"), stamp, key))
            sql.new_version(tx, key, dest, new["etag"], new["size"], stamp)
            self.progress.bytes_total += new["size"] - flight.size
            self.state.log("migrate.changed", tx, key=key, old_etag=flight.etag, new_etag=new["etag"],
                           detail="changed at the source during the migration (HTTP 412)")

    def _landed(self, tx: sqlite3.Connection, r: Result, flight: Flight, action: Action, stamp: str) -> None:
        """A verified (or quarantined) file in place: recorded at this commit."""
        key = flight.key
        landed = r.path or flight.task.final
        root = str(self.store.root) + os.sep
        relative = landed[len(root):] if landed.startswith(root) else os.path.relpath(landed, self.store.root)
        reason = action.reason
        if action.conflict:
            reason = self._archive_conflict(tx, key, r, relative, stamp)
        elif action.state == T.QUARANTINED and reason is None:
            reason = tx.execute("SELECT reason FROM objects WHERE key = ?", (key,)).fetchone()[0]
        self.done_rows.append(
            (action.state, relative, r.sha256, r.md5, ",".join(r.checks),
             "; ".join(r.not_checked) or None, reason, stamp, stamp, self.run_id, r.mtime_ns,
             self.store.fold(relative), key, self.dest))
        if r.decoded:  # the file is the decoded instance: record the raw object beside it
            sql.record_decoded(tx, key, self.dest, r.decoded["encoding"], r.decoded["raw_sha256"],
                               r.decoded["size"])
        if flight.task.large:
            sql.drop_ranges(tx, key, self.dest)
        self.verified_delta[0] += flight.size
        self.verified_delta[1] += 1
        self.verified_delta[2] += r.resumed_from
        if action.state == T.QUARANTINED:
            self.progress.quarantined += 1
            self.state.log("migrate.quarantined", tx, key=key, path=relative, reason=reason)
        if r.replaced:
            self.state.log("migrate.replaced", tx, key=key, path=relative)
        if not r.local:
            self.fetched += 1
        self.progress.done += 1
        self.progress.bytes_done += flight.size
        self.progress.study = relative.split("/", 1)[0]

    def _stopped(self, tx: sqlite3.Connection, action: Action) -> None:
        """The policy stops the run: credentials refused, or the archive cannot take more."""
        if action.stop == "credentials":
            self.state.log("migrate.stopped", tx, run=self.run_id, reason="credentials", detail=action.reason)
            self.stop_error = CredentialsError(
                f"the endpoint refused the credentials: {action.reason}",
                hint="renew or fix the credentials (env, --profile), then: cloudexit migrate --resume")
            return
        if self.stop_error is not None:
            return
        self.state.log("migrate.stopped", tx, run=self.run_id, reason="destination", detail=action.reason)
        if action.stop == "read-only":
            self.stop_error = StoreError(
                f"the archive at {self.store.root} is not writable: {action.reason}",
                hint="make that folder writable (its permissions, or a read-only mount), "
                     "then: cloudexit migrate --resume")
        else:
            free = _free_space(self.store)
            self.stop_error = StoreError(
                f"the archive at {self.store.root} cannot take more: {action.reason}"
                + (f" ({free} free)" if free else ""),
                hint="free space or fix the folder's permissions, then: cloudexit migrate --resume")

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

    def _fail(self, tx: sqlite3.Connection, flight: Flight, state_name: str, reason: str, stamp: str) -> None:
        sql.set_state(tx, flight.key, self.dest, state_name, stamp, reason)
        self.progress.failed += 1
        self.state.log(f"migrate.{state_name}", tx, key=flight.key, reason=reason)

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
        self.outlets.end(wait)  # deliveries in progress end (queued ones are cancelled)
        self._commit(pending, ranges)
        stamp = now()
        with self.state.transaction() as tx:
            sql.requeue_fetching(tx, self.dest, self.flights.keys_unfinished(), stamp)
            self.flights.clear()
        self._stop_workers()
        self.meters.close(self.state, self.run_id)
        self.restores.shutdown()
        self.link.close()

    def _stop_workers(self) -> None:
        self.executor.stop()
        self.workers_joined = True

    def _finish(self) -> MigrationSummary:
        stop = self.stop_error
        deliveries = self.outlets.counts()
        c, unfinished = end_run(self.state, self.run_id, self.dest, stop, deliveries)
        run = sql.run_row(self.state, self.run_id)
        failures = [(r["key"], r["state"], r["reason"] or "") for r in sql.failures(
            self.state, self.dest, (T.FAILED, T.MISSING, T.QUARANTINED, T.RESTORING))]
        failures += self.outlets.failures()
        summary = MigrationSummary(
            run=self.run_id, resumed=self.resume, dest=self.dest,
            total=sum(v for k, v in c.items() if not k.startswith("_")),
            verified=c.get(T.VERIFIED, 0), quarantined=c.get(T.QUARANTINED, 0),
            duplicates=c.get(T.DUPLICATE, 0), failed=c.get(T.FAILED, 0), missing=c.get(T.MISSING, 0),
            skipped=c.get(T.SKIPPED, 0), unfinished=unfinished,
            bytes_verified=c["_bytes_done"], bytes_downloaded=run["bytes_downloaded"],
            requests={"GET": run["get_requests"], "HEAD": run["head_requests"],
                      "LIST": run["list_requests"], "RESTORE": run["restore_requests"]},
            retries=run["retries"], elapsed=time.monotonic() - self.started,
            fetched_this_run=self.fetched, failures=failures, deliveries=deliveries,
            delivered_this_run=self.outlets.delivered, backup_error=self.backup_error)
        if stop is not None:
            if isinstance(stop, Interrupted):
                raise Interrupted(
                    f"migration interrupted: {summary.verified + summary.quarantined} of {summary.total} "
                    f"objects done", hint="continue with: cloudexit migrate --resume")
            raise stop
        return summary


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _free_space(store: FilesystemStore) -> str | None:
    from cloudexit.core.units import format_bytes

    try:
        return format_bytes(store.free_bytes())
    except OSError:
        return None

