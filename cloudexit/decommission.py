"""Decommission: delete the cloud copy, but only what is verified at every destination.

`plan()` (the dry run) lists the bucket as it is now (every version and delete marker when the
bucket is or was versioned), decides per object version whether it may go, writes the deletion
manifest (CSV, 0600) and returns a confirmation token: a hash of exactly the rows it would
delete. `execute()` does the same listing and decision again and refuses unless the token
matches, so nothing is deleted that the person confirming did not see in a dry run. It then
sends DeleteObjects batches and records every object's answer in the `deletions` table, with an
event per batch in the hash-chained log; a listing afterwards confirms each deletion.

Memory stays flat in the size of the bucket: the listing streams into a temp table of the state
DB, keys are decided 500 at a time (their state read in one query per destination), the
manifest and the token are written as the rows are decided, and the plan's rows are read back
from SQLite in pages.

A version may go under the deletion rule (cloudexit/core/deletion.py, the audit's too): at
every destination that applies (a PACS takes DICOM only) its copy is good for exactly this ETag
and the latest `cloudexit verify` of that destination ran after the copy landed and found
nothing wrong with it. Anything else stays, with the rule's reason in the manifest.

Versioned buckets (docs/decommission.md): without `all_versions`, a verified key gets a delete
marker (DeleteObjects without VersionId): its data still exists as a noncurrent version and is
still billed; the report says so. With `all_versions`, each version whose ETag is the verified
one is deleted by VersionId, and the key's delete markers once every version of it goes.
Noncurrent versions with other content were never migrated: they are kept and reported.
Object Lock: in a bucket with Object Lock on (GetObjectLockConfiguration, once), each version
that would be deleted is read with HEAD (its x-amz-object-lock-* headers); one under a
COMPLIANCE or GOVERNANCE retention that has not ended, or a legal hold, is kept, its reason
saying until when. A delete marker can still hide a locked version (S3 allows it); the reason
says its data stays.
Unversioned buckets: each key is deleted with its verified ETag as a condition (the store answers
PreconditionFailed if it was overwritten since).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cloudexit.core import deletion
from cloudexit.core.errors import ConfirmationMismatch, NothingMigrated, StateError, UsageError
from cloudexit.core.files import private_writer
from cloudexit.core.states import DecommissionMode, DecommissionStatus, is_pacs
from cloudexit.core.states import DeletionOutcome as Outcome
from cloudexit.report.facts import current_user
from cloudexit.s3.cleanup import MAX_BATCH, Version, delete_batch, list_all, object_lock_enabled, read_locks, versioning
from cloudexit.s3.source import Source
from cloudexit.state import decommission_tables as tables
from cloudexit.state.db import State, now
from cloudexit.state.decommission_tables import ROW_COLUMNS, ManifestRow, Rows, key_batches, listing_table
from cloudexit.state.destinations import destinations as known_destinations
from cloudexit.state.destinations import last_verify_runs

MANIFEST_FIELDS = ("action", "key", "version_id", "is_latest", "delete_marker", "etag", "size",
                   "last_modified", "sha256", "kept_at", "how", "reason")
EXIT_LEFT = 3  # something stays in the bucket (or failed): report written
_KEY_BATCH = 500  # keys decided at a time (their state read in one query per destination)


@dataclass
class Plan:
    """A dry run: what would be deleted, what stays and why, and the token to confirm it.

    Its rows live in a temp table of the state DB connection: read them while it is open."""

    source: str
    endpoint: str | None
    versioning: str
    all_versions: bool
    destinations: list[str]
    rows: Rows
    token: str
    manifest: str | None = None
    manifest_sha256: str | None = None
    run_id: int | None = None
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def to_delete(self) -> Rows:
        return Rows(self.rows.state, self.rows.table, "action = 'delete'")

    @property
    def kept(self) -> Rows:
        return Rows(self.rows.state, self.rows.table, "action = 'keep'")

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source, "endpoint": self.endpoint, "versioning": self.versioning,
            "all_versions": self.all_versions, "destinations": self.destinations, **self.totals,
            "token": self.token, "manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
            "run": self.run_id,
        }


def _totals(state: State, table: str) -> dict[str, Any]:
    """The plan's counts, by SQL over its rows (data versions kept, not delete markers)."""
    t = state.query(
        "SELECT sum(action = 'delete') AS d, coalesce(sum(CASE WHEN action = 'delete' THEN size END), 0) AS db, "
        "sum(action = 'keep' AND NOT delete_marker) AS k, "
        "coalesce(sum(CASE WHEN action = 'keep' AND NOT delete_marker THEN size END), 0) AS kb, "
        "sum(action = 'delete' AND how = 'marker') AS m, "
        f"sum(action = 'keep' AND NOT delete_marker AND NOT is_latest) AS n, "
        f"sum(action = 'keep' AND reason LIKE 'object lock:%') AS l, "
        f"coalesce(sum(CASE WHEN action = 'keep' AND reason LIKE 'object lock:%' THEN size END), 0) AS lb "
        f"FROM {table}")[0]
    reasons = {r["reason"]: {"objects": r["n"], "bytes": r["b"]} for r in state.query(
        "SELECT CASE WHEN instr(reason, ':') THEN substr(reason, 1, instr(reason, ':') - 1) ELSE reason END "
        f"AS reason, count(*) AS n, sum(size) AS b FROM {table} WHERE action = 'keep' AND NOT delete_marker "
        "GROUP BY 1 ORDER BY 1")}
    return {"to_delete": t["d"] or 0, "to_delete_bytes": t["db"], "kept": t["k"] or 0, "kept_bytes": t["kb"],
            "kept_by_reason": reasons, "delete_markers_to_place": t["m"] or 0, "noncurrent_left": t["n"] or 0,
            "locked": t["l"] or 0, "locked_bytes": t["lb"]}


