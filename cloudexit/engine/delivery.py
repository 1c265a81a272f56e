"""PACS delivery: every verified DICOM object of the archive, sent on to each PACS destination.

`migrate --to DIR --to dicom://AET@HOST:PORT --to dicomweb+https://...`: the archive folder is
filled first; each PACS (an "outlet") gets the archive's file once its row is committed
verified, by C-STORE or STOW-RS on a few threads of its own (stores/). A PACS that stops
answering pauses its outlet, which is probed like a lost link; the rest of the run goes on.
Threads only talk to the PACS; their answers are applied to the DB on the engine's thread.
"""

from __future__ import annotations

import queue
import random
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import UsageError
from cloudexit.core.states import TransferState as T
from cloudexit.state import transfers as sql
from cloudexit.state.db import State, now
from cloudexit.stores import Delivery, Item, StoreError, StoreUnavailable
from cloudexit.stores.filesystem import FilesystemStore


@dataclass
class Outlet:
    """A PACS destination of the run: its store, its delivery threads, its pause."""

    store: Any
    pool: ThreadPoolExecutor
    busy: set[str] = field(default_factory=set)  # keys handed to a thread, not yet committed
    down_since: float | None = None
    next_probe: float = 0.0
    interval: float = 1.0
    probing: bool = False


