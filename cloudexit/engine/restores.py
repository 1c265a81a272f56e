"""Objects in archive storage classes, and objects whose header must be read first.

Archived objects (Glacier, Deep Archive, and the OSS/COS/OBS archive classes) get a
RestoreObject request at once and are polled every `restore_poll` seconds while everything else
downloads; once restored they are queued. Objects without a known kind (archived at inventory
time, or changed at the source during the run) get their header read here to know where they
go. Both run on a few background threads (boto3: these requests are rare); their answers go
back to the engine's thread, the only one that writes the DB (`drain`).
"""

from __future__ import annotations

import json
import queue
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import CloudexitError, CredentialsError
from cloudexit.engine.progress import MigrateProgress
from cloudexit.s3.source import Source
from cloudexit.core.states import TransferState as T
from cloudexit.state import transfers as sql
from cloudexit.state.db import State, now
from cloudexit.s3.client import Counters


if TYPE_CHECKING:
    from cloudexit.engine.worklist import Worklist

RESTORE_TIERS = {"bulk": "Bulk", "standard": "Standard", "expedited": "Expedited"}
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


def back_to_restore(tx: sqlite3.Connection, key: str, dest: str, stamp: str) -> None:
    """The source says the object is archived (again): restore it before the next GET."""
    sql.set_state(tx, key, dest, T.RESTORING, stamp)
    sql.forget_restore(tx, key)