@dataclass
class Execution:
    plan: Plan
    run_id: int
    batches: int = 0
    deleted: int = 0  # versions deleted, or delete markers placed
    deleted_bytes: int = 0
    markers: int = 0  # of which delete markers (data still there as noncurrent versions)
    failed: list[tuple[str, str | None, str]] = field(default_factory=list)  # key, version, error
    confirmed: int = 0
    unconfirmed: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_LEFT if (self.failed or self.plan.totals["kept"] or self.markers or self.unconfirmed) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "plan": self.plan.summary(), "batches": self.batches,
                "deleted": self.deleted, "deleted_bytes": self.deleted_bytes,
                "delete_markers": self.markers, "confirmed": self.confirmed,
                "unconfirmed": self.unconfirmed[:100],
                "failed": [{"key": k, "version_id": v, "error": e} for k, v, e in self.failed]}


# -- inputs -----------------------------------------------------------------------------------------
def default_destinations(state: State) -> list[str]:
    """Every destination a migration delivered to or a verify checked, in first-use order."""
    return known_destinations(state, verified=True)


def _dest_id(dest: str) -> str:
    """A `--to` value as the id recorded in the DB (folders become file:///abs/path)."""
    if is_pacs(dest) or dest.startswith("file://"):
        return dest
    return "file://" + os.path.abspath(os.path.expanduser(dest))  # as FilesystemStore.id