class Outlets:
    """The PACS destinations of one run. `stop(error)` stops the run (True if it was the first
    reason to); `stopping()` says whether the run is stopping."""

    def __init__(self, state: State, archive: FilesystemStore, config: MigrateConfig,
                 stop: Callable[[BaseException], bool], stopping: Callable[[], bool]) -> None:
        self.state, self.archive, self.config = state, archive, config
        self.dest = archive.id
        self.stop, self.stopping = stop, stopping
        self.run_id = 0
        self.outlets: list[Outlet] = []
        self.answers: queue.Queue[tuple[Outlet, str | None, Any]] = queue.Queue()
        self.done: list[tuple[Outlet, str, Any]] = []  # finished deliveries, for the next commit
        self.delivered = 0  # this run
        self.next_work = 0.0
        self.rows_final = False

    def __bool__(self) -> bool:
        return bool(self.outlets)

    @property
    def ids(self) -> list[str]:
        return [o.store.id for o in self.outlets]

    @property
    def busy(self) -> bool:
        return any(o.busy for o in self.outlets)

    def open(self, stores: list[Any]) -> None:
        if not stores:
            return
        contexts = [(r[0], r[1]) for r in self.state.query(
            "SELECT DISTINCT sop_class_uid, transfer_syntax FROM objects WHERE kind = 'dicom' "
            "AND status = 'present' AND sop_class_uid IS NOT NULL AND transfer_syntax IS NOT NULL")]
        duplicates = [r[0] for r in self.state.query(
            "SELECT sop_uid FROM objects WHERE kind = 'dicom' AND status = 'present' AND sop_uid IS NOT NULL "
            "GROUP BY sop_uid HAVING count(*) > 1")]
        seen = {self.dest}
        for store in stores:
            if store.id in seen:
                raise UsageError(f"--to {store.url} is given twice")
            seen.add(store.id)
            if hasattr(store, "expect"):
                store.expect(contexts=contexts, duplicates=duplicates)
            outlet = Outlet(store, ThreadPoolExecutor(max(1, int(store.parallel)),
                                                      thread_name_prefix=f"cloudexit-{store.kind}"))
            self.outlets.append(outlet)
            try:
                store.check()
            except StoreUnavailable:
                outlet.down_since = time.time()  # start paused; probed like a lost link
                outlet.next_probe = time.monotonic() + outlet.interval

    def close(self) -> None:
        for outlet in self.outlets:
            outlet.pool.shutdown(wait=False, cancel_futures=True)
            try:
                outlet.store.close()
            except Exception:  # noqa: BLE001
                pass

    def end(self, wait: bool) -> None:
        """Deliveries in progress end (queued ones are cancelled); their answers are applied."""
        for outlet in self.outlets:
            outlet.pool.shutdown(wait=wait, cancel_futures=True)
        self.drain()

    # -- rows ----------------------------------------------------------------------------------------
    def _add_rows(self, tx: sqlite3.Connection) -> int:
        """A row per PACS destination for every DICOM object the archive will hold."""
        stamp = now()
        return sum(sql.add_pacs_rows(tx, self.dest, o.store.id, stamp) for o in self.outlets)

    def sync(self) -> None:
        if not self.outlets:
            return
        stamp = now()
        with self.state.transaction() as tx:
            for o in self.outlets:
                sql.requeue_pacs(tx, o.store.id, stamp)
                if o.down_since is not None:
                    self.state.log("migrate.pacs_down", tx, run=self.run_id, dest=o.store.id, detail="at start")
            self._add_rows(tx)

    def settle(self) -> None:
        """PACS rows the archive cannot feed: identical duplicates (delivered once, under the
        other key), objects gone at the source, objects quarantined in the archive."""
        if not self.outlets or self.stopping():
            return
        stamp = now()
        with self.state.transaction() as tx:
            for o in self.outlets:
                sql.settle_pacs(tx, self.dest, o.store.id, stamp)

    def pending(self) -> bool:
        """Whether the loop must go on for the PACS destinations (a paused one included)."""
        if not self.outlets:
            return False
        if self.done or self.busy:
            return True
        if not self.rows_final:  # the archive work is done: every object's kind is known
            self.rows_final = True
            with self.state.transaction() as tx:
                if self._add_rows(tx):  # objects whose header read made them DICOM
                    return True
        return any(sql.deliverable(self.state, self.dest, o.store.id, 1) for o in self.outlets)

    # -- the work ----------------------------------------------------------------------------------
    def work(self) -> None:
        clock = time.monotonic()
        if clock < self.next_work:
            return
        self.next_work = clock + 0.05
        for o in self.outlets:
            if o.down_since is not None:
                if not o.probing and clock >= o.next_probe:
                    o.probing = True
                    o.pool.submit(self._probe, o)
                continue
            room = 2 * max(1, int(o.store.parallel)) - len(o.busy)
            if room <= 0 or self.stopping():
                continue
            for r in sql.deliverable(self.state, self.dest, o.store.id, room + len(o.busy)):
                if room <= 0:
                    break
                if r["key"] in o.busy:
                    continue
                room -= 1
                o.busy.add(r["key"])
                item = Item(key=r["key"], size=r["size"], sha256=r["sha256"], kind=r["kind"],
                            sop_uid=r["sop_uid"], sop_class_uid=r["sop_class_uid"], study_uid=r["study_uid"],
                            series_uid=r["series_uid"], transfer_syntax=r["transfer_syntax"])
                o.pool.submit(self._deliver_one, o, item, str(self.archive.absolute(r["path"])))

    def _deliver_one(self, o: Outlet, item: Item, staged: str) -> None:
        try:
            answer: Any = o.store.deliver(item, staged)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            answer = exc
        self.answers.put((o, item.key, answer))

    def _probe(self, o: Outlet) -> None:
        try:
            o.store.check()
            answer: Any = True
        except StoreUnavailable:
            answer = False
        except BaseException as exc:  # noqa: BLE001
            answer = exc
        self.answers.put((o, None, answer))

    def drain(self) -> None:
        """Apply what the threads answered (on the engine's thread)."""
        while True:
            try:
                o, key, answer = self.answers.get_nowait()
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
                else:
                    self.stop(answer)
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
                if self.stop(answer):
                    self.state.log("migrate.stopped", run=self.run_id, reason="pacs", dest=dest,
                                   detail=str(answer).split("\n")[0])
                continue
            if isinstance(answer, BaseException):
                answer = Delivery(T.FAILED, code="error", detail=f"{type(answer).__name__}: {answer}")
            self.done.append((o, key, answer))

    def commit(self, tx: sqlite3.Connection, stamp: str) -> None:
        """Record the finished deliveries (in the engine's commit)."""
        rows = []
        for o, key, d in self.done:
            reason = None
            if d.status != T.STORED:
                reason = f"{d.code}: {d.detail}" if d.code and d.detail else (d.code or d.detail)
            rows.append((d.status, reason, stamp, stamp, self.run_id, key, o.store.id))
            if d.status in (T.CONFLICT, T.FAILED):
                self.state.log(f"migrate.delivery_{d.status}", tx, key=key, dest=o.store.id, code=d.code,
                               detail=d.detail, **{k: v for k, v in d.extra.items() if isinstance(v, str)})
            o.busy.discard(key)
        sql.record_deliveries(tx, rows)
        self.delivered += len(rows)
        self.done = []

    def counts(self) -> dict[str, dict[str, int]]:
        return {o.store.id: {k: v for k, v in sql.counts(self.state, o.store.id).items() if not k.startswith("_")}
                for o in self.outlets}

    def failures(self) -> list[tuple[str, str, str]]:
        return [(r["key"], r["state"], f"{o.store.id}: {r['reason'] or ''}") for o in self.outlets
                for r in sql.failures(self.state, o.store.id, (T.FAILED, T.CONFLICT))]