class Restores:
    """Restores and header reads of one run: background threads, results applied on `drain`."""

    def __init__(self, state: State, source: Source, config: MigrateConfig, dest: str,
                 progress: MigrateProgress, worklist: Worklist, stop: Callable[[BaseException], object]) -> None:
        self.state, self.source, self.config, self.dest = state, source, config, dest
        self.progress, self.worklist, self.stop = progress, worklist, stop
        self.pool: ThreadPoolExecutor | None = None
        self.results: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.busy: set[str] = set()  # keys handed to a thread, answer not applied yet
        self.next_poll = 0.0
        self.counters = Counters()  # requests made here, since the engine last took them
        self.restore_requests = 0
        self.patient_key = state.patient_key().key  # None: patients recorded unmatched

    def start(self) -> None:
        # pydicom is not imported here (~0.17 s at every start): the struct walk reads clean
        # headers, and a thread that falls back to pydicom imports it under
        # `dicom.header.preload`'s lock, as the inventory's header threads do.
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="cloudexit-bg")

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def take_counts(self) -> tuple[Counters, int]:
        """(requests and bytes, restore requests) since the last call."""
        counted, restores = self.counters, self.restore_requests
        self.counters, self.restore_requests = Counters(), 0
        return counted, restores

    def work(self) -> None:
        if self.pool is None:
            return
        cfg = self.config
        # Objects waiting for a restore that none was asked for yet.
        for r in sql.awaiting_restore(self.state, self.dest, 200):
            if r["key"] not in self.busy:
                self.busy.add(r["key"])
                self.pool.submit(self._bg_restore, r["key"], r["etag"], r["storage_class"])
        # Restores in progress: check them every restore_poll seconds.
        if time.monotonic() >= self.next_poll:
            self.next_poll = time.monotonic() + cfg.restore_poll
            for r in sql.requested_restores(self.state):
                if r["key"] not in self.busy:
                    self.busy.add(r["key"])
                    self.pool.submit(self._bg_check_restore, r["key"], r["etag"])
        # Objects whose header must be read first (archived at inventory time, or changed).
        for r in sql.to_inspect(self.state, self.dest, 200):
            if r["key"] not in self.busy:
                self.busy.add(r["key"])
                self.pool.submit(self._bg_inspect, r["key"], r["etag"], r["size"])

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
            self.results.put(("restore", key, {"status": outcome, "etag": etag,
                                                  "storage_class": storage_class}))
        except Exception as exc:  # noqa: BLE001 - translated and recorded
            code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
            if code == "RestoreAlreadyInProgress":
                self.results.put(("restore", key, {"status": "requested", "etag": etag,
                                                      "storage_class": storage_class}))
            elif code == "InvalidObjectState" or code == "ObjectAlreadyInActiveTierError":
                self.results.put(("restore", key, {"status": "restored", "etag": etag,
                                                      "storage_class": storage_class}))
            else:
                err = self.source.translate(exc, f"restore {key!r}") if isinstance(exc, Exception) else exc
                self.results.put(("restore", key, {"status": "failed", "etag": etag,
                                                      "storage_class": storage_class,
                                                      "reason": str(err).split("\n")[0],
                                                      "fatal": isinstance(err, CredentialsError)}))

    def _bg_check_restore(self, key: str, etag: str) -> None:
        try:
            head = self.source.head(key)
        except CloudexitError as exc:
            self.results.put(("restore_check", key, {"error": str(exc).split("\n")[0]}))
            return
        restore = head.get("Restore") or ""
        done = 'ongoing-request="false"' in restore
        expiry = None
        if "expiry-date=" in restore:
            expiry = restore.split("expiry-date=", 1)[1].strip().strip('"')
        self.results.put(("restore_check", key, {"done": done, "expiry": expiry,
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
            self.results.put(("inspect", key, info))
            return
        except ObjectGone:
            info["gone"] = True
            self.results.put(("inspect", key, info))
            return
        except CloudexitError as exc:
            text = str(exc)
            info["error"] = text.split("\n")[0]
            info["archived"] = "InvalidObjectState" in text
            info["fatal"] = isinstance(exc, CredentialsError)
            self.results.put(("inspect", key, info))
            return
        info["header"] = {
            "kind": header.kind, "reason": header.reason, "study_uid": header.study_uid,
            "series_uid": header.series_uid, "sop_uid": header.sop_uid,
            "sop_class_uid": header.sop_class_uid, "modality": header.modality,
            "study_date": header.study_date, "transfer_syntax": header.transfer_syntax,
            "patient_hash": patient_hash(self.patient_key, header.patient_id), "encoding": header.encoding,
            "plain_size": header.plain_size, "pacs_metadata": header.pacs_metadata}
        self.results.put(("inspect", key, info))

    def drain(self) -> None:
        items = []
        while True:
            try:
                items.append(self.results.get_nowait())
            except queue.Empty:
                break
        if not items:
            return
        stamp = now()
        with self.state.transaction() as tx:
            for what, key, info in items:
                self.busy.discard(key)
                getattr(self, f"_on_{what}")(tx, key, info, stamp)

    def _on_restore(self, tx: sqlite3.Connection, key: str, info: dict[str, Any], stamp: str) -> None:
        self.restore_requests += 1
        status = info["status"]
        tier = restore_tier(info.get("storage_class"), self.config.restore_tier)
        sql.record_restore(tx, key, info["etag"], info.get("storage_class"), tier, self.config.restore_days,
                           status, stamp, info.get("reason"))
        self.state.log("migrate.restore", tx, key=key, status=status, tier=tier,
                       days=self.config.restore_days, reason=info.get("reason"))
        if status == "restored":
            self._restored(tx, key, stamp)
        elif status == "failed":
            sql.set_state(tx, key, self.dest, T.FAILED, stamp, f"restore request failed: {info.get('reason')}")
            self.progress.failed += 1
            if info.get("fatal"):
                self.stop(CredentialsError(f"restore refused: {info.get('reason')}",
                                           hint="fix the credentials, then: cloudexit migrate --resume"))
        else:
            self.next_poll = min(self.next_poll, time.monotonic() + self.config.restore_poll)

    def _on_restore_check(self, tx: sqlite3.Connection, key: str, info: dict[str, Any], stamp: str) -> None:
        self.counters.head += 1
        sql.restore_checked(tx, key, stamp, bool(info.get("done")), info.get("expiry"))
        if info.get("done"):
            self.state.log("migrate.restored", tx, key=key, expiry=info.get("expiry"))
            self._restored(tx, key, stamp)

    def _restored(self, tx: sqlite3.Connection, key: str, stamp: str) -> None:
        row = sql.path_of_restoring(tx, key, self.dest)
        if row is None:
            return
        sql.set_state(tx, key, self.dest, T.QUEUED if row[0] else T.INSPECT, stamp)
        self.progress.restoring = max(0, self.progress.restoring - 1)

    def _on_inspect(self, tx: sqlite3.Connection, key: str, info: dict[str, Any], stamp: str) -> None:
        self.counters.get += info.get("requests", 0)
        self.counters.bytes += info.get("bytes", 0)
        if info.get("gone"):
            sql.set_state(tx, key, self.dest, T.MISSING, stamp, "deleted at the source")
            self.progress.failed += 1
            return
        if info.get("changed"):
            # Changed again: take its new identity from a HEAD and read again next round.
            try:
                head = self.source.head(key)
                tx.execute("UPDATE objects SET etag = ?, size = ?, change = 'changed', checksums = NULL, "
                           "updated_at = ? WHERE key = ?", (head.get("ETag", "").strip('"'), int(head["ContentLength"]),
                                             stamp, key))
                sql.new_identity(tx, key, self.dest, head.get("ETag", "").strip('"'), int(head["ContentLength"]))
            except CloudexitError as exc:
                sql.set_state(tx, key, self.dest, T.FAILED, stamp, str(exc).split("\n")[0])
            return
        if info.get("archived"):
            back_to_restore(tx, key, self.dest, stamp)
            return
        if info.get("error"):
            sql.set_state(tx, key, self.dest, T.FAILED, stamp, f"header read failed: {info['error']}")
            self.progress.failed += 1
            if info.get("fatal"):
                self.stop(CredentialsError(info["error"], hint="fix the credentials, then: cloudexit migrate --resume"))
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
        o = sql.rows(tx, "SELECT * FROM objects WHERE key = ?", (key,)).fetchone()
        path, conflict = self.worklist.repath(tx, o)
        state_name = T.SKIPPED if h["kind"] == "other" and self.config.non_dicom == "skip" else T.QUEUED
        sql.placed(tx, key, self.dest, state_name, h["kind"], path, conflict, o["etag"], o["size"], stamp,
                   self.worklist.fold(path))