# -- the decision ------------------------------------------------------------------------------------
class _Judge:
    """The deletion rule (cloudexit.core.deletion, the audit's too) per (key, ETag), over the
    state of a batch of keys read in one query per destination."""

    def __init__(self, state: State, dests: list[str]) -> None:
        self.state = state
        self.dests = dests
        self.verify = last_verify_runs(state)
        self.params = deletion.params(dests, self.verify)
        self.columns = deletion.copy_columns(dests)
        self.zipped = deletion.zip_members_sql(dests)  # zipped studies: their members' verdict
        self.loaded: set[str] = set()
        self.objects: dict[str, Any] = {}
        self.transfers: dict[str, dict[str, Any]] = {d: {} for d in dests}

    def load(self, keys: list[str]) -> None:
        """Read the state of `keys` (a batch of at most 500), replacing the previous batch."""
        self.loaded = set(keys)
        named = {**self.params, **{f"k{i}": k for i, k in enumerate(keys)}}
        in_keys = ",".join(f":k{i}" for i in range(len(keys)))
        self.objects = {r["key"]: dict(r) for r in self.state.query(
            f"SELECT key, etag, kind, status, study_uid, sop_uid, {self.zipped} AS zip_members "
            f"FROM objects o WHERE key IN ({in_keys})", named)}
        for d in self.dests:
            self.transfers[d] = {r["key"]: dict(r) for r in self.state.query(
                f"SELECT t.key, t.state, t.etag, t.sha256, t.path, t.reason, {self.columns} "
                f"FROM transfers t JOIN objects o ON o.key = t.key WHERE t.dest = :dest AND t.key IN ({in_keys})",
                {**named, "dest": d})}

    def decide(self, key: str, etag: str | None) -> deletion.Decision:
        if key not in self.loaded:
            self.load([key])
        return deletion.decide(self.objects.get(key), {d: self.transfers[d].get(key) for d in self.dests},
                               self.dests, self.verify, etag)

    def judge(self, key: str, etag: str | None) -> tuple[bool, list[str], str | None, str]:
        """(safe, destinations holding a safe copy, its sha256, the manifest's reason)."""
        d = self.decide(key, etag)
        t = self.transfers[d.dest].get(key) if d.dest else None
        return d.safe, d.held, d.sha256, d.reason(etag, t, self.verify.get(d.dest or ""))


def plan(state: State, source: Source, destinations: Iterable[str] | None = None,
         all_versions: bool = False, manifest: str | os.PathLike[str] | None = None,
         record: bool = True) -> Plan:
    """The dry run: list the bucket now, decide per version, write the manifest."""
    dests = [_dest_id(d) for d in destinations] if destinations else default_destinations(state)
    if not dests:
        raise NothingMigrated("nothing to decommission: no migration has delivered anywhere yet",
                              hint="run `cloudexit migrate --to DEST` and `cloudexit verify` first")
    if state.meta("source_url") != source.url:
        raise StateError(f"this state DB migrated {state.meta('source_url')}, not {source.url}")
    running = state.scalar("SELECT count(*) FROM inventory_rounds WHERE status = 'running'")
    if running:
        raise StateError("the inventory is not finished", hint="run `cloudexit inventory` again first")
    status = versioning(source)
    versioned = status != "off"
    locked = versioned and object_lock_enabled(source)  # no lock on the bucket: no per-object reads
    table = listing_table(state, list_all(source, versioned))
    rows_table = f"{table}_rows"
    state.conn.execute(f"CREATE TABLE {rows_table} (seq INTEGER PRIMARY KEY, "
                       f"{', '.join(ROW_COLUMNS)})")
    judge = _Judge(state, dests)
    hasher = hashlib.sha256(json.dumps([source.url, status, all_versions]).encode())
    digest = hashlib.sha256()
    with private_writer(manifest) if manifest is not None else contextlib.nullcontext() as out:

        def emit(text: str) -> None:
            data = text.encode("utf-8")
            digest.update(data)
            if out is not None:
                out.write(data)

        emit(",".join(MANIFEST_FIELDS) + "\n")
        for keys, versions in key_batches(state, table, _KEY_BATCH):
            judge.load(keys)
            locks = read_locks(source, [(k, v.version_id) for k in keys for v in versions[k]
                                        if not v.delete_marker and judge.judge(k, v.etag)[0]]) if locked else {}
            decided = [row for key in keys
                       for row in _decide(key, versions[key], judge, versioned, all_versions, locks)]
            lines = io.StringIO()
            csv.writer(lines, lineterminator="\n").writerows(r.csv_row() for r in decided)
            emit(lines.getvalue())
            for r in decided:
                if r.action == "delete":
                    hasher.update(json.dumps([r.key, r.version_id, r.etag, r.how], ensure_ascii=False).encode())
            with state.transaction() as tx:
                tx.executemany(f"INSERT INTO {rows_table} ({', '.join(ROW_COLUMNS)}) VALUES "
                               f"({', '.join('?' * len(ROW_COLUMNS))})", [r.db_row() for r in decided])
    state.conn.execute(f"DROP TABLE {table}")
    # The token: a hash of exactly what would be deleted (and how), shown for the person to confirm.
    hexed = hasher.hexdigest()[:16]
    token = "-".join(hexed[i:i + 4] for i in range(0, 16, 4))
    result = Plan(source.url, source.config.endpoint_url, status, all_versions, dests, Rows(state, rows_table), token,
                  totals=_totals(state, rows_table))
    if manifest is not None:
        result.manifest, result.manifest_sha256 = str(manifest), digest.hexdigest()
    if record:
        summary = result.summary()
        with state.transaction() as tx:
            result.run_id = tables.insert_run(tx, DecommissionMode.DRY_RUN, DecommissionStatus.PLANNED, summary,
                                              now(), now())
            state.log("decommission.planned", tx, run=result.run_id, token=token, versioning=status,
                      all_versions=all_versions, to_delete=summary["to_delete"], kept=summary["kept"],
                      manifest_sha256=result.manifest_sha256)
    return result


