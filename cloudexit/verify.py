"""Reconciliation: re-check what landed at each destination against the inventory.

* Filesystem archive: every file the migration recorded is there with its size (and, `deep`,
  its SHA-256); no file the migration did not put there; every inventory object accounted for;
  instance counts per study.
* PACS (`dicom://`: C-FIND; `dicomweb+https://`: QIDO-RS): per study NumberOfStudyRelatedInstances,
  per series NumberOfSeriesRelatedInstances, compared with the distinct SOP Instance UIDs of the
  inventory; for a series that differs, the instance lists say which are missing or extra.
  `sample` instances are fetched back (C-GET / WADO-RS) and compared with the archived copy:
  bytes, then pixel data and every attribute, saying what differs and how.

The inventory (DICOM objects present at the source) is the reference. A PACS usually holds other
studies too: only the inventory's studies are asked about. Results go to the state DB
(`verify_*` tables, docs/verify.md) and come back as a `VerifyReport`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import stat
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from cloudexit.core.errors import UsageError
from cloudexit.core.states import DONE, GOOD, ObjectKind, ObjectStatus, StudyStatus, VerifyStatus, sql_in
from cloudexit.core.states import TransferState as T
from cloudexit.state.db import State, now
from cloudexit.state.destinations import destinations  # also the CLI's list of targets
from cloudexit.stores import Store, StoreError
from cloudexit.stores.claim import RESERVED, members, note_conflicts, read_marker

# Attribute values a report may show; anything else (patient, names, dates, free text) is only
# said to differ, never shown.
SHOWN = frozenset({
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "PlanarConfiguration",
    "InstanceNumber", "SeriesNumber", "SpecificCharacterSet", "ImageType", "SliceThickness",
    "PixelSpacing", "RescaleSlope", "RescaleIntercept", "LossyImageCompression",
})
PIXEL_TAG = 0x7FE00010


@dataclass
class Finding:
    level: str  # object | file | study | series | instance
    problem: str  # missing | extra | size | mtime | sha256 | not-a-file | not-delivered | count
    key: str | None = None
    path: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    expected: str | None = None
    found: str | None = None
    detail: str | None = None

    def text(self) -> str:
        """The finding in one line for a person: what, where, the figures, why."""
        where = self.path or self.key or self.sop_uid or self.series_uid or self.study_uid
        if self.problem == "not-delivered":  # `found` is the transfer's state, nothing was expected
            extra = (" (never migrated)" if self.found in (None, "not migrated")
                     else f" (the migration recorded it as {self.found})")
        elif self.expected is not None or self.found is not None:
            extra = f" (expected {self.expected or '-'}, found {self.found or 'none'})"
        else:
            extra = ""
        return f"{self.level} {self.problem}: {where}{extra}" + (f"; {self.detail}" if self.detail else "")


@dataclass
class StudyCount:
    study_uid: str
    expected_instances: int
    found_instances: int | None
    expected_series: int | None = None
    found_series: int | None = None

    @property
    def status(self) -> str:
        if self.found_instances is None:
            return StudyStatus.MISSING
        if self.found_instances != self.expected_instances or (
                self.found_series is not None and self.found_series != self.expected_series):
            return StudyStatus.MISMATCH
        return StudyStatus.OK


@dataclass
class Sample:
    sop_uid: str
    key: str | None
    result: str  # identical | equivalent | differs | not-compared
    pixel: str | None = None
    transfer_syntax: str | None = None
    differences: list[dict[str, Any]] = field(default_factory=list)
    detail: str | None = None


@dataclass
class VerifyReport:
    dest: str
    kind: str
    options: dict[str, Any]
    started_at: str = field(default_factory=now)
    finished_at: str | None = None
    run_id: int | None = None
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    studies: list[StudyCount] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.findings and all(s.result in ("identical", "equivalent") for s in self.samples)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.counts[f"{finding.level}_{finding.problem}"] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_id, "dest": self.dest, "kind": self.kind,
            "status": VerifyStatus.PASSED if self.passed else VerifyStatus.FAILED,
            "started_at": self.started_at, "finished_at": self.finished_at, "options": self.options,
            "counts": dict(self.counts),
            "studies": [{**asdict(s), "status": s.status} for s in self.studies],
            "findings": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.findings],
            "samples": [asdict(s) for s in self.samples],
        }


Progress = Callable[[str, int, int], None]  # (phase, done, total)


def dicomweb_twin(state: State, dest: str, given: list[str] | tuple[str, ...] = ()) -> str | None:
    """A DICOMweb URL of the same host as the dicom:// destination `dest`, from the destinations
    given or those the migration delivered to (QIDO-RS answers where C-FIND is refused)."""
    host = urlsplit(dest).hostname
    for other in [*given, *destinations(state)]:
        if other.startswith("dicomweb+") and urlsplit(other).hostname == host:
            return other
    return None


def _wait_past(stamp: str) -> None:
    """Wait (at most a second) until `now()` is later than `stamp`, before reading anything.

    Timestamps have one-second resolution, and the deletion rule counts a copy as vouched for
    when it landed at or before its destination's last verify started (`landed > started_at`
    keeps it). A copy landing in the same second as a fast verify, but after it, would share
    that second and pass for vouched; a verify that reads only once its start second is over
    has seen every copy stamped with that second or earlier.

    A finer stamp for the verify alone would not remove the wait: the copies' stamps stay to the
    second, and "12:00:00+00:00" sorts before "12:00:00.250+00:00", so a copy landing at .9
    would pass for landed before a verify that started at .25. Without the wait, every writer
    of a landing would have to record something finer (or the verify run current when it
    committed, which SQLite's one writer orders exactly) and the rule compare that instead."""
    while now() <= stamp:
        time.sleep(0.02)


def verify(state: State, store: Store, deep: bool = False, sample: int = 0, seed: int | None = None,
           progress: Progress | None = None) -> VerifyReport:
    """Reconcile one destination, record the result in the state DB, return the report."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if store.kind == "filesystem":
        sample = 0  # --sample fetches back from a PACS; a folder is re-hashed by --deep instead
    report = VerifyReport(store.id, store.kind, {"deep": deep, "sample": sample, "seed": seed})
    tick = progress or (lambda phase, done, total: None)
    with state.transaction() as tx:
        report.run_id = tx.execute(
            "INSERT INTO verify_runs(started_at, dest, kind, options, status) VALUES (?, ?, ?, ?, ?)",
            (report.started_at, report.dest, report.kind, json.dumps(report.options), VerifyStatus.RUNNING)).lastrowid
        state.log("verify.started", tx, run=report.run_id, dest=report.dest, options=report.options)
    _wait_past(report.started_at)
    try:
        if store.kind == "filesystem":
            _verify_filesystem(state, store, deep, report, tick)
        else:
            _verify_pacs(state, store, report, tick)
            if sample:
                _sample(state, store, sample, seed, report, tick)
    except BaseException as exc:
        with state.transaction() as tx:
            tx.execute("UPDATE verify_runs SET status = 'error', finished_at = ?, summary = ? WHERE id = ?",
                       (now(), json.dumps({"error": str(exc).splitlines()[0]}), report.run_id))
        raise
    report.finished_at = now()
    _record(state, report)
    return report


# -- inventory expectations -------------------------------------------------------------------------
_PRESENT_DICOM = f"kind = '{ObjectKind.DICOM}' AND status = '{ObjectStatus.PRESENT}'"
_EXPECTED = f"FROM objects WHERE {_PRESENT_DICOM} AND study_uid IS NOT NULL AND sop_uid IS NOT NULL"


def _expected(state: State, studies: list[str]) -> dict[str, dict[str, set[str]]]:
    """study -> series -> SOP Instance UIDs of the DICOM objects present at the source, for
    `studies` (asked a batch at a time: a whole inventory's UIDs would not fit in memory)."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in state.query(f"SELECT study_uid, series_uid, sop_uid {_EXPECTED} "
                         f"AND study_uid IN ({','.join('?' * len(studies))})", studies):
        out[r["study_uid"]][r["series_uid"] or ""].add(r["sop_uid"])
    return out


def _delivery_notes(state: State, dest: str) -> dict[str, str]:
    """SOP Instance UID -> what the migration recorded for it at `dest`, when not a success."""
    notes: dict[str, str] = {}
    for r in state.query("SELECT o.sop_uid, t.state, t.reason FROM transfers t JOIN objects o ON o.key = t.key "
                         f"WHERE t.dest = ? AND o.sop_uid IS NOT NULL AND t.state NOT IN {sql_in(GOOD)}",
                         (dest,)):
        notes[r["sop_uid"]] = f"recorded as {r['state']}" + (f": {r['reason']}" if r["reason"] else "")
    return notes


# -- filesystem -------------------------------------------------------------------------------------
_PAGE = 2000  # transfer rows read (and files checked) at a time: memory does not grow with the archive
_ARCHIVED = f"t.state IN {sql_in({T.VERIFIED, T.QUARANTINED})} AND t.path IS NOT NULL"  # a file is there


def _verify_filesystem(state: State, store: Any, deep: bool, report: VerifyReport, tick: Progress) -> None:
    root = str(store.root)
    if not os.path.isdir(root):
        raise StoreError(f"the archive folder {root} does not exist", hint="check --to, or the mount")
    conn = state.conn
    # Keys whose file failed a check: few, and the per-study counts below leave them out.
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS verify_bad (key TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM temp.verify_bad")
    total = state.scalar(f"SELECT count(*) FROM transfers t WHERE t.dest = ? AND {_ARCHIVED}", (report.dest,))
    # Re-hashing is disk- and hashlib-bound (hashlib releases the GIL): threads overlap the reads.
    threads = min(8, 2 * (os.cpu_count() or 1)) if deep else 1
    done, last = 0, 0
    with ThreadPoolExecutor(threads) as pool:
        while True:
            page = state.query(
                # file_size: a decoded instance's file (the object's size is the raw object's)
                "SELECT t.rowid AS id, t.key, t.path, coalesce(t.file_size, t.size) AS size, t.sha256, t.mtime_ns, "
                "t.state, o.kind, o.study_uid, o.series_uid, o.sop_uid "
                "FROM transfers t LEFT JOIN objects o ON o.key = t.key "
                # `+t.dest`: walk the rowid range, not the (dest, path) index (a sort per page).
                f"WHERE +t.dest = ? AND t.rowid > ? AND {_ARCHIVED} ORDER BY t.rowid LIMIT ?",
                (report.dest, last, _PAGE))
            if not page:
                break
            last = page[-1]["id"]
            checked = pool.map(lambda r: _check_file(root, r, deep), page) if deep else \
                (_check_file(root, r, deep) for r in page)
            times = []
            for r, (problems, mtime_ns) in zip(page, checked, strict=True):
                if mtime_ns is not None:
                    times.append((mtime_ns, r["id"]))
                for finding in problems:
                    report.add(finding)
                if problems:
                    conn.execute("INSERT OR IGNORE INTO temp.verify_bad VALUES (?)", (r["key"],))
            if times:  # proven by their hash: quick checks compare these times from now on
                with state.transaction() as tx:
                    tx.executemany("UPDATE transfers SET mtime_ns = ? WHERE rowid = ?", times)
                report.counts["files_mtime_recorded"] += len(times)
            report.counts["files_checked"] += len(page)
            report.counts["files_rehashed"] += sum(1 for r in page if deep and r["sha256"])
            done += len(page)
            tick("files", done, total)
    report.counts["files_ok"] = report.counts["files_checked"] - sum(
        1 for f in report.findings if f.level == "file")
    _extra_files(state, root, report)
    report.counts["archive_conflicts_noted"] = note_conflicts(state, report.dest, root)
    # Every object of the inventory must have been accounted for at this destination.
    for r in state.query(
            "SELECT o.key, o.kind, o.study_uid, o.sop_uid, t.state, t.reason FROM objects o "
            f"LEFT JOIN transfers t ON t.key = o.key AND t.dest = ? WHERE o.status = '{ObjectStatus.PRESENT}' "
            f"AND (t.state IS NULL OR t.state NOT IN {sql_in(DONE)})",
            (report.dest,)):
        report.add(Finding("object", "not-delivered", key=r["key"], study_uid=r["study_uid"],
                           sop_uid=r["sop_uid"], found=r["state"] or "not migrated",
                           detail=r["reason"]))
    # Per study: the inventory's distinct SOP Instance UIDs, and how many of them have a good file.
    # One sorted pass over both sets (a join of the two would be quadratic without an index).
    for r in state.query(
            "SELECT study_uid AS study, sum(w) AS want, sum(w AND g) AS have FROM ("
            "SELECT study_uid, sop_uid, min(src) = 1 AS w, max(src) = 2 AS g FROM ("
            f"SELECT study_uid, sop_uid, 1 AS src {_EXPECTED} "
            "UNION ALL SELECT o.study_uid, o.sop_uid, 2 FROM transfers t JOIN objects o ON o.key = t.key "
            f"WHERE t.dest = ? AND t.state = '{T.VERIFIED}' AND t.path IS NOT NULL AND o.kind = '{ObjectKind.DICOM}' "
            "AND t.key NOT IN (SELECT key FROM temp.verify_bad)"
            ") GROUP BY study_uid, sop_uid) GROUP BY study_uid HAVING want > 0 ORDER BY study_uid",
            (report.dest,)):
        count = StudyCount(r["study"], r["want"], r["have"] or None)
        report.studies.append(count)
        if count.status != StudyStatus.OK:
            report.add(Finding("study", count.status if count.status == StudyStatus.MISSING else "count",
                               study_uid=r["study"], expected=str(r["want"]), found=str(r["have"] or 0)))
    report.counts["expected_instances"] = sum(s.expected_instances for s in report.studies)
    report.counts["found_instances"] = sum(s.found_instances or 0 for s in report.studies)
    conn.execute("DELETE FROM temp.verify_bad")


def _check_file(root: str, r: sqlite3.Row, deep: bool) -> tuple[list[Finding], int | None]:
    """What is wrong with one archived file (nothing: an empty list), and, when `deep` proved
    its bytes and its modification time is not the one recorded (a file placed before schema
    7, or touched since with its content unchanged), the time to record for quick checks."""
    findings, st = _file_findings(root, r, deep)
    if deep and not findings and r["sha256"] and st is not None and st.st_mtime_ns != r["mtime_ns"]:
        return findings, st.st_mtime_ns
    return findings, None


def _file_findings(root: str, r: sqlite3.Row, deep: bool) -> tuple[list[Finding], os.stat_result | None]:
    full = os.path.join(root, r["path"])
    where = dict(key=r["key"], path=r["path"], study_uid=r["study_uid"], sop_uid=r["sop_uid"])
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return [Finding("file", "missing", **where)], None
    if not stat.S_ISREG(st.st_mode):
        return [Finding("file", "not-a-file", **where)], st
    if r["size"] is not None and st.st_size != r["size"]:
        return [Finding("file", "size", expected=str(r["size"]), found=str(st.st_size), **where)], st
    if not deep and r["mtime_ns"] is not None and st.st_mtime_ns != r["mtime_ns"]:
        # Same size, another modification time: the file was replaced or written to since it
        # was placed (--deep then says whether its bytes differ).
        return [Finding("file", "mtime", expected=_ns_text(r["mtime_ns"]), found=_ns_text(st.st_mtime_ns),
                        detail="replaced or modified since it was placed; `verify --deep` compares "
                               "its content", **where)], st
    if deep and r["sha256"]:
        digest = hashlib.sha256()
        with open(full, "rb") as fh:
            while chunk := fh.read(2**20):
                digest.update(chunk)
        if digest.hexdigest() != r["sha256"]:
            return [Finding("file", "sha256", expected=r["sha256"], found=digest.hexdigest(), **where)], st
    return [], st


def _ns_text(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="microseconds")


def _extra_files(state: State, root: str, report: VerifyReport) -> None:
    """Files in the archive the migration did not put there, looked up in the DB folder by folder
    (the unique index on (dest, path)), not held as one set of every path.

    In an archive shared with other migrations (`migrate --join-archive`) their files are
    counted (`files_other_migrations`), not reported: this DB cannot tell them from others."""
    shared = len(members(read_marker(root))) > 1
    for folder, _dirs, files in os.walk(root):
        below = os.path.relpath(folder, root).replace(os.sep, "/")
        prefix = "" if below == "." else below + "/"
        if not prefix:
            files = [f for f in files if f not in RESERVED]  # the archive's marker and ledger
        for i in range(0, len(files), 500):
            rels = {prefix + name: name for name in files[i:i + 500]}
            known = {r[0] for r in state.query(
                f"SELECT path FROM transfers t WHERE t.dest = ? AND {_ARCHIVED} "
                f"AND t.path IN ({','.join('?' * len(rels))})", (report.dest, *rels))}
            for rel, name in rels.items():
                if rel not in known and shared and not name.startswith(".cloudexit-"):
                    report.counts["files_other_migrations"] += 1
                elif rel not in known:
                    temp = name.startswith(".cloudexit-")
                    report.add(Finding("file", "extra", path=rel,
                                       detail="temp file left by an interrupted run" if temp else None))


# -- PACS -------------------------------------------------------------------------------------------
def _verify_pacs(state: State, store: Any, report: VerifyReport, tick: Progress) -> None:
    notes = _delivery_notes(state, report.dest)
    studies = [r[0] for r in state.query(f"SELECT DISTINCT study_uid {_EXPECTED} ORDER BY study_uid")]
    for n, study in enumerate(studies, 1):
        if n % 500 == 1:
            batch = studies[n - 1:n + 499]
            expected, found = _expected(state, batch), store.count_studies(batch)
        series = expected[study]
        want = sum(len(s) for s in series.values())
        count = StudyCount(study, want, found.get(study), expected_series=len(series))
        if count.found_instances is not None:
            have_series = store.count_series(study)
            count.found_series = len(have_series)
            for uid in sorted(set(series) | set(have_series)):
                _compare_series(store, study, uid, series.get(uid, set()), have_series.get(uid), notes, report)
        else:
            report.add(Finding("study", "missing", study_uid=study, expected=str(want), found="0",
                               detail=_explain(series, notes)))
        if count.status == "mismatch":
            report.add(Finding("study", "count", study_uid=study, expected=str(want),
                               found=str(count.found_instances)))
        report.studies.append(count)
        if n % 50 == 0:
            tick("studies", n, len(studies))
    report.counts["expected_instances"] = sum(s.expected_instances for s in report.studies)
    report.counts["found_instances"] = sum(s.found_instances or 0 for s in report.studies)


def _compare_series(store: Any, study: str, series: str, want: set[str], have: int | None,
                    notes: dict[str, str], report: VerifyReport) -> None:
    if have is not None and have == len(want):
        return
    if have is None:
        report.add(Finding("series", "missing", study_uid=study, series_uid=series,
                           expected=str(len(want)), found="0", detail=_explain({series: want}, notes)))
    else:
        report.add(Finding("series", "count" if want else "extra", study_uid=study, series_uid=series,
                           expected=str(len(want)), found=str(have)))
    listed = store.list_instances(study, series) if have else set()
    for sop in sorted(want - listed):
        report.add(Finding("instance", "missing", study_uid=study, series_uid=series, sop_uid=sop,
                           detail=notes.get(sop)))
    for sop in sorted(listed - want):
        report.add(Finding("instance", "extra", study_uid=study, series_uid=series, sop_uid=sop))


def _explain(series: dict[str, set[str]], notes: dict[str, str]) -> str | None:
    """Why instances may be missing: what the migration recorded for them, summarised."""
    reasons: dict[str, int] = defaultdict(int)
    for sops in series.values():
        for sop in sops:
            reasons[notes.get(sop, "recorded as delivered" if notes else "no delivery recorded")] += 1
    return "; ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or None


# -- samples ----------------------------------------------------------------------------------------
def _sample(state: State, store: Any, n: int, seed: int, report: VerifyReport, tick: Progress) -> None:
    """Fetch `n` instances back from the PACS (the kept copy of every shared SOP Instance UID
    first, then random ones) and compare them with the archived copies."""
    missing = {f.sop_uid for f in report.findings if f.level == "instance" and f.problem == "missing"}
    missing_studies = {s.study_uid for s in report.studies if s.found_instances is None}
    rows = state.query(
        "SELECT o.key, o.study_uid, o.series_uid, o.sop_uid, o.sop_class_uid, o.transfer_syntax, "
        f"t.dest, t.path FROM objects o JOIN transfers t ON t.key = o.key AND t.state = '{T.VERIFIED}' "
        f"AND t.path IS NOT NULL AND (t.dest LIKE 'file://%') WHERE o.kind = '{ObjectKind.DICOM}' "
        f"AND o.status = '{ObjectStatus.PRESENT}' "
        "ORDER BY o.key")
    pool = [r for r in rows if r["sop_uid"] not in missing and r["study_uid"] not in missing_studies]
    # Only the copy that was delivered: for a conflicting SOP UID, the PACS kept one of two.
    conflicted = {r["key"] for r in state.query(
        f"SELECT key FROM transfers WHERE dest = ? AND state IN {sql_in({T.FAILED, T.CONFLICT, T.QUARANTINED})}",
        (report.dest,))}
    pool = [r for r in pool if r["key"] not in conflicted]
    if not pool:
        report.counts["samples_unavailable"] = n
        return
    # A SOP Instance UID the source holds more than once is where a PACS may keep the wrong copy
    # (one that overwrites instances keeps the last sent): its kept copy is always compared.
    shared = {r[0] for r in state.query(
        f"SELECT sop_uid FROM objects WHERE {_PRESENT_DICOM} AND sop_uid IS NOT NULL "
        "GROUP BY sop_uid HAVING count(*) > 1")}
    always = [r for r in pool if r["sop_uid"] in shared]
    rest = [r for r in pool if r["sop_uid"] not in shared]
    chosen = always + random.Random(seed).sample(rest, min(max(0, n - len(always)), len(rest)))
    for i, r in enumerate(chosen, 1):
        report.samples.append(_compare_one(store, r))
        tick("samples", i, len(chosen))
    for s in report.samples:
        report.counts[f"samples_{s.result}"] += 1


def _archived(row: sqlite3.Row) -> bytes:
    root = row["dest"][len("file://"):]
    with open(os.path.join(root, row["path"]), "rb") as fh:
        return fh.read()


def _compare_one(store: Any, r: sqlite3.Row) -> Sample:
    from cloudexit.stores.dicomfile import file_layout

    try:
        data = _archived(r)
    except OSError as exc:
        return Sample(r["sop_uid"], r["key"], "not-compared", detail=f"archived copy unreadable: {exc.strerror}")
    info = file_layout(os.path.join(r["dest"][len("file://"):], r["path"]))
    ours_ts = info.transfer_syntax or r["transfer_syntax"] or "1.2.840.10008.1.2"
    ours = data[info.offset:] if info.part10 else data
    try:
        theirs_ts, theirs = store.fetch(r["study_uid"], r["series_uid"], r["sop_uid"], r["sop_class_uid"], ours_ts)
    except StoreError as exc:
        return Sample(r["sop_uid"], r["key"], "not-compared", detail=f"could not fetch it back: {exc}")
    if theirs_ts == ours_ts and theirs == ours:
        return Sample(r["sop_uid"], r["key"], "identical", pixel="same")
    return compare_datasets(r["sop_uid"], r["key"], ours_ts, ours, theirs_ts, theirs)


def compare_datasets(sop: str, key: str | None, ts_a: str, a: bytes, ts_b: str, b: bytes) -> Sample:
    """What differs between the archived dataset (a) and the PACS's (b), attribute by attribute."""
    import warnings

    from cloudexit.stores.dicomfile import read_dataset

    syntax = None if ts_a == ts_b else f"{ts_a} -> {ts_b}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            da, db = read_dataset(ts_a, a), read_dataset(ts_b, b)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on broken input
        return Sample(sop, key, "differs", transfer_syntax=syntax,
                      detail=f"cannot parse one of the copies: {type(exc).__name__}")
    diffs: list[dict[str, Any]] = []
    tags = sorted(set(da.keys()) | set(db.keys()))  # type: ignore[attr-defined]
    for tag in tags:
        if tag == PIXEL_TAG:
            continue
        ea, eb = da.get(tag), db.get(tag)  # type: ignore[attr-defined]
        if ea is not None and eb is not None and ea.value == eb.value:
            continue
        change = "added" if ea is None else "removed" if eb is None else "changed"
        el = eb if ea is None else ea
        entry: dict[str, Any] = {"tag": f"({tag.group:04X},{tag.element:04X})",
                                 "keyword": el.keyword or "private", "change": change}
        if el.keyword in SHOWN:
            entry["archived"] = None if ea is None else str(ea.value)
            entry["pacs"] = None if eb is None else str(eb.value)
        diffs.append(entry)
    pixel = _compare_pixels(da, db, syntax is not None)
    result = "equivalent" if not diffs and pixel in ("same", "transcoded-same") else "differs"
    return Sample(sop, key, result, pixel=pixel, transfer_syntax=syntax, differences=diffs)


def _compare_pixels(da: Any, db: Any, transcoded: bool) -> str:
    pa, pb = da.get(PIXEL_TAG), db.get(PIXEL_TAG)
    if pa is None or pb is None:
        return "same" if pa is None and pb is None else "differs"
    if not transcoded:
        return "same" if pa.value == pb.value else "differs"
    try:  # decoding needs numpy and the codec; without them say so rather than guess
        import numpy

        return "transcoded-same" if numpy.array_equal(da.pixel_array, db.pixel_array) else "differs"
    except Exception:  # noqa: BLE001
        return "transcoded-not-compared"


# -- recording --------------------------------------------------------------------------------------
def _record(state: State, report: VerifyReport) -> None:
    run = report.run_id
    report.counts["studies"] = len(report.studies)
    report.counts["studies_ok"] = sum(1 for s in report.studies if s.status == StudyStatus.OK)
    summary = {"status": VerifyStatus.PASSED if report.passed else VerifyStatus.FAILED, **report.counts}
    with state.transaction() as tx:
        tx.executemany(
            "INSERT INTO verify_studies(run_id, study_uid, expected_instances, found_instances, "
            "expected_series, found_series, status) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(run, s.study_uid, s.expected_instances, s.found_instances, s.expected_series,
              s.found_series, s.status) for s in report.studies])
        tx.executemany(
            "INSERT INTO verify_findings(run_id, level, problem, key, path, study_uid, series_uid, sop_uid, "
            "expected, found, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run, f.level, f.problem, f.key, f.path, f.study_uid, f.series_uid, f.sop_uid, f.expected,
              f.found, f.detail) for f in report.findings])
        tx.executemany(
            "INSERT INTO verify_samples(run_id, sop_uid, key, result, pixel, transfer_syntax, differences) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(run, s.sop_uid, s.key, s.result, s.pixel, s.transfer_syntax,
              json.dumps(s.differences) if s.differences else s.detail) for s in report.samples])
        tx.execute("UPDATE verify_runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
                   (summary["status"], report.finished_at, json.dumps(summary), run))
        state.log("verify.finished", tx, run=run, dest=report.dest, status=summary["status"],
                  findings=len(report.findings), studies=summary["studies"])


def check_sample(targets: list[str], sample: int) -> None:
    """--sample applies to the PACS destinations among `targets`; refuse it when there are none."""
    if sample and not any(t.startswith(("dicom://", "dicomweb")) for t in targets):
        raise UsageError("--sample fetches instances back from a PACS, and no destination here is one",
                         hint="add --to dicom://AET@HOST:PORT or --to dicomweb+https://HOST/PATH, "
                              "or use --deep to re-hash a folder")
