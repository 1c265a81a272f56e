"""Inventory: stream a bucket listing into the state DB and classify every object.

Listing runs in parallel over key ranges planned from the bucket's own common prefixes, and
header reads start while listing goes on. One thread (the caller's) owns all DB writes; the
worker threads only talk to S3 and parse. Every page and every batch of headers is committed
with its resume point in one transaction, so an interrupted run (Ctrl-C, kill -9) continues
where it stopped and never counts a key twice (keys are the primary key).
"""

from __future__ import annotations

import json
import queue
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .config import InventoryConfig
from .dicom import Header, classify, patient_hash
from .errors import CloudexitError, UsageError
from .paths import key_flags
from .source import ListedObject, ObjectChanged, ObjectGone, Source, iso
from .state import State, now

MAX_CHAR = "\U0010ffff"
EXPLORE_DEPTH = 4  # levels of common prefixes explored before switching to range listing
CPS_PER_TASK = 64  # with fewer folders than this at a level, explore each of them further

_UPSERT = """
INSERT INTO objects (key, size, etag, last_modified, storage_class, status, change, change_round,
                     kind, key_flags, first_seen_round, last_seen_round, updated_at,
                     study_uid, series_uid, sop_uid, header_source)
VALUES (?, ?, ?, ?, ?, 'present', 'new', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
    change = CASE
        WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size THEN 'changed'
        WHEN objects.status = 'deleted' THEN 'new'
        WHEN objects.last_seen_round = excluded.last_seen_round THEN objects.change
        ELSE 'unchanged' END,
    change_round = CASE
        WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
             OR objects.status = 'deleted' THEN excluded.change_round
        ELSE objects.change_round END,
    kind = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.kind ELSE objects.kind END,
    study_uid = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.study_uid ELSE objects.study_uid END,
    series_uid = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.series_uid ELSE objects.series_uid END,
    sop_uid = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.sop_uid ELSE objects.sop_uid END,
    header_source = CASE WHEN objects.etag IS NOT excluded.etag OR objects.size != excluded.size
                THEN excluded.header_source ELSE objects.header_source END,
    size = excluded.size, etag = excluded.etag, last_modified = excluded.last_modified,
    storage_class = excluded.storage_class, status = 'present', key_flags = excluded.key_flags,
    last_seen_round = excluded.last_seen_round, updated_at = excluded.updated_at
"""

_HEADER_UPDATE = """
UPDATE objects SET kind = ?, reason = ?, study_uid = ?, series_uid = ?, sop_uid = ?,
    sop_class_uid = ?, modality = ?, study_date = ?, transfer_syntax = ?, patient_hash = ?,
    checksums = ?, header_source = 'header', header_bytes = header_bytes + ?, updated_at = ?
WHERE key = ? AND etag IS ?
"""


@dataclass
class Progress:
    """Counters the CLI turns into a progress bar."""

    listed: int = 0  # keys listed this run
    classified: int = 0  # headers read this run
    pending: int = 0  # objects still waiting for a header read
    failed: int = 0
    listing_done: bool = False


@dataclass
class RoundSummary:
    round: int
    resumed: bool
    new: int
    changed: int
    deleted: int
    unchanged: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) left pending


@dataclass
class _Task:
    id: int
    prefix: str
    start_after: str | None
    end_before: str | None
    explore: bool
    depth: int = 0


@dataclass
class _Page:
    task: _Task
    objects: list[ListedObject]
    prefixes: list[str]
    last_key: str | None
    done: bool


@dataclass
class _HeaderResult:
    key: str
    etag: str
    header: Header | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    requests: int = 0
    gone: bool = False
    changed_to: tuple[str, int, str] | None = None  # new (etag, size, last_modified)
    error: str | None = None


def compile_key_pattern(pattern: str) -> re.Pattern[str]:
    """`{study}/{series}/{sop}.dcm` -> a regex with named groups; `*` matches within a segment."""
    if "{sop}" not in pattern:
        raise UsageError(f"--key-pattern {pattern!r} has no {{sop}}",
                         hint="name at least {sop}; {study} and {series} when the key holds them")
    out = ""
    for token in re.split(r"(\{study\}|\{series\}|\{sop\}|\*\*|\*)", pattern):
        if token in ("{study}", "{series}", "{sop}"):
            out += f"(?P<{token[1:-1]}>[0-9]+(?:\\.[0-9]+)+)"
        elif token == "**":
            out += ".*"
        elif token == "*":
            out += "[^/]*"
        else:
            out += re.escape(token)
    return re.compile(out + "$")