def _decide(key: str, versions: list[Version], judge: _Judge, versioned: bool,
            all_versions: bool, locks: dict[tuple[str, str | None], str] | None = None) -> list[ManifestRow]:
    """The manifest rows of one key: each version (and delete marker) to delete or keep, and why.
    `locks`: the reason of each (key, version id) under Object Lock now."""
    data = [v for v in versions if not v.delete_marker]
    # A key whose latest version is a delete marker is not in a plain listing: no inventory can
    # have seen it, so "arrived since the last inventory" would send the user to the wrong fix.
    hidden = any(v.delete_marker and v.is_latest for v in versions)
    decided: list[ManifestRow] = []
    for v in data:
        safe, held, sha, reason = judge.judge(key, v.etag)
        if hidden and reason.startswith("not inventoried"):
            reason = ("hidden by a delete marker: deleted at the source before the inventory, which "
                      "lists current objects only, so never migrated; its data stays as a noncurrent "
                      "version (to migrate it, delete the marker, then run inventory, migrate, verify)")
        row = ManifestRow("keep", key, v.version_id, v.is_latest, False, v.etag, v.size,
                          v.last_modified, sha, held, "", reason)
        lock = (locks or {}).get((key, v.version_id))
        if lock and safe and (all_versions or not v.is_latest):
            # Verified, but the store refuses to delete it before then: kept, never promised.
            row.reason = f"{lock}; verified at every destination, delete it after that"
            decided.append(row)
            continue
        if not versioned:
            if safe:
                row.action, row.how = "delete", "if-match"
        elif all_versions:
            if safe:
                row.action, row.how = "delete", "version"
            elif not v.is_latest and any(judge.judge(key, w.etag)[0] for w in data if w is not v):
                row.reason = (f"older content: this noncurrent version was never migrated; kept ({reason})"
                              if not reason.startswith(("not inventoried", "hidden by")) else reason)
        else:
            if safe and v.is_latest:
                row.action, row.how = "delete", "marker"
                row.reason = ("verified at every destination; a delete marker hides it, its data stays "
                              "as a noncurrent version (use --all-versions to delete it)")
                if lock:
                    row.reason = (f"verified at every destination; a delete marker hides it, its data stays "
                                  f"as a noncurrent version under {lock[len('object lock: '):]}")
            elif safe:
                row.reason = "noncurrent version: kept (only --all-versions deletes old versions)"
        decided.append(row)
    all_go = bool(decided) and all(r.action == "delete" for r in decided)
    for m in (v for v in versions if v.delete_marker):
        row = ManifestRow("keep", key, m.version_id, m.is_latest, True, None, 0, m.last_modified,
                          reason="delete marker: holds no data")
        if all_versions and all_go:
            row.action, row.how, row.reason = "delete", "version", "delete marker of a key whose every version goes"
        decided.append(row)
    return decided


