"""Inventory: stream a bucket listing into the state DB and classify every object.

Listing runs in parallel over groups of folders planned from the bucket's own common prefixes
(cloudexit/s3/listing.py), and header reads start while listing goes on. One thread (the
caller's) owns all DB writes; the worker threads only talk to S3 and parse. Every page (the
pages queued, together) and every batch of headers is committed with its resume point in one
transaction (the rows: cloudexit/state/listed.py), so an interrupted run (Ctrl-C, kill -9) continues
where it stopped and never counts a key twice (keys are the primary key). The listing plan lives
in the `list_tasks` table and is fed to the workers a few tasks at a time, so memory does not
grow with the number of folders. Header reads (transfer/headers.py) run on this process's
threads, or with `--cluster` on dask workers (cluster/headers.py); their results are committed
here either way.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloudexit.core.config import InventoryConfig
from cloudexit.dicom.header import patient_hash
from cloudexit.core.errors import UsageError
from cloudexit.s3.listing import Listing, ListingPage, ListingTask
from cloudexit.s3.source import Source
from cloudexit.state import listed, members
from cloudexit.state.db import State, now
from cloudexit.state.linkseries import LinkRecorder
from cloudexit.transfer.headers import HeaderReader, HeaderResult, Item, LocalReads, Reads

if TYPE_CHECKING:
    from cloudexit.cluster.headers import ClusterHeaders
    from cloudexit.s3.lean import LeanS3

# Listing pages committed in one transaction, when that many are queued: fewer commits write
# the B-tree pages they share (the table's last leaf, the key index's leaves) fewer times; a
# resumed round still continues each task after its last committed page.
PAGES_PER_COMMIT = 8

_HEADER_UPDATE = """
UPDATE objects SET kind = ?, reason = ?, study_uid = ?, series_uid = ?, sop_uid = ?,
    sop_class_uid = ?, modality = ?, study_date = ?, transfer_syntax = ?, patient_hash = ?,
    checksums = ?, header_source = 'header', header_bytes = header_bytes + ?, updated_at = ?,
    encoding = ?, plain_size = ?, pacs_metadata = ?
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
    since: str | None = None  # folders dated wholly before this day were not listed
    skipped_folders: int = 0
    not_listed: int = 0  # objects in those folders, kept as they were
    backup_error: str | None = None  # why the end-of-round backup of the state DB failed
    # Left pending too, but no retry of the inventory reads them: in an archive storage class
    # (migrate restores them, then reads their headers), or encrypted with a customer key (SSE-C).
    archived: dict[str, int] = field(default_factory=dict)  # storage class: objects
    customer_key: int = 0
    customer_key_sample: list[str] = field(default_factory=list)  # the first 10 keys


def compile_key_pattern(pattern: str) -> re.Pattern[str]:
    """`{study}/{series}/{sop}.dcm` -> a regex with named groups; `*` matches within a segment."""
    if "{sop}" not in pattern:
        raise UsageError(f"--key-pattern {pattern!r} has no {{sop}}",
                         hint="name at least {sop}; {study} and {series} when the key holds them")
    for name in ("{study}", "{series}", "{sop}"):
        if pattern.count(name) > 1:  # one named group each (re.compile would raise)
            raise UsageError(f"--key-pattern {pattern!r} names {name} twice",
                             hint="name each of {study}, {series}, {sop} once; `*` matches the rest")
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


def resolve_since(state: State, text: str | None) -> dt.date | None:
    """`--since YYYY-MM-DD` or `--since last` as a day (None: list everything).

    `last` is the day before the last complete round started: a day of margin for folders
    dated in local time, and for objects written into a day's folder after that round listed it.
    """
    if text is None:
        return None
    if text == "last":
        started = state.scalar("SELECT started_at FROM inventory_rounds WHERE status = 'complete' "
                               "ORDER BY id DESC LIMIT 1")
        if started is None:
            return None  # no complete round yet: a full listing
        return dt.date.fromisoformat(started[:10]) - dt.timedelta(days=1)
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r} is not a date",
                         hint="write --since YYYY-MM-DD, or --since last") from None