class Inventory:
    """One inventory round over a source, resumable."""

    def __init__(self, state: State, source: Source, config: InventoryConfig | None = None,
                 progress: Callable[[Progress], None] | None = None) -> None:
        self.state = state
        self.source = source
        self.config = config or InventoryConfig()
        self.on_progress = progress or (lambda p: None)
        self.progress = Progress()
        self.salt = state.meta("salt") or ""
        self.pattern = compile_key_pattern(self.config.key_pattern) if self.config.key_pattern else None
        self.round = 0
        self._pages: queue.Queue[_Page | BaseException] = queue.Queue(maxsize=32)
        self._stop = threading.Event()
        self._failed: dict[str, str] = {}
        self._changes: dict[str, int] = {}

    # -- the round ------------------------------------------------------------------------
    def run(self) -> RoundSummary:
        state, source = self.state, self.source
        state.bind_source(source.url, source.config.endpoint_url, source.config.region)
        source.check()
        resumed = self._open_round()
        if self.pattern is None:
            with state.transaction() as tx:
                tx.execute("UPDATE objects SET kind = 'pending' "
                           "WHERE header_source = 'key-pattern' AND status = 'present'")
        lister = ThreadPoolExecutor(self.config.list_workers, thread_name_prefix="list")
        reader = ThreadPoolExecutor(self.config.workers, thread_name_prefix="header")
        try:
            self._loop(lister, reader)
        except BaseException:
            self._stop.set()
            raise
        finally:
            self._stop.set()
            lister.shutdown(wait=True, cancel_futures=True)
            reader.shutdown(wait=True, cancel_futures=True)
        if self.pattern is not None:
            self._stop.clear()
            self._check_pattern_sample()
        return self._finish(resumed)

    def _open_round(self) -> bool:
        row = self.state.query("SELECT id FROM inventory_rounds WHERE status = 'running' "
                               "ORDER BY id DESC LIMIT 1")
        with self.state.transaction() as tx:
            if row:
                self.round = row[0]["id"]
                tx.execute("UPDATE inventory_rounds SET resumed = resumed + 1 WHERE id = ?",
                           (self.round,))
                self.state.log("inventory.resumed", tx, round=self.round)
                return True
            cur = tx.execute("INSERT INTO inventory_rounds(started_at, status, key_pattern) "
                             "VALUES (?, 'running', ?)", (now(), self.config.key_pattern))
            self.round = int(cur.lastrowid or 0)
            tx.execute("INSERT INTO list_tasks(round, prefix, explore) VALUES (?, ?, 1)",
                       (self.round, self.source.prefix))
            self.state.log("inventory.started", tx, round=self.round, source=self.source.url)
        return False

    def _loop(self, lister: ThreadPoolExecutor, reader: ThreadPoolExecutor) -> None:
        open_tasks = 0
        for row in self.state.query("SELECT * FROM list_tasks WHERE round = ? AND done = 0",
                                    (self.round,)):
            task = _Task(row["id"], row["prefix"], row["start_after"], row["end_before"],
                         bool(row["explore"]), depth=row["prefix"].count("/"))
            lister.submit(self._list_task, task, row["last_key"])
            open_tasks += 1
        in_flight: dict[str, Future[_HeaderResult]] = {}
        cursor = ""
        max_in_flight = self.config.workers * 4
        while True:
            # 1. Commit listing pages as they come (blocking briefly when nothing else to do).
            try:
                item = self._pages.get(timeout=0.05 if (in_flight or open_tasks) else 0)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, BaseException):
                    raise item
                open_tasks += self._commit_page(item, lister)
                try:
                    item = self._pages.get_nowait()
                except queue.Empty:
                    item = None
            self.progress.listing_done = open_tasks == 0
            # 2. Collect finished header reads and commit them in batches.
            # Committed before dispatching more, so a finished key is never dispatched twice.
            results = [in_flight.pop(k).result() for k, f in list(in_flight.items()) if f.done()]
            if results:
                self._commit_headers(results)
            # 3. Keep the header readers busy.
            if len(in_flight) < max_in_flight:
                rows = self.state.query(
                    "SELECT key, size, etag FROM objects WHERE kind = 'pending' AND status = 'present'"
                    " AND key > ? ORDER BY key LIMIT ?", (cursor, max_in_flight * 2))
                for row in rows:
                    key = row["key"]
                    cursor = key
                    if key in in_flight or key in self._failed:
                        continue
                    if len(in_flight) >= max_in_flight:
                        break
                    in_flight[key] = reader.submit(self._read_header, key, row["size"], row["etag"])
                if len(rows) < max_in_flight * 2:
                    cursor = ""  # wrap: listing may have added keys behind the cursor
            self.progress.pending = self.state.scalar(
                "SELECT count(*) FROM objects WHERE kind = 'pending' AND status = 'present'") or 0
            self.on_progress(self.progress)
            if open_tasks == 0 and not in_flight:
                if self.progress.pending <= len(self._failed):
                    return

    # -- listing (worker threads) ---------------------------------------------------------
    def _list_task(self, task: _Task, last_key: str | None) -> None:
        try:
            if task.explore:
                self._explore(task, last_key)
            else:
                self._list_range(task, last_key)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread to raise
            self._pages.put(exc)

    def _put(self, page: _Page) -> None:
        while not self._stop.is_set():
            try:
                self._pages.put(page, timeout=0.2)
                return
            except queue.Full:
                continue

    def _list_range(self, task: _Task, last_key: str | None) -> None:
        token = None
        start = last_key or task.start_after
        while not self._stop.is_set():
            page = self.source.list_page(task.prefix, start_after=start, token=token)
            objects = page.objects
            done = not page.truncated
            if task.end_before is not None:
                inside = [o for o in objects if o.key < task.end_before]
                done = done or len(inside) < len(objects)
                objects = inside
            last = objects[-1].key if objects else last_key
            last_key = last
            self._put(_Page(task, objects, [], last, done))
            if done:
                return
            token = page.next_token

    def _explore(self, task: _Task, last_key: str | None) -> None:
        token = None
        while not self._stop.is_set():
            page = self.source.list_page(task.prefix, start_after=last_key, token=token,
                                         delimiter="/")
            # Resume point: past the last key, and past everything under the last folder.
            marks = [o.key for o in page.objects] + [p + MAX_CHAR for p in page.prefixes]
            last = max(marks) if marks else last_key
            self._put(_Page(task, page.objects, page.prefixes, last, done=not page.truncated))
            if not page.truncated:
                return
            last_key, token = last, page.next_token

    def _commit_page(self, page: _Page, lister: ThreadPoolExecutor) -> int:
        """Write one page and its resume point; start the tasks it planned. Returns the change
        in the number of open tasks."""
        task = page.task
        stamp = now()
        rows = []
        for o in page.objects:
            uids = self._uids_from_key(o.key)
            rows.append((o.key, o.size, o.etag, o.last_modified, o.storage_class, self.round,
                         "dicom" if uids else "pending", ",".join(key_flags(o.key)) or None,
                         self.round, self.round, stamp, *(uids or (None, None, None)),
                         "key-pattern" if uids else None))
        new_tasks: list[_Task] = []
        with self.state.transaction() as tx:
            tx.executemany(_UPSERT, rows)
            for spec in self._plan_tasks(page):
                cur = tx.execute(
                    "INSERT INTO list_tasks(round, prefix, start_after, end_before, explore) "
                    "VALUES (?, ?, ?, ?, ?)", (self.round, spec.prefix, spec.start_after,
                                               spec.end_before, int(spec.explore)))
                spec.id = int(cur.lastrowid or 0)
                new_tasks.append(spec)
            tx.execute("UPDATE list_tasks SET last_key = ?, done = ?, pages = pages + 1, "
                       "keys = keys + ? WHERE id = ?",
                       (page.last_key, int(page.done), len(rows), task.id))
            tx.execute("UPDATE inventory_rounds SET list_requests = list_requests + 1 WHERE id = ?",
                       (self.round,))
        self.progress.listed += len(rows)
        for spec in new_tasks:
            lister.submit(self._list_task, spec, None)
        return len(new_tasks) - (1 if page.done else 0)

    def _plan_tasks(self, page: _Page) -> list[_Task]:
        """Turn the folders an explore page found into more listing tasks.

        Every task is bounded by a real prefix, never by a synthetic StartAfter: SeaweedFS (and
        other filer-backed stores) walk folders in name order, which differs from S3's key order
        for a made-up bound such as "X." + U+10FFFF, and skipped whole folders that way.
        """
        task = page.task
        if task.depth + 1 < EXPLORE_DEPTH and page.done and len(page.prefixes) < CPS_PER_TASK:
            return [_Task(0, cp, None, None, True, task.depth + 1) for cp in page.prefixes]
        return [_Task(0, cp, None, None, False) for cp in page.prefixes]

    def _uids_from_key(self, key: str) -> tuple[str | None, str | None, str] | None:
        if self.pattern is None:
            return None
        match = self.pattern.search(key)
        if not match:
            return None
        groups = match.groupdict()
        return groups.get("study"), groups.get("series"), groups["sop"]

    # -- headers (worker threads) ---------------------------------------------------------
    def _read_header(self, key: str, size: int, etag: str) -> _HeaderResult:
        result = _HeaderResult(key, etag)
        if self._stop.is_set():
            result.error = "stopped"
            return result
        if size == 0:
            result.header = classify(b"", 0)
            return result
        length = min(self.config.header_bytes, size)
        try:
            while True:
                read = self.source.read_range(key, 0, length - 1, etag)
                result.requests += 1
                result.bytes_read += len(read.data)
                result.checksums = read.checksums
                header = classify(read.data, read.size)
                if not header.need_more or length >= size or length >= self.config.max_header_bytes:
                    if header.need_more:
                        header.reason = (header.reason or "") + f" (gave up after {length} bytes)"
                    result.header = header
                    return result
                length = min(length * 4, size, self.config.max_header_bytes)
        except ObjectChanged:
            if self._changes.get(key, 0) >= 3:
                result.error = "object keeps changing while being read"
                return result
            self._changes[key] = self._changes.get(key, 0) + 1
            head = self.source.head(key)
            result.requests += 1
            result.changed_to = (head.get("ETag", "").strip('"'), int(head["ContentLength"]),
                                 iso(head["LastModified"]))
        except ObjectGone:
            result.gone = True
        except CloudexitError as exc:
            if type(exc).__name__ in ("CredentialsError", "EndpointUnreachable"):
                raise
            result.error = str(exc)
        return result

    def _commit_headers(self, results: list[_HeaderResult]) -> None:
        stamp = now()
        updates, requests, nbytes = [], 0, 0
        with self.state.transaction() as tx:
            for r in results:
                requests += r.requests
                nbytes += r.bytes_read
                if r.error:
                    if r.error != "stopped":
                        self._failed[r.key] = r.error
                        self.progress.failed = len(self._failed)
                    continue
                if r.gone:
                    tx.execute("UPDATE objects SET status = 'deleted', change = 'deleted', "
                               "change_round = ?, updated_at = ? WHERE key = ?",
                               (self.round, stamp, r.key))
                    continue
                if r.changed_to:
                    etag, size, modified = r.changed_to
                    tx.execute("UPDATE objects SET etag = ?, size = ?, last_modified = ?, "
                               "change = 'changed', change_round = ?, updated_at = ? WHERE key = ?",
                               (etag, size, modified, self.round, stamp, r.key))
                    continue
                h = r.header
                assert h is not None
                updates.append((h.kind, h.reason, h.study_uid, h.series_uid, h.sop_uid,
                                h.sop_class_uid, h.modality, h.study_date, h.transfer_syntax,
                                patient_hash(self.salt, h.patient_id),
                                json.dumps(r.checksums) if r.checksums else None,
                                r.bytes_read, stamp, r.key, r.etag))
            tx.executemany(_HEADER_UPDATE, updates)
            tx.execute("UPDATE inventory_rounds SET get_requests = get_requests + ?, "
                       "header_bytes = header_bytes + ? WHERE id = ?", (requests, nbytes, self.round))
        self.progress.classified += len(updates)

    def _check_pattern_sample(self) -> None:
        """Read the headers of a random sample of pattern-matched objects; all must agree."""
        rows = self.state.query(
            "SELECT key, size, etag, study_uid, series_uid, sop_uid FROM objects "
            "WHERE header_source = 'key-pattern' AND status = 'present' "
            "ORDER BY random() LIMIT ?", (self.config.pattern_sample,))
        for row in rows:
            result = self._read_header(row["key"], row["size"], row["etag"])
            h = result.header
            if h is None:
                continue
            expected = (row["study_uid"], row["series_uid"], row["sop_uid"])
            found = (h.study_uid, h.series_uid, h.sop_uid)
            if h.kind != "dicom" or any(e is not None and e != f for e, f in zip(expected, found)):
                self._commit_headers([result])
                raise UsageError(
                    f"--key-pattern does not match the DICOM header of {row['key']!r}: "
                    f"the key gives {expected}, the header {found if h.kind == 'dicom' else h.reason}",
                    hint="run inventory again without --key-pattern to read every header")
            self._commit_headers([result])

    # -- closing --------------------------------------------------------------------------
    def _finish(self, resumed: bool) -> RoundSummary:
        r = self.round
        with self.state.transaction() as tx:
            # Listing is complete: whatever this round did not see is gone from the bucket.
            tx.execute("UPDATE objects SET status = 'deleted', change = 'deleted', change_round = ?, "
                       "updated_at = ? WHERE status = 'present' AND last_seen_round < ?",
                       (r, now(), r))
            tx.execute("UPDATE inventory_rounds SET status = 'complete', finished_at = ? WHERE id = ?",
                       (now(), r))
            counts = dict(tx.execute(
                "SELECT change, count(*) FROM objects WHERE change_round = ? GROUP BY change",
                (r,)).fetchall())
            unchanged = tx.execute("SELECT count(*) FROM objects WHERE change = 'unchanged' "
                                   "AND last_seen_round = ?", (r,)).fetchone()[0]
            self.state.log("inventory.complete", tx, round=r, new=counts.get("new", 0),
                           changed=counts.get("changed", 0), deleted=counts.get("deleted", 0),
                           unread=len(self._failed))
        return RoundSummary(r, resumed, counts.get("new", 0), counts.get("changed", 0),
                            counts.get("deleted", 0), unchanged, sorted(self._failed.items()))