def _same_token(given: str, token: str) -> bool:
    return given.replace("-", "").strip().lower() == token.replace("-", "")


# -- execution ---------------------------------------------------------------------------------------
def execute(state: State, source: Source, token: str, destinations: Iterable[str] | None = None,
            all_versions: bool = False, manifest: str | os.PathLike[str] | None = None,
            batch_size: int = MAX_BATCH, conditional: bool = True,
            progress: Callable[[int, int], None] | None = None) -> Execution:
    """Delete what a dry run with the same outcome listed; refuse if the token does not match."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size {batch_size}: use 1 to {MAX_BATCH}")
    p = plan(state, source, destinations, all_versions, manifest, record=False)
    if not _same_token(token, p.token):
        state.log("decommission.refused", given=token, source=source.url,
                  reason="token does not match the objects to delete now")
        raise ConfirmationMismatch(
            f"the confirmation token {token!r} does not match what would be deleted now",
            hint="the objects to delete changed since that dry run (or the token is from another one, "
                 "or --all-versions differs): run `cloudexit decommission` again, review it, confirm its token")
    summary = p.summary()
    stamp = now()
    with state.transaction() as tx:
        run_id = tables.insert_run(tx, DecommissionMode.EXECUTE, DecommissionStatus.RUNNING, summary, stamp)
        state.log("decommission.started", tx, run=run_id, token=p.token, source=source.url,
                  user=current_user(), host=socket.gethostname(),
                  versioning=p.versioning, all_versions=all_versions, destinations=p.destinations,
                  to_delete=summary["to_delete"], manifest_sha256=p.manifest_sha256)
    p.run_id = run_id
    result = Execution(p, run_id)
    todo = p.to_delete
    total, sent = len(todo), 0
    try:
        batch: list[ManifestRow] = []
        for row in todo:
            batch.append(row)
            if len(batch) == batch_size:
                _one_batch(state, source, result, batch, conditional)
                sent += len(batch)
                batch = []
                if progress:
                    progress(sent, total)
        if batch:
            _one_batch(state, source, result, batch, conditional)
            sent += len(batch)
            if progress:
                progress(sent, total)
        _confirm(state, source, result, p.versioning != "off")
    finally:
        status = DecommissionStatus.COMPLETE if not result.failed and sent >= total else DecommissionStatus.PARTIAL
        with state.transaction() as tx:
            tables.finish_run(tx, run_id, now(), status, result.deleted, len(result.failed), result.batches)
            state.log("decommission.finished", tx, run=run_id, status=status, deleted=result.deleted,
                      delete_markers=result.markers, failed=len(result.failed), confirmed=result.confirmed,
                      kept=summary["kept"], kept_bytes=summary["kept_bytes"])
    return result


def _one_batch(state: State, source: Source, result: Execution, rows: list[ManifestRow],
               conditional: bool) -> None:
    objects: list[dict[str, str]] = []
    for r in rows:
        item = {"Key": r.key}
        if r.how == "version":
            item["VersionId"] = r.version_id or "null"
        elif r.how == "if-match" and conditional and r.etag:
            item["ETag"] = f'"{r.etag}"'
        objects.append(item)
    answer = delete_batch(source, objects)
    stamp = now()
    result.batches += 1
    batch = result.batches
    by_version = rows[0].how == "version"
    done: dict[tuple[str, str | None], dict[str, Any]] = {}
    for d in answer.deleted:
        # Deleting a delete marker by VersionId: some stores (SeaweedFS) answer with
        # DeleteMarkerVersionId only.
        done[(d["Key"], (d.get("VersionId") or d.get("DeleteMarkerVersionId")) if by_version else None)] = d
    errors = {(e["Key"], e.get("VersionId") if by_version else None): e for e in answer.errors}
    records = []
    for r in rows:
        ident = (r.key, (r.version_id or "null") if r.how == "version" else None)
        ok, err = done.get(ident), errors.get(ident)
        if ok is not None:
            outcome = (Outcome.DELETE_MARKER if (r.how == "marker" or (ok.get("DeleteMarker") and r.how != "version"))
                       else Outcome.DELETED)
            marker = ok.get("DeleteMarkerVersionId") if outcome == Outcome.DELETE_MARKER else None
            response, code = ok, None
            result.deleted += 1
            result.deleted_bytes += r.size if outcome == Outcome.DELETED else 0
            result.markers += outcome == Outcome.DELETE_MARKER
        else:
            outcome, marker = Outcome.FAILED, None
            response = err or {"Key": r.key, "Code": "NoAnswer", "Message": "not in the DeleteObjects response"}
            code = str(response.get("Code"))
            result.failed.append((r.key, r.version_id, f"{code}: {response.get('Message', '')}"))
        records.append((result.run_id, batch, r.key, r.version_id if r.how == "version" else None, r.etag,
                        r.size, r.sha256, json.dumps(r.kept_at), outcome, marker, code,
                        json.dumps(response, sort_keys=True, default=str), answer.request_id, stamp))
    digest = hashlib.sha256(json.dumps(records, default=str).encode()).hexdigest()
    with state.transaction() as tx:
        tables.insert_deletions(tx, records)
        state.log("decommission.batch", tx, run=result.run_id, batch=batch, request_id=answer.request_id,
                  objects=len(rows), deleted=sum(1 for x in records if x[8] != Outcome.FAILED),
                  failed=sum(1 for x in records if x[8] == Outcome.FAILED), rows_sha256=digest)


def _confirm(state: State, source: Source, result: Execution, versioned: bool) -> None:
    """List the bucket again: every deletion must show (gone, or hidden by a marker)."""
    table = listing_table(state, list_all(source, versioned))
    with state.transaction() as tx:
        result.confirmed, unconfirmed, result.unconfirmed = tables.confirm_deletions(tx, result.run_id, table, now())
        state.log("decommission.confirmed", tx, run=result.run_id, confirmed=result.confirmed,
                  unconfirmed=unconfirmed)
    state.conn.execute(f"DROP TABLE {table}")


def summary_text(p: Plan) -> list[str]:
    """Lines for the CLI and the playbook runner."""
    from cloudexit.core.units import format_bytes

    s = p.summary()
    lines = [f"Decommission of {p.source} (versioning: {p.versioning}"
             + (", --all-versions" if p.all_versions else "") + ")",
             f"  verified at every destination ({', '.join(p.destinations)}):",
             f"    to delete   {s['to_delete']:>10}   {format_bytes(s['to_delete_bytes'])}"]
    if s["delete_markers_to_place"]:
        lines.append(f"    of which {s['delete_markers_to_place']} get a delete marker only: their data stays in "
                     "the bucket as noncurrent versions (still billed); --all-versions deletes it")
    lines.append(f"  kept in the bucket {s['kept']:>8}   {format_bytes(s['kept_bytes'])}")
    for reason, c in s["kept_by_reason"].items():
        lines.append(f"    {reason:<32} {c['objects']:>8}   {format_bytes(c['bytes'])}")
    locked = "action = 'keep' AND reason LIKE 'object lock:%'"
    for r in Rows(p.rows.state, p.rows.table, f"action = 'keep' AND NOT delete_marker AND NOT ({locked})")[:10]:
        lines.append(f"    {r.key!r}" + (f" v{r.version_id}" if r.version_id else "") + f": {r.reason}")
    if s.get("locked"):
        lines.append(f"  under Object Lock: {s['locked']} verified versions ({format_bytes(s['locked_bytes'])}) "
                     "the store will not delete yet (kept above; the manifest lists them all):")
        for r in Rows(p.rows.state, p.rows.table, locked)[:10]:
            lines.append(f"    {r.key!r}" + (f" v{r.version_id}" if r.version_id else "")
                         + f": {r.reason.split(';')[0][len('object lock: '):]}")
    if s["kept"]:
        lines.append("  The free-exit programs (AWS, Azure, Google) require all data to leave: "
                     "what is kept must be migrated (or knowingly abandoned) first.")
    return lines


def manifest_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))