class Inventory(Listing):
    """One inventory round over a source, resumable."""

    def __init__(self, state: State, source: Source, config: InventoryConfig | None = None,
                 progress: Callable[[Progress], None] | None = None,
                 since: dt.date | None = None, cluster: ClusterHeaders | None = None) -> None:
        """`cluster`: header reads on dask workers (`inventory --cluster`), else threads here."""
        self.state = state
        self.cluster = cluster
        self.source = source
        self.config = config or InventoryConfig()
        self.on_progress = progress or (lambda p: None)
        self.progress = Progress()
        self.patient_key = state.patient_key().key  # None: patients recorded unmatched
        self.pattern = compile_key_pattern(self.config.key_pattern) if self.config.key_pattern else None
        self.since = since
        self.round = 0
        # Pages waiting for the writer: each holds up to 1000 keys (~0.5 MB), and the writer is
        # usually the slower side, so a short queue keeps memory down without idling it.
        self._pages: queue.Queue[ListingPage | BaseException] = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        # Wakes the writer: a listing page is queued, or a batch of header reads finished.
        self._wake = threading.Event()
        self._failed: dict[str, str] = {}  # key: why its header could not be read this round
        self._unreadable: dict[str, str] = {}  # of those, the ones no retry reads, and why
        self._changes: dict[str, int] = {}
        self._lean: LeanS3 | None = None
        self._headers: HeaderReader | None = None
        self.link = LinkRecorder("inventory")  # link evidence (state/linkseries.py)

    # -- the round ------------------------------------------------------------------------
    def run(self) -> RoundSummary:
        from cloudexit.s3.lean import LeanS3

        state, source = self.state, self.source
        state.bind_source(source.url, source.config.endpoint_url, source.config.region)
        self._lean = LeanS3(source)
        try:
            self._lean.check()  # as source.check(), without creating a boto3 client (start-up)
        except BaseException:
            self._lean.close()
            raise
        self._headers = HeaderReader(self._lean, self.config.header_bytes, self.config.max_header_bytes,
                                     self._stop)
        reads: Reads = self.cluster if self.cluster is not None else LocalReads(
            self._read_header, self.config.workers, self._wake.set)
        lister = ThreadPoolExecutor(self.config.list_workers, thread_name_prefix="list")
        try:
            if self.cluster is not None:  # workers refused stop the run before a round is opened
                self.cluster.start(self.source, self.config, self._lean.reader.endpoint, self._wake.set)
            resumed = self._open_round()
            self._note_missing_key()
            if self.pattern is None:
                with state.transaction() as tx:
                    tx.execute("UPDATE objects SET kind = 'pending' "
                               "WHERE header_source = 'key-pattern' AND status = 'present'")
            with state.transaction() as tx:
                members.read_again(tx)  # zips found after a restore (cloudexit/state/members.py)
            # pydicom is not imported here: the struct walk reads clean headers, and the threads
            # that fall back to pydicom import it under `dicom.header.preload`'s lock (start-up).
            self._loop(lister, reads)
        finally:
            self._stop.set()
            lister.shutdown(wait=True, cancel_futures=True)
            reads.close()
            self._lean.close()
        if self.pattern is not None:
            self._stop.clear()
            self._check_pattern_sample()
        summary = self._finish(resumed)
        summary.backup_error = state.backup()  # a copy to restore if the DB is ever damaged
        return summary

    def _open_round(self) -> bool:
        row = self.state.query("SELECT id, since FROM inventory_rounds WHERE status = 'running' "
                               "ORDER BY id DESC LIMIT 1")
        with self.state.transaction() as tx:
            if row:
                # A resumed round keeps the --since it started with: its plan was made with it.
                self.round = row[0]["id"]
                self.since = dt.date.fromisoformat(row[0]["since"]) if row[0]["since"] else None
                tx.execute("UPDATE inventory_rounds SET resumed = resumed + 1 WHERE id = ?",
                           (self.round,))
                self.state.log("inventory.resumed", tx, round=self.round)
                return True
            since = self.since.isoformat() if self.since else None
            listed.defer_indexes(tx)  # a first listing: study and SOP indexes built at its end
            cur = tx.execute("INSERT INTO inventory_rounds(started_at, status, key_pattern, since) "
                             "VALUES (?, 'running', ?, ?)", (now(), self.config.key_pattern, since))
            self.round = int(cur.lastrowid or 0)
            tx.execute("INSERT INTO list_tasks(round, prefix, explore) VALUES (?, ?, 1)",
                       (self.round, self.source.prefix))
            self.state.log("inventory.started", tx, round=self.round, source=self.source.url,
                           since=since)
        return False

    def _note_missing_key(self) -> None:
        """Say in the event log (the audit's record) that this round cannot match patients."""
        problem = self.state.patient_key().problem
        if problem is not None:
            self.state.log("patient_key.missing", round=self.round, problem=problem)

    def _loop(self, lister: ThreadPoolExecutor, reads: Reads) -> None:
        # Counters kept here instead of counting rows on every turn: open listing tasks (all,
        # and those handed to a worker), and objects waiting for a header read (an estimate for
        # the progress bar; counted exactly once listing and reads are done).
        open_tasks = self.state.scalar("SELECT count(*) FROM list_tasks WHERE round = ? AND done = 0",
                                       (self.round,)) or 0
        self.progress.pending = self.state.scalar(
            "SELECT count(*) FROM objects WHERE kind = 'pending' AND status = 'present'") or 0
        running, dispatched_id = 0, 0
        cursor = ""
        max_running = self.config.list_workers * 2  # queued behind the workers: a few, not all
        while True:
            # 1. Hand the next listing tasks to the workers, a bounded batch from the table.
            if running < max_running:
                rows = self.state.query(
                    "SELECT * FROM list_tasks WHERE round = ? AND done = 0 AND id > ? "
                    "ORDER BY id LIMIT ?", (self.round, dispatched_id, max_running - running))
                for row in rows:
                    task = ListingTask(row["id"], row["prefix"], bool(row["explore"]), row["start_after"],
                                 row["end_before"], row["last_key"])
                    lister.submit(self._list_task, task)
                    dispatched_id = row["id"]
                    running += 1
            # 2. Commit listing pages as they come (waiting, when nothing else is to do, for a
            # page or a batch of header reads; 50 ms at most, for the last few reads).
            pages, error = self._next_pages()
            if not pages and error is None and (reads.pending() or open_tasks):
                self._wake.wait(0.05)
                self._wake.clear()  # before looking: a wake after this is kept for the next turn
                pages, error = self._next_pages()
            if pages:
                open_tasks += self._commit_pages(pages)
                running -= sum(page.done for page in pages)
            if error is not None:
                raise error
            self.progress.listing_done = open_tasks == 0
            # 3. Collect finished header reads and commit them in batches.
            # Committed before dispatching more, so a finished key is never dispatched twice.
            results = reads.finished()
            if results:
                self._commit_headers(results)
            # 4. Keep the header readers busy.
            room = reads.capacity - reads.pending()
            if room > 0:
                rows = self.state.query(
                    "SELECT key, size, etag FROM objects WHERE kind = 'pending' AND status = 'present'"
                    " AND key > ? ORDER BY key LIMIT ?", (cursor, reads.capacity * 2))
                items: list[Item] = []
                for row in rows:
                    key = row["key"]
                    if reads.busy(key) or key in self._failed:
                        cursor = key
                        continue
                    if len(items) >= room:
                        break
                    cursor = key
                    items.append((key, row["size"], row["etag"]))
                reads.submit(items)
                if len(rows) < reads.capacity * 2:
                    cursor = ""  # wrap: listing may have added keys behind the cursor
            self.on_progress(self.progress)
            if open_tasks == 0 and not reads.pending():
                self.progress.pending = self.state.scalar(
                    "SELECT count(*) FROM objects WHERE kind = 'pending' AND status = 'present'") or 0
                if self.progress.pending <= len(self._failed):
                    self.on_progress(self.progress)
                    return

    def _next_pages(self) -> tuple[list[ListingPage], BaseException | None]:
        """The pages queued now (a few, committed together), and a worker's error after them."""
        pages: list[ListingPage] = []
        while len(pages) < PAGES_PER_COMMIT:
            try:
                item = self._pages.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                return pages, item
            pages.append(item)
        return pages, None

    # -- the writer thread ------------------------------------------------------------------
    def _commit_pages(self, pages: list[ListingPage]) -> int:
        """Write listing pages, each with its resume point and the tasks it planned, in one
        transaction; returns the change in open tasks (planned, less those finished)."""
        stamp, rnd = now(), self.round
        work = [(page, *listed.page_rows(page.objects, rnd, stamp, self.pattern),
                 self._plan_tasks(page) if page.prefixes else []) for page in pages]
        opened = 0
        with self.state.transaction() as tx:
            for page, rows, _pending, planned in work:
                tx.executemany(listed.UPSERT, rows)
                if planned:
                    tx.executemany("INSERT INTO list_tasks(round, prefix, start_after, end_before, "
                                   "explore, done, skipped) VALUES (?, ?, ?, ?, ?, ?, ?)", planned)
                tx.execute("UPDATE list_tasks SET last_key = ?, done = ?, pages = pages + 1, "
                           "keys = keys + ? WHERE id = ?",
                           (page.last_key, int(page.done), len(rows), page.task.id))
                opened += sum(1 for p in planned if not p[5]) - page.done
            tx.execute("UPDATE inventory_rounds SET list_requests = list_requests + ? WHERE id = ?",
                       (len(pages), rnd))
            self.link.traffic(list_=len(pages))  # link evidence
            self.link.flush(tx)
        self.progress.listed += sum(len(rows) for _, rows, _, _ in work)
        # An upper bound on a re-run: unchanged keys keep their kind.
        self.progress.pending += sum(pending for _, _, pending, _ in work)
        return opened

    # -- headers ------------------------------------------------------------------------
    def _read_header(self, key: str, size: int, etag: str) -> HeaderResult:
        assert self._headers is not None
        return self._headers.read(key, size, etag)

    def _commit_headers(self, results: list[HeaderResult]) -> None:
        stamp = now()
        updates, requests, nbytes = [], 0, 0
        with self.state.transaction() as tx:
            for r in results:
                requests += r.requests
                nbytes += r.bytes_read
                if r.error:
                    if r.unreadable:
                        self._unreadable[r.key] = r.unreadable
                    if r.error != "stopped":
                        self._failed[r.key] = r.error
                        self.progress.failed = len(self._failed)
                    continue
                if r.gone:
                    self.progress.pending -= 1
                    tx.execute("UPDATE objects SET status = 'deleted', change = 'deleted', "
                               "change_round = ?, updated_at = ? WHERE key = ?",
                               (self.round, stamp, r.key))
                    continue
                if r.changed_to:
                    self._changes[r.key] = self._changes.get(r.key, 0) + 1
                    if self._changes[r.key] > 3:
                        self._failed[r.key] = "object keeps changing while being read"
                        self.progress.failed = len(self._failed)
                        continue
                    etag, size, modified = r.changed_to
                    tx.execute("UPDATE objects SET etag = ?, size = ?, last_modified = ?, "
                               "change = 'changed', change_round = ?, updated_at = ? WHERE key = ?",
                               (etag, size, modified, self.round, stamp, r.key))
                    continue
                h = r.header
                assert h is not None
                updates.append((h.kind, h.reason, h.study_uid, h.series_uid, h.sop_uid,
                                h.sop_class_uid, h.modality, h.study_date, h.transfer_syntax,
                                patient_hash(self.patient_key, h.patient_id),
                                json.dumps(r.checksums) if r.checksums else None,
                                r.bytes_read, stamp, h.encoding, h.plain_size, h.pacs_metadata,
                                r.key, r.etag))
                if r.members is not None:  # a zipped study's files (cloudexit/state/members.py)
                    members.record(tx, r.key, r.etag, self.round, stamp, [
                        (m, mh, patient_hash(self.patient_key, mh.patient_id)) for m, mh in r.members])
            tx.executemany(_HEADER_UPDATE, updates)
            for r in results:  # link evidence (state/linkseries.py)
                self.link.traffic(r.bytes_read, get=r.requests)
                self.link.ttfb(r.ttfb)
                if r.error and not r.unreadable and r.error != "stopped":
                    self.link.error("transient", r.error)
            self.link.flush(tx)
            tx.execute("UPDATE inventory_rounds SET get_requests = get_requests + ?, "
                       "header_bytes = header_bytes + ? WHERE id = ?", (requests, nbytes, self.round))
        self.progress.classified += len(updates)
        self.progress.pending -= len(updates)

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
            members.carry(tx, r)  # the files of zips listed unchanged are still there
            members.refuse_clashes(tx, r, now())  # zips whose files a bucket key is spelled as
            # Listing is complete: whatever this round did not see is gone from the bucket, except
            # in the folders --since skipped (the greatest skipped prefix at or below a key is the
            # only one that can hold it: skipped folders never nest).
            unlisted = ("AND NOT coalesce((SELECT substr(objects.key, 1, length(t.prefix)) = t.prefix "
                        "FROM list_tasks t WHERE t.round = :r AND t.skipped = 1 "
                        "AND t.prefix <= objects.key ORDER BY t.prefix DESC LIMIT 1), 0)")
            skipped = tx.execute("SELECT count(*) FROM list_tasks WHERE round = ? AND skipped = 1",
                                 (r,)).fetchone()[0]
            tx.execute("UPDATE objects SET status = 'deleted', change = 'deleted', change_round = :r, "
                       "updated_at = :at WHERE status = 'present' AND last_seen_round < :r "
                       + (unlisted if skipped else ""), {"r": r, "at": now()})
            not_listed = tx.execute("SELECT count(*) FROM objects WHERE status = 'present' "
                                    "AND last_seen_round < ?", (r,)).fetchone()[0]
            counts = dict(tx.execute(
                "SELECT change, count(*) FROM objects WHERE change_round = ? GROUP BY change",
                (r,)).fetchall())
            # Recorded now: a later round overwrites objects.change, so these cannot be rebuilt.
            tx.execute("UPDATE inventory_rounds SET status = 'complete', finished_at = ?, "
                       "new_objects = ?, changed_objects = ?, deleted_objects = ? WHERE id = ?",
                       (now(), counts.get("new", 0), counts.get("changed", 0),
                        counts.get("deleted", 0), r))
            unchanged = tx.execute("SELECT count(*) FROM objects WHERE change = 'unchanged' "
                                   "AND last_seen_round = ?", (r,)).fetchone()[0]
            listed.build_indexes(tx)  # those a first listing went without (state/listed.py)
            since = self.since.isoformat() if self.since else None
            self.state.log("inventory.complete", tx, round=r, new=counts.get("new", 0),
                           changed=counts.get("changed", 0), deleted=counts.get("deleted", 0),
                           unread=len(self._failed), since=since, skipped_folders=skipped,
                           not_listed=not_listed)
        why = self._unreadable
        archived: dict[str, int] = {}
        keys = [k for k, v in why.items() if v == "archived"]
        for i in range(0, len(keys), 500):
            batch = keys[i:i + 500]
            for cls, n in self.state.query("SELECT coalesce(storage_class, 'archive'), count(*) FROM objects "
                                           f"WHERE key IN ({','.join('?' * len(batch))}) GROUP BY 1", batch):
                archived[cls] = archived.get(cls, 0) + n
        return RoundSummary(r, resumed, counts.get("new", 0), counts.get("changed", 0),
                            counts.get("deleted", 0), unchanged,
                            sorted((k, v) for k, v in self._failed.items() if k not in why),
                            since, skipped, not_listed,
                            archived=archived,
                            customer_key=sum(1 for v in why.values() if v == "customer-key"),
                            customer_key_sample=sorted(k for k, v in why.items() if v == "customer-key")[:10])
